"""The fused LoRA linear (train/lora_fast.py) against peft's own forward: the same loss and gradients,
the same tensors kept for backward, and peft's path wherever the fused one would compute otherwise."""

import copy

import pytest
import torch

from sftlab.config import Config
from sftlab.models import load_tokenizer
from sftlab.train.lora_fast import use_fused_lora
from sftlab.train.model import build_model

pytestmark = pytest.mark.xdist_group("train")


def _model(tiny_model_dir, precision, **kw):
    from peft.tuners.lora.layer import Linear as LoraLinear

    tok = load_tokenizer(str(tiny_model_dir))
    model, loss_fn = build_model(Config(model=str(tiny_model_dir), precision=precision, **kw), tok, [])
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    g = torch.Generator().manual_seed(0)
    for m in layers:  # B starts at zero: give it weights so the adapter's product counts
        with torch.no_grad():
            m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.05)
    ids = torch.randint(3, len(tok), (2, 24), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return model, loss_fn, layers, batch, LoraLinear


def _step(model, loss_fn, batch, precision, saved=None):
    model.zero_grad()
    saved = [] if saved is None else saved
    hooks = (lambda t: saved.append((t.shape, t.dtype, t.untyped_storage().data_ptr())) or t, lambda t: t)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), \
            torch.autograd.graph.saved_tensors_hooks(*hooks):
        loss = loss_fn(model, batch)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_lora_matches_peft(tiny_model_dir, precision):
    model, loss_fn, layers, batch, LoraLinear = _model(tiny_model_dir, precision)
    assert len(layers) == 14 and all(type(m) is not LoraLinear for m in layers)  # build_model fused them
    calls = []
    for m in layers:
        m.lora_A["default"].register_forward_hook(lambda *a: calls.append(1))  # runs only on peft's path
    saved_fused: list = []
    fused = _step(model, loss_fn, batch, precision, saved_fused)
    assert calls == []
    for m in layers:
        m.__class__ = LoraLinear
    saved_peft: list = []
    peft = _step(model, loss_fn, batch, precision, saved_peft)
    assert len(calls) == 14 and fused[1].keys() == peft[1].keys() and len(peft[1]) == 28
    tol = 1e-5 if precision == "fp32" else 2e-3  # bf16: peft rounds B's output, its scaling and the sum
    assert fused[0] == pytest.approx(peft[0], rel=tol)
    for n, g in peft[1].items():
        assert (fused[1][n] - g).norm() <= (0.02 if precision == "bf16" else 1e-5) * g.norm(), n

    def activations(saved):  # distinct storages kept for backward, weights excluded
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sorted({(tuple(s), d, ptr) for s, d, ptr in saved if ptr not in weights}, key=str)

    kept = lambda saved: sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for s, d, _ in activations(saved))
    assert kept(saved_fused) <= kept(saved_peft)


def test_fused_lora_leaves_other_cases_to_peft(tiny_model_dir):
    model, loss_fn, layers, batch, LoraLinear = _model(tiny_model_dir, "fp32")
    calls = []
    for m in layers:
        m.lora_A["default"].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():  # no gradients, fp32 throughout: fused too
        model(input_ids=batch["input_ids"])
    assert len(calls) == 0
    bf16_base, b_loss, b_layers, _, _ = _model(tiny_model_dir, "bf16")
    b_calls = []
    for m in b_layers:
        m.lora_A["default"].register_forward_hook(lambda *a: b_calls.append(1))
    with torch.no_grad():  # bf16 base, fp32 adapters, no autocast (generation): peft runs the adapter in fp32
        bf16_base(input_ids=batch["input_ids"])
    assert len(b_calls) == 14
    adapted = _step(model, loss_fn, batch, "fp32")[0]
    with model.disable_adapter():  # the base model (the forgetting baseline): the adapters left out
        assert abs(_step(model, loss_fn, batch, "fp32")[0] - adapted) > 1e-3
    model.base_model.model.model.layers[0].mlp.up_proj.merge()  # in the base weight now: not added twice
    assert _step(model, loss_fn, batch, "fp32")[0] == pytest.approx(adapted, rel=1e-5)
    assert len(calls) == 0
    copied = copy.deepcopy(model)  # a copy keeps the fused class and its own weights
    assert type(copied.base_model.model.model.layers[0].mlp.up_proj) is type(layers[0])
    dropout, d_loss, d_layers, _, _ = _model(tiny_model_dir, "fp32", lora_dropout=0.1)
    assert all(type(m) is not LoraLinear for m in d_layers)
    d_calls = []
    for m in d_layers:
        m.lora_A["default"].register_forward_hook(lambda *a: d_calls.append(1))
    _step(dropout, d_loss, batch, "fp32")
    assert len(d_calls) == 14  # dropout: peft's path
    assert use_fused_lora(model) == 0  # already fused: nothing left to swap


def test_sharded_runs_keep_peft_forward(monkeypatch, tiny_model_dir):
    """FSDP and DeepSpeed gather a module's parameters around its own call, which the fused path skips."""
    for env, kw in (({}, {"fsdp": "full_shard"}), ({"ACCELERATE_USE_DEEPSPEED": "true"}, {}),
                    ({"ACCELERATE_USE_FSDP": "true"}, {})):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        _, _, layers, _, LoraLinear = _model(tiny_model_dir, "fp32", **kw)
        assert len(layers) == 14 and all(type(m) is LoraLinear for m in layers), (env, kw)
        for k in env:
            monkeypatch.delenv(k)

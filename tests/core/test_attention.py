"""attn_implementation: auto picks eager attention for short CPU batches; same training curve, counted memory."""

import pytest
import torch
from conftest import train_config

from sftlab.core.attention import (
    EAGER_MAX_BYTES,
    EAGER_MAX_LEN,
    AttentionSwitch,
    eager_extra_bytes,
    pick_attention,
)
from sftlab.plan.memory import TrainSetup, estimate_memory
from sftlab.plan.shapes import load_shape
from sftlab.rundir import RunDir

pytestmark = pytest.mark.xdist_group("train")
SMOL = dict(n_heads=9, n_layers=30, compute_bytes=2)


def test_auto_rule():
    assert pick_attention("auto", device="cpu", batch=4, seq_len=128, **SMOL) == "eager"
    assert pick_attention("auto", device="cpu", batch=4, seq_len=EAGER_MAX_LEN + 1, **SMOL) == "sdpa"
    assert pick_attention("auto", device="cuda", batch=1, seq_len=16, **SMOL) == "sdpa"
    # a short but wide batch whose probabilities would be large stays on SDPA
    big = next(b for b in range(1, 10_000) if eager_extra_bytes(b, 200, 9, 30, 2) > EAGER_MAX_BYTES)
    assert pick_attention("auto", device="cpu", batch=big, seq_len=200, **SMOL) == "sdpa"
    assert pick_attention("auto", device="cpu", batch=big - 1, seq_len=200, **SMOL) == "eager"
    for explicit in ("sdpa", "eager"):
        assert pick_attention(explicit, device="cuda", batch=64, seq_len=4096, **SMOL) == explicit


def test_eager_probabilities_are_counted_in_the_plan():
    shape = load_shape("smollm2-135m-instruct")
    common = dict(method="lora", batch=4, seq_len=128, device="cpu", precision="bf16")
    sdpa = estimate_memory(shape, TrainSetup(attention="sdpa", **common))
    eager = estimate_memory(shape, TrainSetup(attention="eager", **common))
    auto = estimate_memory(shape, TrainSetup(attention="auto", **common))
    extra = eager.breakdown["activations"] - sdpa.breakdown["activations"]
    assert extra == eager_extra_bytes(4, 128, shape.n_heads, shape.n_layers, 2)
    assert auto.total_bytes == eager.total_bytes  # auto on a CPU at 4 x 128 is eager
    long = dict(common, seq_len=1024)
    assert estimate_memory(shape, TrainSetup(attention="auto", **long)).total_bytes == \
        estimate_memory(shape, TrainSetup(attention="sdpa", **long)).total_bytes


def test_switch_gives_the_sdpa_loss_and_gradients(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    eager_calls = []
    real_eager = modeling_llama.eager_attention_forward
    monkeypatch.setattr(modeling_llama, "eager_attention_forward",
                        lambda *a, **k: eager_calls.append(1) or real_eager(*a, **k))

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=torch.float32)
    ids = torch.randint(3, 300, (3, 40))
    att = torch.ones_like(ids)
    att[1, 25:] = 0  # right padding in one row
    labels = ids.masked_fill(att == 0, -100)

    def loss_and_grad():
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        return loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    ref_loss, ref_grad = loss_and_grad()
    assert not eager_calls
    switch = AttentionSwitch(model, compute_bytes=4)
    switch.before(ids)
    assert model.config._attn_implementation == "eager" and switch.counts == {"eager": 1}
    loss, grad = loss_and_grad()
    assert len(eager_calls) == model.config.num_hidden_layers  # the eager kernel really ran
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-5)
    switch.before(torch.zeros(2, EAGER_MAX_LEN + 1, dtype=torch.long))
    assert model.config._attn_implementation == "sdpa" and switch.counts == {"eager": 1, "sdpa": 1}


def test_training_under_auto_matches_sdpa(tmp_path, tiny_model_dir):
    common = dict(optimizer="sgd", max_steps=3, learning_rate=0.5, max_grad_norm=0.0, weight_decay=0.0)
    auto = train_run(tmp_path / "auto", tiny_model_dir, attn_implementation="auto", **common)
    sdpa = train_run(tmp_path / "sdpa", tiny_model_dir, attn_implementation="sdpa", **common)
    assert auto["summary"]["attention_batches"] == {"eager": 3}
    assert sdpa["summary"]["attention_batches"] is None
    assert auto["losses"] == pytest.approx(sdpa["losses"], abs=1e-5)


def train_run(path, tiny_model_dir, **kw):
    from sftlab.train.run import train

    summary = train(train_config(path, tiny_model_dir, **kw), quiet=True)
    losses = [r["loss"] for r in RunDir(path / "run").metrics() if r["split"] == "train"]
    return {"summary": summary, "losses": losses}

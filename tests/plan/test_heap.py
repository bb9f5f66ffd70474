"""The plan's glibc term (sftlab.plan.heap): the allocator behaviour it rests on, the per-layer count
against what a real layer creates and frees, and where the term applies."""

from __future__ import annotations

import subprocess
import sys
import weakref
from dataclasses import replace

import pytest

from sftlab.plan import TrainSetup, estimate_memory, load_shape
from sftlab.plan.allocator import glibc_version, train_malloc
from sftlab.plan.heap import heap_retained_bytes, layer_wide_temporary_bytes

SMOL = load_shape("smollm2-135m-instruct")

REUSE = """
import ctypes, torch
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p; libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
torch.empty(7 << 20)  # a freed 28 MiB block raises glibc's mmap threshold, as loading a model does
n = 6 << 18  # a 6 MiB float tensor
a, b, c = torch.empty(n), torch.empty(n), torch.empty(n)
hole = b.data_ptr(); del b
inside = lambda p, start: start <= p < start + 4 * n
same = inside(torch.empty(n).data_ptr(), hole)
x, y, z = libc.malloc(4 * n), libc.malloc(4 * n), libc.malloc(4 * n); libc.free(y)
plain = inside(libc.malloc(4 * n), y)
print(same, plain)
"""


@pytest.mark.skipif(glibc_version() is None, reason="the term models glibc's malloc")
def test_glibc_does_not_give_a_freed_tensor_block_to_a_tensor_of_the_same_size():
    # The premise of the term, in a fresh process: PyTorch's (aligned) allocation of the same size does
    # not land in the hole a freed tensor left between two live ones, while plain malloc's does.
    for _ in range(3):  # the heap's layout before the test differs from process to process
        out = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, check=True).stdout.split()
        assert out == ["False", "True"], f"glibc {glibc_version()} reuses aligned blocks: revisit sftlab.plan.heap"


def _wide_temporaries(layer, hidden_in, pos, pe, width: int | None, *, grad: bool, autocast: bool) -> tuple[int, int]:
    """(sum, most alive at once) of bytes of the tensors of last dimension ``width`` that one call of
    ``layer`` creates and frees before it returns, as PyTorch's dispatcher sees them; ``width`` None:
    of the freed tensors of the largest size, whatever their shape."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    born: list[list] = []  # [bytes, width, freed]
    alive: dict[int, int] = {}
    log: list[tuple[str, int]] = []

    def free(key):
        if (k := alive.pop(key, None)) is not None:
            born[k][2] = True
            log.append(("-", k))

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in inputs or key in alive or st.nbytes() == 0:
                    continue
                alive[key] = len(born)
                born.append([st.nbytes(), t.shape[-1] if t.dim() else 0, False])
                log.append(("+", alive[key]))
                weakref.finalize(st, free, key)
            return out

    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with Track():
            out = layer(hidden_in, position_embeddings=pe, attention_mask=None, position_ids=pos)
        total = cur = peak = 0
        largest = max((n for n, _, freed in born if freed), default=0)
        for op, k in log:  # inside autocast: its cached weight casts are not yet freed
            n, w, freed = born[k]
            if freed and (w == width if width is not None else n == largest):
                cur += n if op == "+" else -n
                total += n if op == "+" else 0
                peak = max(peak, cur)
    del out
    return total, peak


@pytest.mark.parametrize("method, precision, dropout", [
    ("lora", "fp32", 0.0), ("lora", "fp32", 0.1), ("lora", "bf16", 0.0), ("lora", "bf16", 0.1),
    ("full", "fp32", 0.0), ("full", "bf16", 0.0)])
def test_wide_temporaries_match_what_a_layer_creates_and_frees(tiny_model_dir, method, precision, dropout):
    import torch

    from sftlab.config import Config
    from sftlab.models import load_tokenizer, model_config
    from sftlab.plan.shapes import shape_from_config
    from sftlab.train.model import build_model

    tok = load_tokenizer(str(tiny_model_dir))
    cfg = Config(model=str(tiny_model_dir), method=method, precision=precision, lora_dropout=dropout,
                 attn_implementation="sdpa", gradient_checkpointing=False)
    model, _ = build_model(cfg, tok, [])
    model.train()
    inner = model.model if method == "full" else model.base_model.model.model
    shape = shape_from_config(model_config(str(tiny_model_dir)), "tiny")
    B, L = 4, 128
    dtype = next(inner.layers[0].parameters()).dtype if method != "full" else torch.float32
    h = torch.randn(B, L, shape.hidden, dtype=dtype, requires_grad=True)
    pos = torch.arange(L).unsqueeze(0).expand(B, L)
    pe = inner.rotary_emb(h, pos)
    setup = TrainSetup(method=method, batch=B, seq_len=L, device="cpu", precision=precision, lora_dropout=dropout)
    for grad in (True, False):
        total, peak = _wide_temporaries(inner.layers[1], h, pos, pe, shape.intermediate, grad=grad,
                                        autocast=precision == "bf16")
        if grad and total == 0:  # nothing of intermediate width freed: the widest freed ones count
            total, peak = _wide_temporaries(inner.layers[1], h, pos, pe, None, grad=grad, autocast=precision == "bf16")
        measured = (total if grad else peak) / (B * L)
        assert layer_wide_temporary_bytes(shape, setup, grad=grad) == pytest.approx(measured, rel=0.02), grad


def test_smollm2_counts_by_hand():
    # fp32, intermediate 1536 (6144 bytes a token), hidden 576 (2304). LoRA without dropout runs the fused
    # linear, which adds into its base output: with grad nothing of intermediate width (down keeps the MLP
    # product), so ten hidden-width ones count (q, o and down outputs, RoPE's three for q, the norms' pow
    # and x * rsqrt); without grad three at once (act(gate), up and their product).
    lora = TrainSetup(method="lora", device="cpu", precision="fp32")
    assert layer_wide_temporary_bytes(SMOL, lora, grad=True) == 10 * 2304
    assert layer_wide_temporary_bytes(SMOL, replace(lora, precision="bf16"), grad=True) == 4 * 2304  # fp32 norms
    assert layer_wide_temporary_bytes(SMOL, lora, grad=False) == 3 * 6144
    # dropout, peft's forward: six with grad (base output, B's output, its scaling, at gate and at up),
    # and A keeps its dropped input, not the MLP product, which becomes one more; without grad four at
    # once (gate's output while up's adapter runs)
    peft = replace(lora, lora_dropout=0.1)
    assert layer_wide_temporary_bytes(SMOL, peft, grad=True) == 7 * 6144
    assert layer_wide_temporary_bytes(SMOL, peft, grad=False) == 4 * 6144
    full = replace(lora, method="full")
    assert layer_wide_temporary_bytes(SMOL, full, grad=True) == 8 * 2304  # the norms keep x * rsqrt
    assert layer_wide_temporary_bytes(SMOL, replace(full, precision="bf16"), grad=True) == 7 * 2304
    assert layer_wide_temporary_bytes(SMOL, full, grad=False) == 3 * 6144
    # only q/v wrapped: the product stays a temporary (nothing keeps it)
    qv = replace(lora, lora_targets=("q_proj", "v_proj"))
    assert layer_wide_temporary_bytes(SMOL, qv, grad=True) == 6144


@pytest.mark.parametrize("ckpt", [False, True])
def test_retention_is_added_to_every_moment_on_cpu_with_glibc_only(ckpt):
    glibc = TrainSetup(method="lora", batch=2, seq_len=512, device="cpu", precision="fp32",  # peft's forward
                       gradient_checkpointing=ckpt, malloc="glibc", lora_dropout=0.1)
    kept = SMOL.n_layers * glibc.tokens * layer_wide_temporary_bytes(SMOL, glibc, grad=not ckpt)
    assert heap_retained_bytes(SMOL, glibc) == kept > 0
    with_it, lean = estimate_memory(SMOL, glibc), estimate_memory(SMOL, replace(glibc, malloc="lean"))
    assert with_it.breakdown["malloc retention"] == kept and "malloc retention" not in lean.breakdown
    assert {k: v - kept for k, v in with_it.phases.items()} == lean.phases  # resident in every moment
    assert heap_retained_bytes(SMOL, replace(glibc, malloc="other")) == 0
    assert heap_retained_bytes(SMOL, replace(glibc, device="cuda")) == 0
    # it grows with the tokens of a micro-batch, not with accumulation
    assert heap_retained_bytes(SMOL, replace(glibc, batch=4)) == 2 * kept
    assert heap_retained_bytes(SMOL, replace(glibc, grad_accum=4)) == kept


def test_plan_and_train_check_read_the_malloc_train_runs_with(monkeypatch, tiny_model_dir):
    from sftlab.config import Config
    from sftlab.models import model_config
    from sftlab.plan.auto import estimated_bytes

    cfg = Config(model=str(tiny_model_dir), method="lora", precision="fp32", lora_dropout=0.1)  # peft's forward
    mcfg = model_config(str(tiny_model_dir))
    need = {}
    for value in ("lean", ""):
        monkeypatch.setenv("SFTLAB_MALLOC", value)
        need[value] = estimated_bytes(cfg, mcfg, batch=2, seq_len=128, checkpointing=False, device="cpu")
        assert TrainSetup().malloc == train_malloc()
    if glibc_version() is None:
        assert TrainSetup().malloc == "other" and need["lean"] == need[""]
    else:  # train --check counts glibc's retention exactly when `sftlab train` would run glibc's default
        assert need[""] > need["lean"]

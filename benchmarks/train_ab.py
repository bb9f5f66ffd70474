"""A/B of one change to sftlab's training loop: Trainer.train wall time of the default LoRA run (the
time bench_train.py divides by), each variant in a fresh process, alternating, medians printed. Not a
peer comparison (bench_train.py is): it isolates one change. Variants are patches applied in the
worker; ``now`` is the code as it is.

    PYTHONPATH=src .venv/bin/python benchmarks/train_ab.py --variants before_overhead,now --steps 30 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _before_overhead() -> None:
    """Trainer's own per-micro-step walks: model.train() every micro-step, parameters counted each time."""
    from transformers import Trainer

    from sftlab.train.trainer import SftlabTrainer

    SftlabTrainer.floating_point_ops = Trainer.floating_point_ops
    step = SftlabTrainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        type(model).train(model)
        return step(self, model, inputs, num_items_in_batch)

    SftlabTrainer.training_step = training_step


def _peft_forward() -> None:
    """peft's own LoRA forward instead of sftlab's fused function (train/lora_fast.py)."""
    import sftlab.train.lora_fast as lora_fast

    lora_fast.use_fused_lora = lambda model: 0


def _glibc_default() -> None:
    """glibc's own malloc settings (trims its heap, self-raising mmap threshold), as before sftlab
    kept freed pages (plan/allocator.py: keep_freed_pages)."""
    import sftlab.train.run as run

    run.set_train_malloc = lambda: ""


MICRO = [4, 2]  # batch_size, gradient_accumulation of the timed run


def _one_micro_batch() -> None:
    """The step's 8 examples as one micro-batch of 8 instead of 2 of 4 (the same loss: it is normalised by
    the step's token count): what merging gradient accumulation would gain where memory allows."""
    MICRO[:] = [8, 1]


def _no_merge() -> None:
    """merge_micro_batches off: the step as configured (2 micro-batches of 4)."""
    import sftlab.train.merge as merge

    decide = merge.decide_merge
    merge.decide_merge = lambda rc, *a, **k: decide(__import__("dataclasses").replace(rc, merge_micro_batches=False), *a, **k)


def _heap_chunks() -> None:
    """Loss chunks capped at 24 MiB of fp32 logits each (under glibc's largest mmap threshold, 32 MiB), all
    kept when the total is small: chunk temporaries come from the heap instead of fresh mmaps."""
    import torch
    from torch.utils.checkpoint import checkpoint

    import sftlab.core.loss as L

    def per_token_losses(hidden, head, labels, *, label_smoothing=0.0, chunk_size=2048, fused=None):
        target = labels[:, 1:]
        mask = target != L.IGNORE
        h = hidden[:, :-1][mask]
        y = target[mask]
        if h.shape[0] == 0:
            return hidden.sum() * 0.0 + torch.zeros(0, device=hidden.device), mask
        vocab = head.weight.shape[0]
        rows = min(chunk_size, max(1, (24 * 2**20) // (vocab * 4)))
        recompute = torch.is_grad_enabled() and h.requires_grad and h.shape[0] * vocab * 4 > L.NO_RECOMPUTE_BYTES
        out = []
        for start in range(0, h.shape[0], rows):
            hc, yc = h[start:start + rows], y[start:start + rows]
            out.append(checkpoint(L._chunk_ce, head, hc, yc, label_smoothing, use_reentrant=False) if recompute
                       else L._chunk_ce(head, hc, yc, label_smoothing))
        return torch.cat(out), mask

    L.per_token_losses = per_token_losses


VARIANTS = {"now": lambda: None, "one_micro_batch": _one_micro_batch, "no_merge": _no_merge,
            "heap_chunks": _heap_chunks, "glibc_default": _glibc_default, "before_overhead": _before_overhead, "peft_forward": _peft_forward}


def demo_config(out: str, steps: int):
    """The default LoRA run these A/Bs time: the demo data, 4 x 2 per step, no saving or eval on the way."""
    from sftlab.config import Config
    from sftlab.demo_data import demo_path

    return Config(data=str(demo_path("train")), output_dir=out, max_steps=steps, batch_size=MICRO[0],
                  gradient_accumulation=MICRO[1], learning_rate=2e-4, seed=42, logging_steps=1,
                  save_steps=100000, eval_steps=100000)


def worker(variant: str, steps: int, out: str) -> None:
    import transformers

    import sftlab.train.run as run

    VARIANTS[variant]()
    took: dict[str, float] = {}
    train = transformers.Trainer.train

    def timed(self, *args, **kwargs):
        import resource

        t0, f0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            return train(self, *args, **kwargs)
        finally:
            took["train_s"] = time.perf_counter() - t0
            took["page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            took["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    transformers.Trainer.train = timed
    s = run.train(demo_config(out, steps), quiet=True)
    print(json.dumps({"variant": variant, "precision": s.get("precision"), "loss": s["final_train_loss"],
                      "train_s": took["train_s"], "page_faults": took["page_faults"], "max_rss_mb": took["max_rss_mb"]}))


def alternate(script: str, names: list[str], steps: int, reps: int, report) -> dict[str, list[dict]]:
    """Runs ``script --worker NAME`` for each name in turn, ``reps`` times, each in a fresh process and
    run folder; ``report(rep, name, row)`` after each; returns every worker's JSON row by name."""
    import tempfile

    rows: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names:
            with tempfile.TemporaryDirectory() as d:
                cmd = [sys.executable, script, "--worker", name, "--steps", str(steps), "--out", f"{d}/run"]
                line = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows[name].append(json.loads(line))
            report(rep, name, rows[name][-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="before_overhead,now")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--worker", choices=sorted(VARIANTS))
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.steps, a.out)
    names = a.variants.split(",")
    rows = alternate(__file__, names, a.steps, a.reps, lambda rep, name, r: print(
        f"rep {rep + 1} {name}: train {r['train_s']:.1f} s, precision {r['precision']}, final train loss "
        f"{r['loss']:.6f}, minor page faults {r['page_faults']}, max RSS {r['max_rss_mb']:.0f} MB", flush=True))
    med = {n: statistics.median(r["train_s"] for r in rs) for n, rs in rows.items()}
    first = names[0]
    print("medians: " + ", ".join(f"{n} {m:.1f} s" for n, m in med.items()) + " -> " +
          ", ".join(f"{n} {med[first] / med[n]:.3f}x of {first}" for n in names[1:]))


if __name__ == "__main__":
    main()

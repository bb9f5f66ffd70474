"""Measure real training-step memory of the default model and compare it with `sftlab plan`'s estimate.

Each setting (method x checkpointing x batch x length) runs in a fresh subprocess: it records the
resident memory (RSS) after imports and before the model loads, loads the model, then runs a few full
optimizer steps the way the training code does (transformers model, peft LoRA r=16 on all linear layers
with dropout 0.05, SDPA attention, torch AdamW with clipping, non-reentrant gradient checkpointing, and the training
loss itself: SftlabTrainer's hidden-states-instead-of-logits forward and ``sft_loss``'s chunked, recomputed
cross-entropy). The allocator is set as in :mod:`sftlab.plan.allocator` (``--glibc-default`` leaves
glibc's dynamic mmap threshold, which keeps freed activations resident; see RESULTS.md). Measured = peak RSS (the kernel's high-water mark, VmHWM) minus the RSS
before the model loaded. On a CUDA machine (``--device cuda``) it measures
``torch.cuda.max_memory_allocated`` instead, under bf16 autocast, against the estimate without the CUDA
context and allocator slack.

    python benchmarks/plan_memory.py                 # the default grid on CPU, ~5 minutes on 2 cores
    python benchmarks/plan_memory.py --device cuda   # the same on a GPU
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
DEFAULT_GRID = [(m, ck, b, s) for m in ("full", "lora") for ck in (False, True) for b, s in ((1, 128), (2, 256), (4, 256))]


def _import_sftlab():
    try:
        importlib.import_module("sftlab")
    except ImportError:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, str(ROOT / "src"))


# --- child: one measured run ------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    try:  # Linux >= 4.0: writing 5 resets the peak-RSS counter to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _load_model(device: str, method: str):
    """The default model as the training code loads it: fp32 on CPU; on CUDA fp32 weights under bf16
    autocast for full fine-tuning (fp32 master weights), a bf16 base for LoRA."""
    import torch

    from sftlab.models import load_model, resolve_model_path

    dtype = torch.float32 if (device == "cpu" or method == "full") else torch.bfloat16
    return load_model(MODEL, dtype=dtype, device=device), resolve_model_path(MODEL)


def child(spec: dict) -> dict:
    import torch

    device, method, ckpt = spec["device"], spec["method"], spec["checkpointing"]
    batch, seq, steps = spec["batch"], spec["seq_len"], spec["steps"]
    from sftlab.plan.allocator import release_freed_memory

    allocator = "glibc default"
    if not spec.get("glibc_default") and release_freed_memory():
        allocator = "mmap threshold 64 KiB"
    importlib.import_module("transformers")  # imported before the baseline, like the training process
    importlib.import_module("peft")

    from sftlab.core.loss import hidden_states_instead_of_logits, sft_loss
    from sftlab.models import resolve_model_path

    resolve_model_path(MODEL)  # a first use converts the GGUF; that is not part of a training run
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = _rss()
    model, source = _load_model(device, method)
    model.config.use_cache = False
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    model.train()
    load_peak = _hwm() - rss0
    reset = _reset_hwm()
    params = [p for p in model.parameters() if p.requires_grad]
    # As the Trainer's optim="adamw_torch" (what sftlab train asks for): torch's default implementation,
    # weight decay 0.01, gradients clipped to norm 1.0.
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    vocab = model.get_input_embeddings().weight.shape[0]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        # As SftlabTrainer.compute_loss: the model returns hidden states, the loss projects chunks of them.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            with hidden_states_instead_of_logits(model) as head:
                hidden = model(input_ids=ids, use_cache=False).logits
                loss = sft_loss(hidden, head, ids)
            del hidden
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    out = {"source": source, "allocator": allocator, "seconds_per_step": min(times), "loss": float(loss)}
    if device == "cuda":
        out["measured_bytes"] = torch.cuda.max_memory_allocated() - base
        out["reserved_bytes"] = torch.cuda.max_memory_reserved() - base
    else:
        train_peak = _hwm() - rss0
        out["train_peak_bytes"] = train_peak
        out["load_peak_bytes"] = load_peak
        out["measured_bytes"] = max(train_peak, load_peak) if reset else train_peak
    return out


# --- parent: the grid and the table -----------------------------------------------------------


def estimate(device: str, method: str, ckpt: bool, batch: int, seq: int) -> dict:
    _import_sftlab()
    from sftlab.plan import TrainSetup, estimate_memory, load_shape

    setup = TrainSetup(method=method, batch=batch, seq_len=seq, device=device, gradient_checkpointing=ckpt,
                       optimizer="adamw", lora_r=16, lora_dropout=0.05)
    e = estimate_memory(load_shape(MODEL), setup)
    comparable = e.total_bytes
    if device == "cuda":  # max_memory_allocated sees neither the CUDA context nor allocator slack
        comparable -= e.breakdown.get("cuda_context", 0) + e.breakdown.get("overhead", 0)
    return {"estimate_bytes": comparable, "peak_phase": e.peak_phase}


def run_grid(device: str, grid, steps: int, glibc_default: bool = False) -> list[dict]:
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    for method, ckpt, batch, seq in grid:
        spec = {"device": device, "method": method, "checkpointing": ckpt, "batch": batch, "seq_len": seq, "steps": steps,
                "glibc_default": glibc_default}
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"setting {spec} failed (exit {proc.returncode})")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {**spec, **result, **estimate(device, method, ckpt, batch, seq), "wall_s": time.time() - t0}
        row["error_pct"] = 100.0 * (row["estimate_bytes"] - row["measured_bytes"]) / row["measured_bytes"]
        rows.append(row)
        print(_row_line(row), flush=True)
    return rows


def _header(device: str) -> str:
    measured = "measured GB (peak RSS - RSS before load)" if device == "cpu" else "measured GB (max_memory_allocated)"
    return (f"| method | checkpointing | batch x seq | estimate GB | {measured} | error % | estimated peak at | s/step |\n"
            "|---|---|---|---:|---:|---:|---|---:|")


def _row_line(r: dict) -> str:
    return (f"| {r['method']} | {'yes' if r['checkpointing'] else 'no'} | {r['batch']} x {r['seq_len']} | "
            f"{r['estimate_bytes'] / 1e9:.3f} | {r['measured_bytes'] / 1e9:.3f} | {r['error_pct']:+.1f} | "
            f"{r['peak_phase']} | {r['seconds_per_step']:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per setting (the peak needs >= 2)")
    ap.add_argument("--setting", action="append", default=[], metavar="METHOD:CKPT:BxS",
                    help="run only these settings, e.g. lora:ckpt:4x256 or full:nockpt:1x128")
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's dynamic mmap threshold as it is")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--from-json", metavar="FILE", help="re-estimate rows measured earlier (written by --json); measure nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        print(_header(rows[0]["device"]))
        for r in rows:
            r.update(estimate(r["device"], r["method"], r["checkpointing"], r["batch"], r["seq_len"]))
            r["error_pct"] = 100.0 * (r["estimate_bytes"] - r["measured_bytes"]) / r["measured_bytes"]
            print(_row_line(r))
        worst = max(abs(r["error_pct"]) for r in rows)
        print(f"\nworst error {worst:.1f}% over {len(rows)} settings (re-estimated from {args.from_json})")
        return 0 if worst <= 15.0 else 1
    grid = DEFAULT_GRID
    if args.setting:
        grid = []
        for s in args.setting:
            m, ck, bs = s.split(":")
            b, n = bs.lower().split("x")
            grid.append((m, ck == "ckpt", int(b), int(n)))
    import platform

    print(f"# {MODEL}, device {args.device}, {args.steps} optimizer steps per setting, python {platform.python_version()}")
    print(_header(args.device), flush=True)
    t0 = time.time()
    rows = run_grid(args.device, grid, args.steps, args.glibc_default)
    worst = max(abs(r["error_pct"]) for r in rows)
    print(f"\nworst error {worst:.1f}% over {len(rows)} settings; allocator: {rows[0]['allocator']}; "
          f"model: {rows[0]['source']}; {time.time() - t0:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if worst <= 15.0 else 1


if __name__ == "__main__":
    sys.exit(main())

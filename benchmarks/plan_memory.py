"""`sftlab plan`'s estimate against the peak memory of the real `sftlab train` process.

Each setting (method x checkpointing x batch x length) runs `sftlab train` as a subprocess on the
default model (SmolLM2-135M-Instruct) for a few optimizer steps, every token trained (``masking=all``,
examples longer than the length and truncated to it, so every row is exactly ``seq`` tokens), with the
product defaults otherwise (LoRA r=16 on all linear layers, no dropout, torch AdamW, clipping 1.0).
Measured on CPU: the child's peak resident set size as the kernel reports it when it exits
(``os.wait4`` -> ``ru_maxrss``), the whole process: interpreter, libraries, tokenizer, data, model,
training and saving. It is compared with `sftlab plan --json`'s ``total_bytes`` for the same setting,
which includes the process baseline. On CUDA (``--device cuda``) it polls ``nvidia-smi`` for the
child's memory (the caching allocator's reserved memory plus the CUDA context), the GPU counterpart.

It measures `train` with ``SFTLAB_MALLOC=lean`` (freed memory goes back to the OS); ``--glibc-default``
measures `train`'s default, glibc's malloc settings, which keep freed temporaries resident. The plan is
made with the same setting, so it counts that retention only for the latter (sftlab.plan.heap).

    python benchmarks/plan_memory.py                       # the default grid on CPU
    python benchmarks/plan_memory.py --setting lora:ckpt:2x512 --json out.json
    python benchmarks/plan_memory.py --from-json out.json  # re-estimate measured rows, measure nothing
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
DEFAULT_GRID = [("full", False, 2, 256), ("full", False, 2, 512), ("full", True, 2, 512),
                ("lora", False, 2, 256), ("lora", False, 2, 512), ("lora", True, 2, 512), ("lora", True, 4, 256)]
WORDS = ("the model learns a small task from examples and the data doctor checks every line before "
         "training starts so that nothing is wasted on bad rows").split()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}


def write_data(path: Path, n: int = 64) -> None:
    """Conversations far longer than any length measured, so truncation makes every row full."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            user = " ".join(rng.choice(WORDS) for _ in range(60))
            reply = " ".join(rng.choice(WORDS) for _ in range(1500))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": reply}]}) + "\n")


def _gpu_mib(pid: int) -> int:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return sum(int(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line) if int(p) == pid)


def measure(device: str, method: str, ckpt: bool, batch: int, seq: int, steps: int, data: Path, out: Path,
            precision: str) -> dict:
    """Run `sftlab train` once; its peak memory in bytes and its seconds per step."""
    cmd = [sys.executable, "-m", "sftlab.cli", "train", "--data", str(data), "--method", method,
           "--max-seq-length", str(seq), "--truncation", "truncate", "--masking", "all", "--output-dir", str(out),
           "--set", f"batch_size={batch}", "--set", "gradient_accumulation=1", "--set", f"max_steps={steps}",
           "--set", f"gradient_checkpointing={'true' if ckpt else 'false'}", "--set", "attn_implementation=sdpa",
           "--set", f"precision={precision}", "--set", "logging_steps=1",
           "--set", "save_steps=100000", "--set", "group_by_length=false"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gpu_peak = [0]
    if device == "cuda":
        def poll():
            while proc.poll() is None:
                gpu_peak[0] = max(gpu_peak[0], _gpu_mib(proc.pid))
                time.sleep(0.2)
        threading.Thread(target=poll, daemon=True).start()
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(log[-3000:], file=sys.stderr)
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {proc.returncode})")
    summary = json.loads((out / "summary.json").read_text())
    peak = gpu_peak[0] * 2**20 if device == "cuda" else usage.ru_maxrss * 1024  # KiB on Linux
    return {"measured_bytes": peak, "seconds_per_step": summary["time_s"] / max(summary["steps"], 1),
            "steps": summary["steps"], "wall_s": time.time() - t0,
            "train_loss": summary.get("final_train_loss")}


def estimate(device: str, method: str, ckpt: bool, batch: int, seq: int, malloc: str, precision: str) -> dict:
    """`sftlab plan --json` for the same setting, as a user would run it in the environment `train` ran in
    (``malloc``: "lean" for SFTLAB_MALLOC=lean, "glibc" for train's default)."""
    cmd = [sys.executable, "-m", "sftlab.cli", "plan", "--model", MODEL, "--method", method, "--batch", str(batch),
           "--seq-len", str(seq), "--device", device, "--attention", "sdpa", "--json",
           "--precision", precision] + (["--gradient-checkpointing"] if ckpt else [])
    proc = subprocess.run(cmd, env={**_env(), "SFTLAB_MALLOC": malloc}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed: {proc.stderr[-2000:]}")
    plan = json.loads(proc.stdout)
    return {"estimate_bytes": plan["total_bytes"], "peak_phase": plan["peak_phase"],
            "baseline_bytes": plan["breakdown"].get("process baseline", 0),
            "malloc_retention_bytes": plan["breakdown"].get("malloc retention", 0)}


def _header(device: str) -> str:
    what = "peak RSS of `sftlab train`" if device == "cpu" else "nvidia-smi peak of `sftlab train`"
    return (f"| method | checkpointing | batch x seq | plan GB | measured GB ({what}) | error % | plan's peak at | s/step |\n"
            "|---|---|---|---:|---:|---:|---|---:|")


def _row_line(r: dict) -> str:
    return (f"| {r['method']} | {'yes' if r['checkpointing'] else 'no'} | {r['batch']} x {r['seq_len']} | "
            f"{r['estimate_bytes'] / 1e9:.3f} | {r['measured_bytes'] / 1e9:.3f} | {r['error_pct']:+.1f} | "
            f"{r['peak_phase']} | {r['seconds_per_step']:.1f} |")


def _finish(row: dict) -> dict:
    malloc = "glibc" if row.get("malloc") == "glibc" else "lean"  # rows before 2026-11-30 say "sftlab" for lean
    precision = row.get("precision") or ("fp32" if row["device"] == "cpu" else "auto")  # older rows: the default
    row.update(estimate(row["device"], row["method"], row["checkpointing"], row["batch"], row["seq_len"], malloc,
                        precision))
    row["error_pct"] = 100.0 * (row["estimate_bytes"] - row["measured_bytes"]) / row["measured_bytes"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per setting (the peak needs >= 2)")
    ap.add_argument("--setting", action="append", default=[], metavar="METHOD:CKPT:BxS",
                    help="run only these settings, e.g. lora:ckpt:4x256 or full:nockpt:2x512")
    ap.add_argument("--glibc-default", action="store_true", help="measure train's default malloc (glibc's) instead of SFTLAB_MALLOC=lean")
    ap.add_argument("--precision", choices=("fp32", "bf16", "auto"),
                    help="training precision (default: fp32 on cpu, auto on cuda); the plan is made with the same")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON (after each setting)")
    ap.add_argument("--from-json", metavar="FILE", nargs="+", help="re-estimate rows measured earlier (written by --json); measure nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        rows = [_finish(r) for f in args.from_json for r in json.loads(Path(f).read_text())]
        print(_header(rows[0]["device"]))
        print("\n".join(_row_line(r) for r in rows))
        worst = max(abs(r["error_pct"]) for r in rows)
        print(f"\nworst error {worst:.1f}% over {len(rows)} settings (re-estimated from {', '.join(args.from_json)})")
        return 0 if worst <= 15.0 else 1
    os.environ["SFTLAB_MALLOC"] = "glibc" if args.glibc_default else "lean"
    precision = args.precision or ("fp32" if args.device == "cpu" else "auto")
    grid = DEFAULT_GRID
    if args.setting:
        grid = []
        for s in args.setting:
            m, ck, bs = s.split(":")
            b, n = bs.lower().split("x")
            grid.append((m, ck == "ckpt", int(b), int(n)))
    import platform

    print(f"# {MODEL}, device {args.device}, {args.steps} optimizer steps per setting, python "
          f"{platform.python_version()}, malloc {'glibc default' if args.glibc_default else 'SFTLAB_MALLOC=lean'}")
    print(_header(args.device), flush=True)
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "long.jsonl"
        write_data(data)
        for i, (method, ckpt, batch, seq) in enumerate(grid):
            row = {"device": args.device, "method": method, "checkpointing": ckpt, "batch": batch, "seq_len": seq,
                   "malloc": "glibc" if args.glibc_default else "lean", "precision": precision,
                   **measure(args.device, method, ckpt, batch, seq, args.steps, data, Path(tmp) / f"run{i}", precision)}
            rows.append(_finish(row))
            print(_row_line(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))
    worst = max(abs(r["error_pct"]) for r in rows)
    print(f"\nworst error {worst:.1f}% over {len(rows)} settings; {time.time() - t0:.0f} s in all")
    return 0 if worst <= 15.0 else 1


if __name__ == "__main__":
    sys.exit(main())

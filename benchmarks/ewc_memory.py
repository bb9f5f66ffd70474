"""Peak RSS of the `sftlab train` process (full fine-tune of the default model, fp32, 2 steps) with and
without EWC, against the memory line of `sftlab train --check` for the same config (plan's estimate).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ewc_memory.py
"""
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv/bin/python")
data = str(ROOT / "src/sftlab/demo_data/train.jsonl")
general = str(ROOT / "src/sftlab/demo_data/general.jsonl")
for ewc in (0, 1):
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "run.yaml"
        cfg.write_text(f"model: smollm2-135m-instruct\ndata: {data}\nmethod: full\nbatch_size: 2\ngradient_accumulation: 1\n"
                       f"max_steps: 2\nprecision: fp32\ngradient_checkpointing: false\nmax_seq_length: 256\n"
                       f"merge_micro_batches: false\noutput_dir: {d}/run\nsave_steps: 1000\nlogging_steps: 1\n"
                       + (f"ewc_lambda: 1\nreplay_data: {general}\newc_samples: 8\n" if ewc else ""))
        env = {**os.environ, "SFTLAB_MALLOC": "lean"}
        pid = os.fork()
        if pid == 0:
            os.execve(PY, [PY, "-m", "sftlab", "train", str(cfg)], {**env})
        _, status, ru = os.wait4(pid, 0)
        peak_mb = ru.ru_maxrss / 1024
        chk = subprocess.run([PY, "-m", "sftlab", "train", str(cfg), "--check"], capture_output=True, text=True, env=env,
                             cwd=d).stdout
        line = next((x for x in chk.splitlines() if x.startswith("memory:")), "")
        print(f"ewc_lambda={ewc}: exit {status >> 8}, measured peak RSS {peak_mb:.0f} MiB = {peak_mb * 2**20 / 1e9:.2f} GB; check: {line}")

#!/usr/bin/env bash
# Wheels for benchmarks/bench_gpu.py on a lent GPU machine, which reaches no package index.
# Its image has torch (CUDA), triton, accelerate, tokenizers, pandas, pyarrow, xxhash, fsspec and
# huggingface_hub; this fetches, into .whl/ (git-ignored, carried by the device tool), what it lacks or
# has at another version: the transformers and peft the project pins, TRL (the peer), liger-kernel
# (sftlab[gpu] and TRL's use_liger_kernel), datasets (TRL needs it) and its two pure-Python needs.
# Run here, from anywhere:  bash benchmarks/gpu_wheels.sh
# Then on the device (one call, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 \
#     && python3 benchmarks/bench_gpu.py --json $OUT/bench_gpu.json 2>&1 | tee $OUT/bench_gpu.log
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
DEST="$ROOT/.whl"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" \
  transformers==5.24.0 peft==0.21.2 trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -la "$DEST"
du -sh "$DEST"

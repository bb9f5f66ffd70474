"""Training throughput: sftlab's train(cfg) vs TRL's SFTTrainer, same model, data, LoRA, batch and steps.

Issue targets:
1. sftlab's default configuration reaches at least 3x (issue #11; 2x before it) the real (non-padding)
   tokens per second of TRL's default configuration, at the same or lower held-out loss, whatever the
   CPU's bf16 speed (run it again with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` on a CPU with AMX: AMX
   off, bf16 matmuls at about 0.6x fp32, as on an AVX512-BF16 CPU without AMX);
2. with gradient checkpointing on in both, sftlab is faster than TRL at no more peak memory.

Configurations (each run in a fresh subprocess, so peak memory is its own):
- ``sftlab default``: ``sftlab.train.run.train(Config(...))`` with sftlab's defaults (LoRA r=16
  alpha=32 dropout=0 on all linear layers, response-only loss, gradient_checkpointing=auto,
  precision=auto, attn_implementation=auto, length-grouped batches) except the shared settings below.
- ``sftlab gc``: the same plus ``gradient_checkpointing=true``.
- ``trl default``: ``trl.SFTTrainer`` with ``SFTConfig`` defaults except the shared settings, and
  ``peft.LoraConfig(r, lora_alpha, lora_dropout, target_modules="all-linear")`` with the values of
  sftlab's defaults (r=16, alpha=32, dropout=0) -- the adapter made identical to sftlab's so neither
  loss nor speed is tilted by it. ``--trl-peft-defaults`` gives TRL peft's own defaults instead
  (alpha=8, dropout=0). TRL 1.16's defaults already turn gradient checkpointing on
  (``SFTConfig.gradient_checkpointing=True``) and bf16 autocast on, so this one run is the peer of
  both comparisons. On a CPU-only machine ``SFTConfig()`` refuses its own bf16 default unless
  ``use_cpu=True`` is given (transformers' check): that is set, nothing else.

Shared settings: the default model, ``src/sftlab/demo_data/train.jsonl``, learning rate, seed,
per-device batch x gradient accumulation (global batch), optimizer steps, logging every step.
No evaluation or checkpoint during training on either side.

Measured identically for both sides by patching ``transformers.Trainer`` in the worker (both
trainers subclass it and call these methods through ``super()``):
- real tokens: ``attention_mask.sum()`` of every micro-batch that ``training_step`` receives;
  trained tokens: ``(labels[:, 1:] != -100).sum()`` of the same batches (after the shift);
- time: wall time of ``Trainer.train()`` (optimizer, data loader, all steps);
- the training loss each trainer logs (``Trainer.log``), averaged over the last 5 steps: sftlab's is
  response-only, TRL's default is over all tokens, so these two are not comparable;
- peak memory: ``ru_maxrss`` after training minus the RSS measured after imports, before the data
  and the model are loaded.
The comparable loss is ``eval loss``: one shared function (``response_eval_loss``) loads the base
model plus the adapter each side saved and computes the token-weighted cross entropy of the
assistant replies (sftlab's exact labels) of ``src/sftlab/demo_data/eval.jsonl`` (held out), in fp32.

Run inside .venv-bench (see setup_peer.sh):
    .venv-bench/bin/python benchmarks/bench_train.py            # 30 steps, batch 4x2, 2 repetitions
    .venv-bench/bin/python benchmarks/bench_train.py --quick    # 4 steps, 1 repetition (debugging)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "src" / "sftlab" / "demo_data" / "train.jsonl"
EVAL = ROOT / "src" / "sftlab" / "demo_data" / "eval.jsonl"
MODEL = "smollm2-135m-instruct"
CONFIGS = ("sftlab default", "trl default", "sftlab gc")
# Not run by default (--configs): sftlab with precision=bf16 forced. Where the probe of `precision: auto`
# measures bf16 faster (AMX), sftlab's default already resolves to bf16, and these equal the defaults.
EXTRA = ("sftlab bf16", "sftlab bf16 gc", "sftlab fp32", "trl fp32")
# "sftlab fp32" vs "trl fp32" (TRL with bf16=False, nothing else changed) stands in, on a CPU where bf16 is fast,
# for a CPU where it is slow: there `auto` resolves to fp32, and TRL's default bf16 autocast runs slower than
# its own fp32 would, so the ratio measured this way is a lower bound of the ratio on such a machine.
LAST_N = 5


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------
# Worker side: one configuration, one process


class _Meter:
    """Counts tokens and collects logged losses through class-level patches of transformers.Trainer."""

    def __init__(self):
        self.real = 0
        self.trained = 0
        self.micro_batches = 0
        self.padded = 0
        self.losses: list[float] = []
        self.train_s = None
        self.train_cpu_s = None

    def install(self):
        import transformers

        T = transformers.Trainer
        meter = self
        orig_step, orig_log, orig_train = T.training_step, T.log, T.train

        def training_step(self, model, inputs, *args, **kwargs):
            meter.real += int(inputs["attention_mask"].sum())
            meter.padded += int(inputs["attention_mask"].numel())
            meter.trained += int((inputs["labels"][:, 1:] != -100).sum())
            meter.micro_batches += 1
            return orig_step(self, model, inputs, *args, **kwargs)

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:
                meter.losses.append(float(logs["loss"]))
            return orig_log(self, logs, *args, **kwargs)

        def train(self, *args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return orig_train(self, *args, **kwargs)
            finally:
                meter.train_s = time.perf_counter() - t0
                meter.train_cpu_s = time.process_time() - c0

        T.training_step, T.log, T.train = training_step, log, train


def _run_sftlab(opts: dict, out_dir: Path, gc: bool, precision: str = "auto") -> Path:
    from sftlab.config import Config
    from sftlab.train.run import train

    cfg = Config(model=MODEL, data=str(TRAIN), output_dir=str(out_dir), max_steps=opts["steps"],
                 batch_size=opts["batch"], gradient_accumulation=opts["accum"], learning_rate=opts["lr"],
                 seed=opts["seed"], logging_steps=1, save_steps=100000, eval_steps=100000,
                 gradient_checkpointing=True if gc else "auto", precision=precision)
    summary = train(cfg, quiet=True)
    import yaml

    resolved = yaml.safe_load((out_dir / "config.yaml").read_text())  # every `auto` replaced by its value
    opts["resolved"] = {k: resolved.get(k) for k in ("gradient_checkpointing", "precision", "packing")}
    opts["resolved"]["steps"] = summary.get("steps")
    if merge := summary.get("merge"):  # merge_micro_batches: the micro-batch that ran, and the trial
        opts["resolved"]["micro_batch"] = f"{merge['batch_size']} x {merge['gradient_accumulation']}"
        opts["resolved"]["merge_trial_ms"] = [merge.get("micro_ms"), merge.get("merged_ms"), merge.get("cached")]
    probe = summary.get("precision_probe")  # precision auto on a CPU: the measured fp32 and bf16 times
    if probe:
        opts["resolved"]["probe_ms"] = {"fp32": probe["fp32_ms"], "bf16": probe["bf16_ms"]}
    return out_dir / "model"


def _run_trl(opts: dict, out_dir: Path, bf16: bool | None = None) -> Path:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sftlab.models import resolve_model_path

    path = resolve_model_path(MODEL)
    rows = [json.loads(line) for line in TRAIN.read_text(encoding="utf-8").splitlines() if line.strip()]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    args = SFTConfig(output_dir=str(out_dir / "trl"), max_steps=opts["steps"],
                     per_device_train_batch_size=opts["batch"], gradient_accumulation_steps=opts["accum"],
                     learning_rate=opts["lr"], seed=opts["seed"], logging_steps=1, save_steps=100000,
                     report_to="none", disable_tqdm=True, use_cpu=True,
                     **({} if bf16 is None else {"bf16": bf16}))
    if opts.get("trl_peft_defaults"):  # peft's own defaults: lora_alpha=8, lora_dropout=0.0
        lora = LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")
    else:  # the same adapter as sftlab's defaults, so the loss comparison is not tilted by the adapter
        from sftlab.config import Config

        d = Config()
        lora = LoraConfig(r=d.lora_r, lora_alpha=d.lora_alpha, lora_dropout=d.lora_dropout,
                          target_modules=d.lora_target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora)
    opts["resolved"] = {"gradient_checkpointing": bool(args.activation_checkpointing), "bf16": bool(args.bf16),
                        "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout}
    trainer.train()
    adapter = out_dir / "model"
    trainer.save_model(str(adapter))
    return adapter


def response_eval_loss(adapter_dir: str | None, examples, batch: int = 8) -> tuple[float, int]:
    """Token-weighted cross entropy of the trained (assistant) tokens of ``examples``, in fp32.

    The same function for both sides: fresh base model (+ the saved LoRA adapter), full logits,
    labels shifted here, padding masked by position.
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from sftlab.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            chunk = examples[i:i + batch]
            L = max(len(e.input_ids) for e in chunk)
            ids = torch.zeros((len(chunk), L), dtype=torch.long)
            labels = torch.full((len(chunk), L), -100, dtype=torch.long)
            att = torch.zeros((len(chunk), L), dtype=torch.long)
            for r, e in enumerate(chunk):
                n = len(e.input_ids)
                ids[r, :n] = torch.tensor(e.input_ids)
                labels[r, :n] = torch.tensor(e.labels)
                att[r, :n] = 1
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / max(count, 1), count


def _eval_examples(n: int):
    from sftlab.config import Config
    from sftlab.data.prepare import prepare

    return prepare(Config(model=MODEL, data=str(EVAL))).examples[:n]


def worker(name: str, opts: dict, result_path: Path) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers

    if opts.get("threads"):
        torch.set_num_threads(int(opts["threads"]))
    import datasets

    # imported before the baseline RSS is taken, like the training process does
    importlib.import_module("peft")
    importlib.import_module("sftlab.train.run")

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if name.startswith("trl"):
        importlib.import_module("trl")
    meter = _Meter()
    meter.install()
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench-train-{name.replace(' ', '-')}-"))
    res: dict = {"config": name}
    if name == "base":
        loss, n = response_eval_loss(None, _eval_examples(opts["eval_examples"]))
        res.update(eval_loss=loss, eval_tokens=n)
        result_path.write_text(json.dumps(res))
        return
    rss0 = _rss_mb()
    if name.startswith("sftlab"):
        precision = "bf16" if "bf16" in name else "fp32" if "fp32" in name else "auto"
        adapter = _run_sftlab(opts, out_dir, gc=name.endswith("gc"), precision=precision)
    else:
        adapter = _run_trl(opts, out_dir, bf16=False if "fp32" in name else None)
    peak = _peak_rss_mb() - rss0
    res.update(real_tokens=meter.real, trained_tokens=meter.trained, padded_tokens=meter.padded,
               micro_batches=meter.micro_batches, train_s=meter.train_s, train_cpu_s=meter.train_cpu_s, peak_mb=peak,
               train_loss_last=statistics.mean(meter.losses[-LAST_N:]) if meter.losses else None,
               n_logged=len(meter.losses), resolved=opts.get("resolved"))
    loss, n = response_eval_loss(str(adapter), _eval_examples(opts["eval_examples"]))
    res.update(eval_loss=loss, eval_tokens=n)
    result_path.write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------
# Parent side: alternate configurations, collect, print


def _spawn(name: str, opts: dict, log_dir: Path) -> dict:
    result = log_dir / f"{name.replace(' ', '-')}-{time.time_ns()}.json"
    log = result.with_suffix(".log")
    cmd = [sys.executable, __file__, "--worker", name, "--opts", json.dumps(opts), "--result", str(result)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if opts.get("threads"):
        env.update(OMP_NUM_THREADS=str(opts["threads"]), MKL_NUM_THREADS=str(opts["threads"]))
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0 or not result.exists():
        tail = log.read_text()[-3000:]
        raise SystemExit(f"worker '{name}' failed (exit {rc}); log {log}:\n{tail}")
    res = json.loads(result.read_text())
    res["process_s"] = time.perf_counter() - t0
    return res


def _med(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=4, help="per-device batch size")
    ap.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate (both sides)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions of every configuration")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per worker (0: torch's default, one per core); 1 is steadier on a busy machine")
    ap.add_argument("--trl-peft-defaults", action="store_true",
                    help="TRL's LoRA with peft's defaults (alpha 8, dropout 0) instead of sftlab's (alpha 32, dropout 0)")
    ap.add_argument("--eval-examples", type=int, default=60, help="held-out examples for the shared eval loss")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from: {', '.join(CONFIGS + EXTRA)}")
    ap.add_argument("--quick", action="store_true", help="4 steps, 1 repetition, 16 eval examples (debugging)")
    ap.add_argument("--json", metavar="FILE", help="also write every run's raw result here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--opts", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, json.loads(a.opts), Path(a.result))
        return 0
    if a.quick:
        a.steps, a.reps, a.eval_examples = 4, 1, 16
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS) - set(EXTRA)
    if unknown:
        ap.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    opts = {"steps": a.steps, "batch": a.batch, "accum": a.accum, "lr": a.lr, "seed": a.seed,
            "eval_examples": a.eval_examples, "threads": a.threads,
            "trl_peft_defaults": a.trl_peft_defaults}
    import transformers
    import trl

    load = os.getloadavg()
    print(f"# bench_train  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"# {platform.node()} | {os.cpu_count()} CPU cores | load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} | "
          f"transformers {transformers.__version__}, trl {trl.__version__}"
          + (f" | ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}" if os.environ.get("ONEDNN_MAX_CPU_ISA") else ""))
    print(f"# model {MODEL}; data {TRAIN.relative_to(ROOT)}; {a.steps} steps x global batch {a.batch * a.accum} "
          f"({a.batch} x {a.accum} accumulation); lr {a.lr:g}; seed {a.seed}; {a.reps} alternating repetitions; "
          f"torch threads per worker: {a.threads or 'default (' + str(os.cpu_count()) + ')'}")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-train-logs-"))
    print(f"# worker logs: {log_dir}", flush=True)
    t_all = time.perf_counter()
    base = _spawn("base", opts, log_dir)
    print(f"base model eval loss (response tokens of {base['eval_tokens']} in {a.eval_examples} held-out examples): "
          f"{base['eval_loss']:.4f}", flush=True)
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(a.reps):
        order = configs if rep % 2 == 0 else list(reversed(configs))
        for name in order:
            r = _spawn(name, opts, log_dir)
            runs[name].append(r)
            print(f"rep {rep + 1} {name:<15} {r['real_tokens'] / r['train_s']:8.1f} real tok/s  train {r['train_s']:6.1f}s  "
                  f"cpu {r['train_cpu_s']:6.1f}s  peak +{r['peak_mb']:.0f} MB  eval loss {r['eval_loss']:.4f}  resolved {r['resolved']}", flush=True)

    print()
    print("| configuration | real tok/s | trained tok/s | train s | train CPU s | real tokens | padded tokens | trained tokens | "
          "peak RSS MB | train loss (last 5, own) | eval loss (shared) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for name in configs:
        rows = runs[name]
        s = {"real_tps": statistics.median(r["real_tokens"] / r["train_s"] for r in rows),
             "trained_tps": statistics.median(r["trained_tokens"] / r["train_s"] for r in rows),
             "train_s": _med(rows, "train_s"), "cpu_s": _med(rows, "train_cpu_s"), "real": _med(rows, "real_tokens"), "padded": _med(rows, "padded_tokens"),
             "trained": _med(rows, "trained_tokens"), "peak_mb": _med(rows, "peak_mb"),
             "train_loss": _med(rows, "train_loss_last"), "eval_loss": _med(rows, "eval_loss")}
        summary[name] = s
        print(f"| {name} | {s['real_tps']:.1f} | {s['trained_tps']:.1f} | {s['train_s']:.1f} | {s['cpu_s']:.1f} | {s['real']:.0f} | "
              f"{s['padded']:.0f} | {s['trained']:.0f} | {s['peak_mb']:.0f} | {s['train_loss']:.4f} | {s['eval_loss']:.4f} |")
    print(f"(medians over {a.reps} runs each; base model eval loss {base['eval_loss']:.4f})")
    print()
    verdicts = []
    if "sftlab default" in summary and "trl default" in summary:
        o, t = summary["sftlab default"], summary["trl default"]
        r_real = o["real_tps"] / t["real_tps"]
        ok = r_real >= 3 and o["eval_loss"] <= t["eval_loss"]
        verdicts.append(ok)
        print(f"sftlab default vs trl default: real tok/s {r_real:.2f}x, trained tok/s {o['trained_tps'] / t['trained_tps']:.2f}x, "
              f"peak memory {o['peak_mb'] / t['peak_mb']:.2f}x, eval loss {o['eval_loss']:.4f} vs {t['eval_loss']:.4f} "
              f"-> target (>= 3x real tok/s at same or lower loss): {'MET' if ok else 'MISSED'}")
    if "sftlab gc" in summary and "trl default" in summary:
        o, t = summary["sftlab gc"], summary["trl default"]
        r_real = o["real_tps"] / t["real_tps"]
        ok = r_real > 1 and o["peak_mb"] <= t["peak_mb"]
        verdicts.append(ok)
        print(f"sftlab gc vs trl (gc on, its default): real tok/s {r_real:.2f}x, trained tok/s "
              f"{o['trained_tps'] / t['trained_tps']:.2f}x, peak memory {o['peak_mb']:.0f} vs {t['peak_mb']:.0f} MB "
              f"({o['peak_mb'] / t['peak_mb']:.2f}x), eval loss {o['eval_loss']:.4f} vs {t['eval_loss']:.4f} "
              f"-> target (faster at no more peak memory): {'MET' if ok else 'MISSED'}")
    if "sftlab fp32" in summary and "trl fp32" in summary:
        o, t = summary["sftlab fp32"], summary["trl fp32"]
        print(f"sftlab fp32 vs trl fp32 (a CPU where bf16 is slow; lower bound): real tok/s {o['real_tps'] / t['real_tps']:.2f}x, "
              f"peak memory {o['peak_mb'] / t['peak_mb']:.2f}x, eval loss {o['eval_loss']:.4f} vs {t['eval_loss']:.4f}")
    for name in EXTRA:
        if name in summary and "trl default" in summary:
            o, t = summary[name], summary["trl default"]
            print(f"what-if {name} vs trl default: real tok/s {o['real_tps'] / t['real_tps']:.2f}x, peak memory "
                  f"{o['peak_mb']:.0f} vs {t['peak_mb']:.0f} MB, eval loss {o['eval_loss']:.4f} vs {t['eval_loss']:.4f}")
    load = os.getloadavg()
    print(f"# total wall {time.perf_counter() - t_all:.0f}s; load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"opts": opts, "base": base, "runs": runs, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

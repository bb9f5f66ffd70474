"""GPU training throughput: sftlab vs TRL's default vs TRL with liger-kernel, on a ~1.7B Llama shape.

One prepared script for a lent GPU (written for an NVIDIA H200; not yet run on one). No weights travel:
the model is SmolLM2-1.7B's configuration (hidden 2048, 24 layers, 32 heads, 32 kv heads,
intermediate 8192, vocab 49152, tied embeddings) with random weights, saved once in bf16; the
tokenizer is a word-level one with the same vocabulary size and a ChatML template, built here.

Grid: method (LoRA r16 alpha32 all-linear, full fine-tuning) x rows (unpacked, packed) x side:
- ``sftlab``: ``sftlab.train.run.train`` with its defaults (precision, checkpointing, attention and
  the liger_kernels / fused_loss / compile_blocks keys all ``auto``) and the shared settings;
- ``trl``: ``trl.SFTTrainer`` with ``SFTConfig`` defaults and the shared settings (TRL 1.x: gradient
  checkpointing on, bf16, the model loaded as saved: bf16);
- ``trl+liger``: the same with ``use_liger_kernel=True``.
Shared: the data (synthetic chats of random words, 200..``--seq-len`` tokens), ``--seq-len``,
per-device batch, optimizer steps, learning rate, seed; no evaluation, no checkpoints.

Each run is a fresh subprocess (its own peak memory). Measured, the same way on every side:
- tokens/s: real tokens (``attention_mask.sum()``, or every id of a padding-free packed row) of the
  micro-batches ``Trainer.training_step`` receives, over the wall time of the steps after ``--warmup``
  steps (CUDA synchronised at each step end);
- MFU: model FLOPs per second / the GPU's dense bf16 peak (``--peak-tflops``, default 989 for the
  H100/H200 SXM: NVIDIA's dense BF16 tensor-core figure, no sparsity). Model FLOPs per real token:
  full fine-tuning 6 N (forward 2N, backward 4N), LoRA 4 N (no weight gradients for frozen weights),
  N the parameters in matmuls (embeddings excluded, the LM head included), plus causal attention
  6 * layers * hidden * mean row length (x 2/3 for LoRA, likewise);
- peak memory: ``torch.cuda.max_memory_reserved()``.

Prints one row per run and the ratios sftlab / trl and sftlab / trl+liger.

    python benchmarks/bench_gpu.py                    # the full grid on the GPU (~6-8 minutes on an H200)
    python benchmarks/bench_gpu.py --configs lora-unpacked --sides sftlab,trl
    python benchmarks/bench_gpu.py --dry-run          # a tiny shape on the CPU: checks the logic only

On a lent machine (no package index there): ``bash benchmarks/gpu_wheels.sh`` here fetches the wheels it
lacks into ``.whl/`` (about 17 MB), and its header has the one device command that installs them and
runs this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE_1_7B = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=8192, vocab_size=49152, max_position_embeddings=8192, rope_theta=130000,
                  rms_norm_eps=1e-5, tie_word_embeddings=True)
SHAPE_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=128, vocab_size=512, max_position_embeddings=512, rope_theta=10000,
                  rms_norm_eps=1e-5, tie_word_embeddings=True)
CONFIGS = ("lora-unpacked", "lora-packed", "full-unpacked", "full-packed")
SIDES = ("sftlab", "trl", "trl+liger")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# -- set-up: model, tokenizer, data (once, in the parent) ----------------------------------------
def build_assets(out: Path, shape: dict, n_rows: int, seq_len: int, seed: int = 0) -> tuple[Path, Path]:
    """A random-weight Llama of ``shape`` with a word-level ChatML tokenizer in ``out/model``, and
    ``n_rows`` chats of random words (rows of ~200..seq_len tokens) in ``out/train.jsonl``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = [f"w{i}" for i in range(shape["vocab_size"] - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words + ["\n"])}
    vocab = {t: i for t, i in vocab.items() if i < shape["vocab_size"]}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    model_dir = out / "model"
    torch.manual_seed(seed)
    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    del model
    rng = random.Random(seed)
    lo = min(200, seq_len // 2)
    with open(out / "train.jsonl", "w") as f:
        for _ in range(n_rows):
            n = rng.randint(lo, seq_len - 16)
            user = " ".join(rng.choice(words[:2000]) for _ in range(n // 2))
            reply = " ".join(rng.choice(words[:2000]) for _ in range(n - n // 2))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    return model_dir, out / "train.jsonl"


def model_flops_per_token(shape: dict, method: str, mean_len: float) -> float:
    """Model FLOPs per real token of one training step (see the module docstring)."""
    h, L, i, v = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    n_matmul = L * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v
    per_param = 6 if method == "full" else 4
    attention = 6 * L * h * mean_len  # causal: half of QK^T and PV, forward + backward
    return per_param * n_matmul + attention * per_param / 6


# -- worker: one run in its own process ----------------------------------------------------------
class Meter:
    """Real tokens per micro-batch (a class-level patch of ``Trainer.training_step``) and the time of
    each optimizer step end (a callback), CUDA synchronised."""

    def __init__(self):
        self.tokens = 0
        self.rows = 0
        self.marks: list[tuple[float, int]] = []

    def install(self):
        import transformers

        meter, orig = self, transformers.Trainer.training_step

        def training_step(trainer, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            ids = inputs["input_ids"]
            if mask is not None and mask.dim() == 2:
                meter.tokens += int(mask.sum())
            else:  # padding-free packed rows: every id is a real token
                meter.tokens += int(ids.numel())
            meter.rows += int(ids.shape[0]) if "position_ids" not in inputs else int(
                (inputs["position_ids"] == 0).sum())
            return orig(trainer, model, inputs, *args, **kwargs)

        transformers.Trainer.training_step = training_step

    def callback(self):
        import torch
        from transformers import TrainerCallback

        meter = self

        class Marks(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                meter.marks.append((time.perf_counter(), meter.tokens))

        return Marks()


def run_sftlab(o: dict, meter: Meter) -> dict:
    from sftlab.config import Config
    from sftlab.train.run import train

    cfg = Config(model=o["model"], data=o["data"], output_dir=o["out"], method=o["method"], packing=o["packed"],
                 max_seq_length=o["seq_len"], batch_size=o["batch"], gradient_accumulation=1,
                 max_steps=o["steps"], learning_rate=o["lr"], seed=0, logging_steps=1, save_steps=10**6,
                 eval_steps=10**6, lora_r=16, lora_alpha=32, lora_target_modules="all-linear")
    s = train(cfg, quiet=True, callbacks=[meter.callback()])
    return {"precision": s.get("precision"), "gradient_checkpointing": s.get("gradient_checkpointing"),
            "kernels": {k["name"]: k["enabled"] for k in s.get("kernels") or []}}


def run_trl(o: dict, meter: Meter, liger: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(o["data"]).read_text().splitlines() if line.strip()]
    cuda = torch.cuda.is_available()
    args = SFTConfig(output_dir=o["out"], max_steps=o["steps"], per_device_train_batch_size=o["batch"],
                     gradient_accumulation_steps=1, learning_rate=o["lr"], seed=0, logging_steps=1,
                     save_strategy="no", report_to="none", disable_tqdm=True, max_length=o["seq_len"],
                     packing=o["packed"], use_liger_kernel=liger, use_cpu=not cuda, bf16=cuda)
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") \
        if o["method"] == "lora" else None
    trainer = SFTTrainer(model=o["model"], args=args, train_dataset=Dataset.from_list(rows), peft_config=peft,
                         callbacks=[meter.callback()])
    trainer.train()
    return {"gradient_checkpointing": bool(args.gradient_checkpointing), "bf16": bool(args.bf16), "liger": liger}


def worker(o: dict) -> dict:
    import torch

    meter = Meter()
    meter.install()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    side = o["side"]
    info = run_sftlab(o, meter) if side == "sftlab" else run_trl(o, meter, liger=side == "trl+liger")
    marks = meter.marks[o["warmup"]:] if len(meter.marks) > o["warmup"] + 1 else meter.marks
    (t0, k0), (t1, k1) = (marks[0], marks[-1]) if len(marks) > 1 else ((0.0, 0), (1.0, 0))
    tps = (k1 - k0) / max(t1 - t0, 1e-9)
    mean_len = meter.tokens / max(meter.rows, 1)
    flops = model_flops_per_token(o["shape"], o["method"], mean_len) * tps
    return {"side": side, "config": o["config"], "tokens_per_s": tps, "steps_timed": len(marks) - 1,
            "mean_row_tokens": mean_len, "model_tflops": flops / 1e12, "mfu": flops / (o["peak_tflops"] * 1e12),
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
            "resolved": info}


# -- parent: the grid, one subprocess per run ----------------------------------------------------
def run_one(o: dict, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(o, f)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        p = subprocess.run([sys.executable, __file__, "--worker", f.name], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"side": o["side"], "config": o["config"], "error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"side": o["side"], "config": o["config"], "error": (p.stderr or p.stdout).strip()[-600:]}
    return json.loads(lines[-1][len("RESULT "):])


def skip_reason(side: str) -> str | None:
    if side != "sftlab" and importlib.util.find_spec("trl") is None:
        return "trl is not installed"
    if side == "trl+liger":
        import torch

        if not torch.cuda.is_available():
            return "liger-kernel needs a CUDA GPU"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
    return None


def table(results: list[dict]) -> str:
    head = "| config | side | tokens/s | MFU | model TFLOP/s | peak reserved GiB | resolved |\n|---|---|---:|---:|---:|---:|---|"
    rows = []
    for r in results:
        if "error" in r or "skipped" in r:
            rows.append(f"| {r['config']} | {r['side']} | - | - | - | - | {r.get('skipped') or r['error'][:120]} |")
            continue
        mem = f"{r['peak_reserved_gib']:.1f}" if r["peak_reserved_gib"] is not None else "-"
        rows.append(f"| {r['config']} | {r['side']} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
                    f"{r['model_tflops']:.1f} | {mem} | {r['resolved']} |")
    return "\n".join([head, *rows])


def ratios(results: list[dict]) -> list[str]:
    ok = {(r["config"], r["side"]): r for r in results if "tokens_per_s" in r}
    out = []
    for config in dict.fromkeys(r["config"] for r in results):
        s = ok.get((config, "sftlab"))
        for peer in ("trl", "trl+liger"):
            p = ok.get((config, peer))
            if s and p:
                out.append(f"{config}: sftlab / {peer} tokens/s {s['tokens_per_s'] / p['tokens_per_s']:.2f}x, "
                           f"MFU {100 * s['mfu']:.1f}% vs {100 * p['mfu']:.1f}%")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shape, a few steps, CPU allowed: checks the logic")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20; dry run 3)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 5; dry run 1)")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default 8; dry run 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="longest row in tokens (default 1024; dry run 64)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM: 989)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(Path(a.worker).read_text()))), flush=True)
        return 0
    dry = a.dry_run
    steps, warmup = a.steps or (3 if dry else 20), a.warmup if a.warmup is not None else (1 if dry else 5)
    batch, seq_len = a.batch or (2 if dry else 8), a.seq_len or (64 if dry else 1024)
    shape = SHAPE_TINY if dry else SHAPE_1_7B
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    t0 = time.perf_counter()
    model_dir, data = build_assets(work, shape, n_rows=steps * batch * 2, seq_len=seq_len)
    print(f"# bench_gpu {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; shape {shape}; {steps} steps "
          f"(first {warmup} untimed) x batch {batch}, rows up to {seq_len} tokens, lr {a.lr:g}; peak {a.peak_tflops:g} "
          f"TFLOP/s; assets built in {time.perf_counter() - t0:.0f}s", flush=True)
    results = []
    for config in a.configs.split(","):
        method, rows = config.split("-")
        for side in a.sides.split(","):
            reason = skip_reason(side)
            if reason:
                results.append({"config": config, "side": side, "skipped": f"skipped: {reason}"})
                continue
            o = dict(model=str(model_dir), data=str(data), out=str(work / f"{config}-{side}"), method=method,
                     packed=rows == "packed", seq_len=seq_len, batch=batch, steps=steps, warmup=warmup, lr=a.lr,
                     side=side, config=config, shape=shape, peak_tflops=a.peak_tflops)
            r = run_one(o, a.timeout)
            results.append(r)
            print(json.dumps(r), flush=True)
    print(table(results))
    for line in ratios(results):
        print(line)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

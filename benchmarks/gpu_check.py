"""GPU path check and measurement, for a lent GPU machine (one short prepared run).

Checks on CUDA: packed == unpacked loss with the block mask (SDPA), chunked loss == full cross entropy
in bf16, bf16 mixed-precision training (full and LoRA, checkpointing on/off) with tokens/s and
torch.cuda.max_memory_allocated against the `sftlab plan` estimate, and a QLoRA (bitsandbytes NF4) run.

The model has SmolLM2-135M's exact config and tokenizer with random weights (the GGUF is too large to
carry): shapes, speed and memory are the real ones; loss values are not meaningful.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --model-config DIR [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path


def build_model(config_dir: str, out: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return out


def check_packing(model_dir: str, device: str) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.data.collate import PackedCollator, PadCollator
    from sftlab.data.formats import load_conversations
    from sftlab.data.masking import Labeler
    from sftlab.data.packing import pack
    from sftlab.data.templates import resolve_template
    from sftlab.demo_data import demo_path

    tok = AutoTokenizer.from_pretrained(model_dir)
    convs = load_conversations(str(demo_path("train")))[:12]
    exs, _ = Labeler(tok, resolve_template(None, tok), masking="all").encode(convs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).to(device).eval()

    def summed(batch):
        kw = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**kw).logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(device)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")

    with torch.no_grad():
        ref = sum(summed(PadCollator(tok.pad_token_id)([e])) for e in exs)
        packed = summed(PackedCollator(tok.pad_token_id, mode="mask")(pack(exs, 512)))
    return {"unpacked_sum": float(ref), "packed_sum": float(packed), "rel_diff": abs(float(packed - ref)) / float(ref)}


def check_chunked_loss(device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from sftlab.core.loss import sft_loss

    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(4, 256, 576, generator=g).to(device, torch.bfloat16).requires_grad_()
    head = torch.nn.Linear(576, 49152, bias=False).to(device, torch.bfloat16)
    labels = torch.randint(0, 49152, (4, 256), generator=g).to(device)
    labels[:, :100] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = sft_loss(hidden, head, labels, chunk_size=256)
        logits = head(hidden)[:, :-1].float()
    ref = F.cross_entropy(logits.reshape(-1, 49152), labels[:, 1:].reshape(-1), ignore_index=-100)
    return {"ours": float(ours), "full": float(ref), "abs_diff": abs(float(ours - ref))}


def run_train(model_dir: str, data: str, *, method: str, batch: int, seq: int, ckpt: bool, steps: int) -> dict:
    import torch

    from sftlab.config import load_config
    from sftlab.models import model_config
    from sftlab.plan.memory import CUDA_OVERHEAD_BYTES, TrainSetup, estimate_memory
    from sftlab.plan.shapes import shape_from_config
    from sftlab.train.run import train

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = tempfile.mkdtemp()
    cfg = load_config(None, dict(model=model_dir, data=data, method=method, packing=True, max_seq_length=seq,
                                 batch_size=batch, gradient_accumulation=1, max_steps=steps, logging_steps=max(1, steps // 2),
                                 learning_rate=1e-4, gradient_checkpointing=ckpt, output_dir=out, save_steps=10_000,
                                 precision="bf16", warmup_ratio=0.0))
    t0 = time.perf_counter()
    s = train(cfg, quiet=True)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "train"]
    summ = json.loads(Path(out, "summary.json").read_text())
    frac = max(1e-3, min(1.0, summ["trained_tokens"] / max(summ["train_tokens"], 1)))
    e = estimate_memory(shape_from_config(model_config(model_dir), "smollm2"),
                        TrainSetup(method=method, batch=batch, seq_len=seq, gradient_checkpointing=ckpt,
                                   device="cuda", precision="bf16", trained_fraction=frac))
    # max_memory_allocated counts tensors only: leave out the CUDA context and allocator overhead.
    est = e.total_bytes - e.breakdown.get("cuda_context", 0) - (CUDA_OVERHEAD_BYTES if "overhead" in e.breakdown else 0)
    return {"method": method, "batch": batch, "seq": seq, "ckpt": ckpt, "steps": s["steps"],
            "tok_s_last": rows[-1]["tokens_per_second"] if rows else None, "wall_s": round(wall, 1),
            "peak_mib": round(peak / 2**20), "estimate_mib": round(est / 2**20), "trained_fraction": round(frac, 3),
            "est_err_pct": round(100 * (est - peak) / peak, 1), "final_loss": rows[-1]["loss"] if rows else None}


def run_defaults(model_dir: str, data: str, steps: int) -> dict:
    """sftlab's default configuration (no packing, length-grouped batches, attn_implementation auto,
    precision auto, lora_dropout 0), as `sftlab train` runs it on a GPU: must stay on SDPA/bf16."""
    import torch

    from sftlab.config import load_config
    from sftlab.train.run import train

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = tempfile.mkdtemp()
    cfg = load_config(None, dict(model=model_dir, data=data, max_steps=steps, output_dir=out, save_steps=10_000,
                                 logging_steps=max(1, steps // 2), learning_rate=1e-4))
    t0 = time.perf_counter()
    s = train(cfg, quiet=True)
    resolved = Path(out, "config.yaml").read_text()
    return {"run": "defaults", "steps": s["steps"], "wall_s": round(time.perf_counter() - t0, 1),
            "tok_s": round(s["tokens_per_second"]), "peak_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20),
            "attention_batches": s.get("attention_batches"), "final_loss": s["final_train_loss"],
            "resolved": {k: v for k, v in (line.split(": ", 1) for line in resolved.splitlines() if ": " in line)
                         if k in ("precision", "gradient_checkpointing", "attn_implementation", "lora_dropout", "batch_size")}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import torch
    import transformers

    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    dev = "cuda"
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name(0),
            "bf16": torch.cuda.is_bf16_supported()}
    print(json.dumps({"info": info}), flush=True)
    from sftlab.demo_data import demo_path

    model_dir = build_model(args.model_config, tempfile.mkdtemp())
    print(json.dumps({"packing": check_packing(model_dir, dev)}), flush=True)
    print(json.dumps({"chunked_loss_bf16": check_chunked_loss(dev)}), flush=True)
    steps = 6 if args.quick else 12
    settings = [("lora", 8, 512, False), ("lora", 8, 512, True), ("full", 8, 512, False), ("full", 8, 512, True),
                ("lora", 16, 1024, False), ("full", 16, 1024, True)]
    if args.quick:
        settings = settings[:2]
    for method, b, s, ck in settings:
        try:
            r = run_train(model_dir, str(demo_path("train")), method=method, batch=b, seq=s, ckpt=ck, steps=steps)
        except Exception as exc:  # report and go on: one failure must not hide the others
            r = {"method": method, "batch": b, "seq": s, "ckpt": ck, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"train": r}), flush=True)
    try:
        r = run_defaults(model_dir, str(demo_path("train")), steps)
    except Exception as exc:
        r = {"run": "defaults", "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({"train": r}), flush=True)
    try:
        importlib.import_module("bitsandbytes")  # QLoRA needs it: report its absence as this run's error

        r = run_train(model_dir, str(demo_path("train")), method="qlora", batch=8, seq=512, ckpt=True, steps=steps)
    except Exception as exc:
        r = {"method": "qlora", "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({"train": r}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

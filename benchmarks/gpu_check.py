"""GPU path check and measurement, for a lent GPU machine (one short prepared run).

Checks on CUDA: packed == unpacked loss with the block mask (SDPA), chunked loss == full cross entropy
in bf16, bf16 mixed-precision training (full and LoRA, checkpointing on/off) with tokens/s and
torch.cuda.max_memory_allocated against the `sftlab plan` estimate, a QLoRA (bitsandbytes NF4) run, and
FSDP2 / DeepSpeed ZeRO-2 / ZeRO-3 (examples/deepspeed/*.json) with LoRA and full fine-tuning under
torchrun over every GPU, each loss curve against plain DDP's (``--sharding-only`` runs just those).

The model has SmolLM2-135M's exact config and tokenizer with random weights (the GGUF is too large to
carry): shapes, speed and memory are the real ones; loss values are not meaningful.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --model-config DIR [--quick] [--sharding-only]
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


_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHARDING = {"ddp": {}, "fsdp2": {"fsdp": "full_shard auto_wrap"},
            "zero2": {"deepspeed": str(_EXAMPLES / "deepspeed" / "zero2.json")},
            "zero3": {"deepspeed": str(_EXAMPLES / "deepspeed" / "zero3.json")}}


def sharded_child(model_dir: str, data: str, kind: str, method: str, steps: int, out: str) -> int:
    """One process of a torchrun launch: train with ``kind`` sharding and record, from global rank 0,
    what the Trainer really ran (FSDP2 parameters are DTensors; DeepSpeed's engine wraps the model)."""
    import os

    from transformers import TrainerCallback

    from sftlab.config import load_config
    from sftlab.train.run import train

    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if not seen:
                p = next(model.parameters())
                seen.update(param_type=type(p).__name__, placements=str(getattr(p, "placements", None)))

    cfg = load_config(None, dict(model=model_dir, data=data, method=method, max_steps=steps, logging_steps=1,
                                 batch_size=4, gradient_accumulation=1, learning_rate=1e-4, warmup_ratio=0.0,
                                 lr_scheduler="constant", group_by_length=False, precision="bf16",
                                 gradient_checkpointing=True, save_steps=10_000, output_dir=out, **SHARDING[kind]))
    s = train(cfg, quiet=True, callbacks=[Probe()])
    if int(os.environ.get("RANK", "0")) == 0:
        rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
        Path(out, "check.json").write_text(json.dumps({
            **seen, "steps": s["steps"], "losses": [r["loss"] for r in rows if r.get("split") == "train"],
            "model_saved": sorted(p.name for p in Path(out, "model").iterdir()), "world": os.environ.get("WORLD_SIZE")}))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def run_sharded(model_dir: str, data: str, kind: str, method: str, steps: int) -> dict:
    """torchrun over every GPU of the machine: FSDP2 or DeepSpeed ZeRO-2/3 (or plain DDP, the reference)."""
    import importlib.util
    import socket
    import subprocess

    import torch

    if kind.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        return {"kind": kind, "method": method, "error": "deepspeed is not installed"}
    out = tempfile.mkdtemp()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={max(1, torch.cuda.device_count())}",
           f"--master-port={port}", __file__, "--sharded-child", kind, method, str(steps), out,
           "--model-config", model_dir, "--data", data]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    r = {"kind": kind, "method": method, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        return {**r, "error": "\n".join(ln for ln in proc.stderr.splitlines() if "rror" in ln)[-2000:]}
    return {**r, **json.loads(Path(out, "check.json").read_text())}


def check_sharding(model_dir: str, data: str, steps: int) -> None:
    """FSDP2 and ZeRO-2/3 with LoRA and full fine-tuning; each loss curve against DDP's (same batch)."""
    for method in ("lora", "full"):
        ref = None
        for kind in SHARDING:
            try:
                r = run_sharded(model_dir, data, kind, method, steps)
            except Exception as exc:  # report and go on: one failure must not hide the others
                r = {"kind": kind, "method": method, "error": f"{type(exc).__name__}: {exc}"}
            if kind == "ddp":
                ref = r.get("losses")
            elif ref and r.get("losses"):
                r["max_abs_loss_diff_vs_ddp"] = max(abs(a - b) for a, b in zip(ref, r["losses"]))
            print(json.dumps({"sharding": r}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sharding-only", action="store_true", help="only the FSDP2/DeepSpeed runs")
    ap.add_argument("--sharded-child", nargs=4, metavar=("KIND", "METHOD", "STEPS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sharded_child:  # one torchrun process of run_sharded; --model-config is the built model here
        kind, method, steps, out = args.sharded_child
        return sharded_child(args.model_config, args.data, kind, method, int(steps), out)
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
    steps = 6 if args.quick else 12
    if args.sharding_only:
        check_sharding(model_dir, str(demo_path("train")), steps)
        return 0
    print(json.dumps({"packing": check_packing(model_dir, dev)}), flush=True)
    print(json.dumps({"chunked_loss_bf16": check_chunked_loss(dev)}), flush=True)
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
    check_sharding(model_dir, str(demo_path("train")), steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

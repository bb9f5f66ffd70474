"""Plain-text reports for `sftlab recommend` and `sftlab plan`."""

from __future__ import annotations

from sftlab.plan.fit import Plan
from sftlab.plan.memory import BATCH_LIMIT
from sftlab.plan.recommend import Recommendation
from sftlab.plan.shapes import SEQ_LIMIT, human_count, longest_row

_PART_NAMES = {
    "weights": "weights",
    "gradients": "gradients",
    "gradients (output head)": "gradients (output head, in backward)",
    "optimizer": "optimizer state",
    "adapter_weights": "adapter weights",
    "adapter_gradients": "adapter gradients",
    "adapter_optimizer": "adapter optimizer state",
    "activations": "activations",
    "logits": "logits (one loss chunk, with gradients)",
    "fused loss": "fused loss (liger's chunk, hidden-state gradient)",
    "embedding gradient (transient)": "embedding gradient (transient)",
    "overhead": "framework overhead",
    "malloc retention": "freed temporaries glibc's malloc keeps",
    "cuda_context": "CUDA context",
}


def gb(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def render_recommendation(rec: Recommendation) -> str:
    lines = [f"recommended approach: {rec.approach}", "why:"]
    lines += [f"  - {r}" for r in rec.reasons]
    if rec.caveats:
        lines.append("watch out:")
        lines += [f"  - {c}" for c in rec.caveats]
    uc = rec.use_case
    lines.append(f"(use case: {uc['complexity']} task, {uc['examples']} examples, strict format "
                 f"{'yes' if uc['strict_format'] else 'no'}, domain-specific {'yes' if uc['domain_specific'] else 'no'}, "
                 f"latency sensitivity {uc['latency']}, compute {uc['compute']}, knowledge updates {uc['knowledge_updates']}; "
                 f"rule {rec.rule})")
    if rec.assumed:
        lines.append(f"assumed, as not given: {', '.join(rec.assumed)} (give them as flags or in USE_CASE.yaml)")
    return "\n".join(lines)


def render_plan(plan: Plan) -> str:
    e, s, m = plan.estimate, plan.estimate.setup, plan.model
    lines = [
        f"model: {m['name']}: {human_count(m['params'])} parameters, {m['n_layers']} layers, hidden {m['hidden']}, "
        f"{m['n_heads']} heads ({m['n_kv_heads']} key-value), intermediate {m['intermediate']}, vocabulary {m['vocab']}"
        f"{', tied embeddings' if m['tied_embeddings'] else ''}",
        f"setup: {s['method']}, batch {s['batch']} x {s['seq_len']} tokens"
        f"{' x accumulation ' + str(s['grad_accum']) if s['grad_accum'] > 1 else ''}, {s['precision']} on {s['device']}, "
        f"{s['optimizer']}, checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
        + (f", LoRA r={s['lora_r']} alpha {s['lora_alpha']} dropout {s['lora_dropout']}" if s["method"] in ("lora", "qlora") else "")
        + (f", {s['prefix_tokens']} virtual tokens" if s["method"] == "prefix" else "")
        + f"; {e.trainable_params:,} trainable parameters",
        "",
        f"peak memory: {gb(e.total_bytes)} (at the {e.peak_phase})",
    ]
    width = max(len(_PART_NAMES.get(k, k)) for k in e.breakdown)
    for k, v in e.breakdown.items():
        lines.append(f"  {_PART_NAMES.get(k, k):<{width}}  {gb(v):>10}")
    others = {k: v for k, v in e.phases.items() if k != e.peak_phase}
    if others:
        lines.append("  other moments: " + ", ".join(f"{k} {gb(v)}" for k, v in others.items()))
    if s["device"] == "cpu":
        lines.append("  (peak resident memory of the `sftlab train` process, its baseline included, "
                     + {"glibc": "with glibc's malloc as train runs it, keeping freed pages; SFTLAB_MALLOC=lean returns freed "
                                 "memory to the OS instead: slower steps, no retention)",
                        "lean": "with SFTLAB_MALLOC=lean, which returns freed memory to the OS)",
                        "other": "live tensors only: this C library's malloc is not modelled)"}[s["malloc"]])
    per = e.activation_bytes_per_layer
    lines.append(f"  activations per layer: {gb(per['no_checkpointing'])} without checkpointing, "
                 f"{gb(per['checkpointing'])} with")
    lines.append("")
    lines.append("fits:")
    for name, f in plan.fits.items():
        mark = "yes" if f["fits"] else "no "
        extra = f" ({f['note']})" if f.get("note") else ""
        lines.append(f"  {mark}  {name}: needs {gb(f['needed_bytes'])} of {gb(f['capacity_bytes'])}{extra}")
    b = plan.budget
    lines.append("")
    within = longest_row(m.get("context") or 0, s["method"], s["prefix_tokens"])
    capped = m.get("context") and b["max_seq_len"] == within
    # where the search stops, the budget holds that much at least
    lines.append(f"budget {gb(b['bytes'])} ({b['source']}): largest batch at {s['seq_len']} tokens: {b['max_batch'] or 'none'}"
                 f"{' or more' if b['max_batch'] == BATCH_LIMIT else ''}; longest sequence at batch {s['batch']}: "
                 f"{b['max_seq_len'] or 'none'}{' or more' if b['max_seq_len'] == SEQ_LIMIT else ''}"
                 + ((" (the model's context" + (" after the prefix)" if within < m["context"] else ")")) if capped else ""))
    r = plan.recommended
    if r.fits:
        lines.append(f"recommended: {r.method}, batch {r.batch} x accumulation {r.grad_accum}, checkpointing "
                     f"{'on' if r.gradient_checkpointing else 'off'}, learning rate {r.learning_rate:g} "
                     f"-> {gb(r.estimated_bytes)} of the {gb(b['bytes'])} budget (at most 90% of it: 10% kept spare)")
    else:
        lines.append("recommended: nothing tried fits this budget")
    lines += [f"  - {n}" for n in r.notes]
    return "\n".join(lines)

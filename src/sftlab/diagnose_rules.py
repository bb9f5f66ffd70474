"""The rules of `sftlab diagnose`: each one ``(RunData, Thresholds) -> Finding | None``.

A rule reads the parsed run (:class:`RunData`), reports the numbers and steps it saw as evidence and
concrete config changes as fixes, or raises :class:`Skip` when the run lacks the data to judge.
:data:`RULES` lists them in the order they run; :mod:`sftlab.diagnose` runs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from sftlab.config import Config
from sftlab.core.errors import SftlabError
from sftlab.core.findings import Finding
from sftlab.data.templates import BUILTIN, ChatTemplate
from sftlab.data.types import Message
from sftlab.diagnose_progress import (
    _cfg,
    _ended_by,
    _epochs_trained,
    _finite,
    _last_checkpoint,
    _num,
    _steps,
    _train_longer,
)
from sftlab.eval.compare import forgetting
from sftlab.rundir import RunDir, Summary


@dataclass
class RunData:
    """What the rules read, parsed once (see :func:`sftlab.diagnose.load_run`)."""

    dir: RunDir
    config: Config
    train: list[dict]  # train rows sorted by step
    evals: list[dict]  # eval rows sorted by step
    summary: Summary | None  # None: the run did not finish (no summary.json)

    @property
    def run_dir(self) -> Path:
        return self.dir.path


@dataclass
class Thresholds:
    """When a symptom counts as a problem. Losses are in nats per token."""

    overfit_gap: float = 0.25  # eval loss minus recent train loss
    overfit_min_rise: float = 0.01  # eval loss above its best by at least this
    min_evals: int = 3  # evaluations needed before judging overfitting
    forgetting_rise: float = 0.10  # relative rise of general-data loss (0.10 = 10%)
    format_min: float = 0.80  # format adherence below this is a problem
    repetition_max: float = 0.20  # mean n-gram repetition rate above this is a problem
    loss_explode: float = 2.0  # train loss above this multiple of its first value
    grad_explode: float = 10.0  # gradient norm above this multiple of the median of the (up to 10) logged steps before it
    truncation_warn: float = 0.05  # share of examples dropped/truncated that is a warning (any is info)
    worse_than_base: float = 0.5  # eval loss of the fine-tune above the base model's by this share (0.5 = 50%)
    plateau_drop: float = 0.05  # train loss that fell by less than this share over the run did not learn


class Skip(Exception):
    """A rule that cannot judge this run (not enough data); the message says why."""


def _g(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) and math.isfinite(x) and abs(x) < 0.01 else (
        f"{x:.3f}" if isinstance(x, float) and math.isfinite(x) else str(x))



# --- the evals before/after written by `sftlab eval --save` / make demo ----------------------------

def _eval_result(summary: Summary | None, which: str) -> dict | None:
    """The 'after' (or 'before') metrics of summary.eval, whichever shape it has."""
    ev = summary.eval if summary else None
    if not isinstance(ev, dict):
        return None
    if ev.get("kind") == "single":
        return ev.get("result", {}).get("metrics") if which == "after" else None
    part = ev.get(which)
    return part.get("metrics") if isinstance(part, dict) else None


def _eval_settings(summary: Summary | None) -> dict:
    """The generation settings of the final eval (summary.eval), {} without one."""
    ev = summary.eval if summary else None
    part = (ev.get("result") if ev.get("kind") == "single" else ev.get("after")) if isinstance(ev, dict) else None
    got = part.get("settings") if isinstance(part, dict) else None
    return got if isinstance(got, dict) else {}


def _latest_gen(run: RunData, key: str) -> tuple[float, str] | None:
    """(value, where) of a generation metric: the final eval result, else the last eval row with it."""
    after = _eval_result(run.summary, "after")
    if after and _finite(after.get(key)):
        return float(after[key]), "the final eval"
    for r in reversed(run.evals):
        if _finite(r.get(f"gen_{key}")):
            return float(r[f"gen_{key}"]), f"the eval at step {r.get('step')}"
    return None


def _lr(run: RunData) -> str:
    lr = _cfg(run, "learning_rate")
    if isinstance(lr, (int, float)):
        return f"learning_rate: {lr:g} -> {lr / 2:g}"
    return "learning_rate: halve it"


def rule_interrupted(run: RunData, th: Thresholds) -> Finding | None:
    s = run.summary
    if s is not None and s.stopped != "interrupted":
        return None
    steps, max_steps, epochs, done = _steps(run), _cfg(run, "max_steps", -1), _cfg(run, "epochs"), _epochs_trained(run)
    if isinstance(max_steps, int) and max_steps > 0:
        of = f" of {max_steps}"
    elif steps and done and isinstance(epochs, (int, float)):
        of = f" of about {round(steps * epochs / done)} ({done:.2g} of {epochs:g} epochs)"
    else:
        of = ""
    at = f"at step {steps}{of}" if steps else "before its first logged step"
    ckpt = _last_checkpoint(run)
    evidence = [f"summary.json: stopped = interrupted{f' by {s.signal}' if s.signal else ''}" if s else
                "no summary.json: training is still running, or it was killed before it could write one"]
    evidence.append("a model was saved in model/" if run.dir.model_dir.is_dir() and any(run.dir.model_dir.iterdir())
                    else "no model was saved (model/ is missing or empty): eval, export and chat have nothing to load")
    evidence.append(f"last complete checkpoint: checkpoints/{ckpt}" if ckpt else "no complete checkpoint was saved")
    resume = (f"resume from {ckpt}: sftlab train CONFIG --output-dir {run.run_dir} --resume "
              f"(the same config; {run.dir.config_path} holds it resolved)")
    fixes = [resume] if ckpt else [f"train again: sftlab train CONFIG --output-dir {run.run_dir} "
                                   "(no checkpoint to resume from; lower save_steps to checkpoint more often)"]
    sev = "warning" if s is not None else "info"
    return Finding("interrupted", sev, f"the run was interrupted {at}" if s else f"the run did not finish (no summary.json); last logged {at}",
                   evidence=evidence, fixes=fixes, data={"steps": steps, "checkpoint": ckpt})


def rule_overfitting(run: RunData, th: Thresholds) -> Finding | None:
    ev = [(r.get("step"), float(r["eval_loss"])) for r in run.evals if _finite(r.get("eval_loss"))]
    if len(ev) < th.min_evals:
        raise Skip(f"{len(ev)} evaluations, need {th.min_evals}")
    tr = [(r.get("step"), float(r["loss"])) for r in run.train if _finite(r.get("loss"))]
    if len(tr) < 2:
        raise Skip("fewer than 2 train-loss rows")
    best_i = min(range(len(ev)), key=lambda i: ev[i][1])
    best_step, best = ev[best_i]
    last_step, last = ev[-1]
    rising = best_i < len(ev) - 1 and last > best + th.overfit_min_rise and last >= ev[-2][1]
    before = [l for s, l in tr if (s or 0) <= (best_step or 0)][-3:] or [tr[0][1]]
    recent = [l for _, l in tr[-3:]]
    tr_best, tr_last = sum(before) / len(before), sum(recent) / len(recent)
    falling = tr_last < tr_best
    gap = last - tr_last
    if not (rising and falling and gap > th.overfit_gap):
        return None
    fixes = []
    epochs, steps = _cfg(run, "epochs"), _steps(run) or (tr[-1][0] or 0)
    done = _epochs_trained(run)
    if done is None and _ended_by(run) == "epochs":
        done = epochs  # no record of the epochs trained: a run that was not cut short trained them all
    if _ended_by(run) == "max_steps" and best_step and steps and best_step < steps:
        fixes.append(f"max_steps: {_cfg(run, 'max_steps')} -> {best_step} (eval loss was lowest at step {best_step} of {steps})")
    elif isinstance(epochs, (int, float)) and isinstance(done, (int, float)) and steps and best_step:
        better = max(0.5, math.ceil(done * best_step / steps * 2) / 2)  # epochs trained by the best step
        if better < epochs:
            fixes.append(f"epochs: {epochs:g} -> {better:g} (eval loss was lowest at step {best_step} of {steps})")
    if not _cfg(run, "load_best_model_at_end", True):
        fixes.append("load_best_model_at_end: false -> true")
    if _cfg(run, "early_stopping_patience", 0) in (0, None) or _cfg(run, "early_stopping_patience", 0) > 3:
        fixes.append(f"early_stopping_patience: {_cfg(run, 'early_stopping_patience')} -> 2")
    if _cfg(run, "method") in ("lora", "qlora"):
        d = _cfg(run, "lora_dropout", 0.0)
        fixes.append(f"lora_dropout: {d:g} -> {max(0.1, d * 2):g}")
    wd = _cfg(run, "weight_decay", 0.0)
    fixes.append(f"weight_decay: {wd:g} -> {max(0.1, wd * 2):g}")
    fixes.append("more (or more varied) training data")
    return Finding("overfitting", "warning", "eval loss rises while train loss falls", evidence=[
        f"eval loss {_g(best)} at step {best_step} (best) -> {_g(last)} at step {last_step}",
        f"train loss {_g(tr_best)} around step {best_step} -> {_g(tr_last)} at the end",
        f"gap eval - train = {_g(gap)} > {th.overfit_gap:g}",
    ], fixes=fixes, data={"best_step": best_step, "best_eval_loss": best, "last_eval_loss": last, "gap": gap})


def rule_forgetting(run: RunData, th: Thresholds) -> Finding | None:
    b, a = _eval_result(run.summary, "before"), _eval_result(run.summary, "after")
    if b and a and _num(b.get("general_loss")) is not None and _num(a.get("general_loss")) is not None:
        f, where = forgetting(_num(b["general_loss"]), _num(a["general_loss"]), th.forgetting_rise), ("base model", "fine-tuned")
    else:
        rows = [r for r in run.evals if _num(r.get("general_loss")) is not None]
        if len(rows) < 2:
            raise Skip("no general-data loss before and after (set replay_data or run `sftlab eval --general`)")
        f = forgetting(_num(rows[0]["general_loss"]), _num(rows[-1]["general_loss"]), th.forgetting_rise)
        where = (f"step {rows[0].get('step')}", f"step {rows[-1].get('step')}")
    if not f["flagged"]:
        return None
    rel = f"{f['relative']:+.1%}" if math.isfinite(f["relative"]) else "non-finite"
    fixes = []
    ratio = _cfg(run, "replay_ratio", 0.0) or 0.0
    if not _cfg(run, "replay_data"):
        fixes.append("replay_data: <a file of general chat data, like what the base model was tuned on>")
    fixes.append(f"replay_ratio: {ratio:g} -> {min(0.9, round(ratio + 0.2, 2)):g}")
    fixes.append(_lr(run))
    ewc = _cfg(run, "ewc_lambda", 0.0) or 0.0
    fixes.append(f"ewc_lambda: {ewc:g} -> {ewc * 10 if ewc else 1.0:g} (EWC; needs replay_data for the Fisher estimate)")
    if _cfg(run, "method") == "full":
        fixes.append("method: full -> lora (fewer weights move)")
    return Finding("forgetting", "warning", "the loss on general data went up: the model forgot some of what it knew", evidence=[
        f"general-data loss {_g(f['before'])} ({where[0]}) -> {_g(f['after'])} ({where[1]}), {rel}, "
        f"threshold {th.forgetting_rise:.0%}",
    ], fixes=fixes, data=f)


def rule_worse_than_base(run: RunData, th: Thresholds) -> Finding | None:
    """The fine-tune scores a far higher loss on the eval data than the base model did (`sftlab eval
    --compare base --save`): training made the model worse at the very task it was trained for."""
    b, a = _eval_result(run.summary, "before"), _eval_result(run.summary, "after")
    before, after = _num((b or {}).get("loss")), _num((a or {}).get("loss"))
    if before is None or after is None:
        raise Skip("no eval loss of the base model (run `sftlab eval RUN --compare base --save`)")
    if math.isfinite(after) and after <= before * (1 + th.worse_than_base):
        return None
    fixes = [_lr(run), "check the data and the template with `sftlab doctor` and `sftlab prepare --show 3`"]
    if _cfg(run, "method") == "prefix":
        fixes.insert(0, "retrain with this sftlab: prefix runs now start from the base model's own keys/values "
                        "(a random prefix starts near-uniform, loss ~ln(vocab))")
    rel = f"{after / before - 1:+.0%}" if math.isfinite(after) and before > 0 else "non-finite"
    return Finding("worse_than_base", "error", "the fine-tuned model scores a far higher eval loss than the base model",
                   evidence=[f"eval loss {_g(before)} (base model) -> {_g(after)} (fine-tuned), {rel}, "
                             f"threshold +{th.worse_than_base:.0%}"],
                   fixes=fixes, data={"before": before, "after": after})


def rule_format(run: RunData, th: Thresholds) -> Finding | None:
    got = _latest_gen(run, "format_adherence")
    if got is None:
        raise Skip("no format-adherence measurement (run `sftlab eval`, or eval with generation during training)")
    value, where = got
    if value >= th.format_min:
        return None
    evidence = [f"format adherence {value:.0%} in {where} (below {th.format_min:.0%})"]
    b = _eval_result(run.summary, "before")
    if b and _finite(b.get("format_adherence")):
        evidence.append(f"the base model had {float(b['format_adherence']):.0%}")
    calls = _latest_gen(run, "valid_tool_call_rate")  # the format of replies that should call a tool
    if calls is not None:
        evidence.append(f"valid tool call rate {calls[0]:.0%} in {calls[1]} (replies whose reference calls a tool: "
                        "the call must parse, name an offered function and fit its schema)")
    fixes = ["more training examples that show the exact output format (aim for 100+ consistent ones)"
             if calls is None or calls[0] >= th.format_min else
             "more training examples whose replies call the tools, in the call format of the training template "
             "(aim for 100+); check the failing calls in `sftlab eval --json` (samples: tool_call.why)"]
    if _cfg(run, "masking") == "all":
        fixes.append("masking: all -> all_assistant (response-only loss: train on the replies only)")
    if not _cfg(run, "system_prompt") and (calls is None or calls[0] >= th.format_min):
        fixes.append("system_prompt: <one line stating the output format>")
    losses = [float(r["eval_loss"]) for r in run.evals if _finite(r.get("eval_loss"))]
    longer = _train_longer(run) if losses and losses[-1] <= min(losses) else None  # still improving: train longer
    if longer:
        fixes.append(longer)
    return Finding("format", "warning", "replies often do not follow the expected format", evidence=evidence, fixes=fixes,
                   data={"format_adherence": value})


def rule_repetition(run: RunData, th: Thresholds) -> Finding | None:
    got = _latest_gen(run, "repetition_rate")
    if got is None:
        raise Skip("no repetition measurement (run `sftlab eval`, or eval with generation during training)")
    value, where = got
    if value <= th.repetition_max:
        return None
    evidence = [f"n-gram repetition rate {value:.0%} in {where} (above {th.repetition_max:.0%})"]
    fin = _latest_gen(run, "finished_rate")
    if fin is not None and fin[0] < 0.9:
        evidence.append(f"only {fin[0]:.0%} of replies ended at the end-of-turn token (the rest ran to max_new_tokens)")
    used = _eval_settings(run.summary) if where == "the final eval" else {}  # training evals: the defaults
    pen = _num(used.get("repetition_penalty"))
    pen = pen if pen is not None and math.isfinite(pen) and pen > 0 else 1.0
    fixes = [f"generation: --repetition-penalty {float(pen)} -> {float(max(1.2, round(pen + 0.1, 2)))}"]
    if not used.get("do_sample"):  # sampling already: a lower temperature would loop more, not less
        fixes.append("generation: sample with a lower temperature, --do-sample --temperature 0.7 (greedy decoding loops easily)")
    if run.summary is not None and run.summary.eos_trained is False:
        fixes.append("train the end-of-turn/EOS token (see the eos finding): a model that never learned to stop repeats")
    return Finding("repetition", "warning", "generated replies repeat themselves", evidence=evidence, fixes=fixes,
                   data={"repetition_rate": value})


def rule_divergence(run: RunData, th: Thresholds) -> Finding | None:
    s = run.summary
    evidence: list[str] = []
    div = s.divergence if s else None
    if (s is not None and s.stopped == "diverged") or div:
        at = f" at step {div.get('step')} (loss {div.get('loss')})" if isinstance(div, dict) else ""
        evidence.append(f"training stopped as diverged{at}")
    for key, label in (("loss", "train loss"), ("grad_norm", "gradient norm")):
        bad = next((r for r in run.train if _num(r.get(key)) is not None and not math.isfinite(_num(r[key]))), None)
        if bad is not None:
            evidence.append(f"{label} is {bad[key]} at step {bad.get('step')}")
    bad_eval = next((r for r in run.evals if _num(r.get("eval_loss")) is not None and not math.isfinite(_num(r["eval_loss"]))), None)
    if bad_eval is not None:
        evidence.append(f"eval loss is {bad_eval['eval_loss']} at step {bad_eval.get('step')}")
    losses = [(r.get("step"), float(r["loss"])) for r in run.train if _finite(r.get("loss"))]
    if len(losses) >= 3 and losses[0][1] > 0:
        peak = max(losses[1:], key=lambda x: x[1])
        if peak[1] > th.loss_explode * losses[0][1]:
            evidence.append(f"train loss {_g(peak[1])} at step {peak[0]}, {peak[1] / losses[0][1]:.1f}x its first value "
                            f"{_g(losses[0][1])} (limit {th.loss_explode:g}x)")
    grads = [(r.get("step"), float(r["grad_norm"])) for r in run.train if _finite(r.get("grad_norm"))]
    # the gradient before (or while warmup keeps the rate near 0 around) the first updates is large by nature
    wr, steps = _cfg(run, "warmup_ratio", 0.0) or 0.0, _steps(run) or 0
    warm = max(1, math.ceil(wr * steps)) if isinstance(wr, (int, float)) else 1
    # a spike against the steps just before it, not the whole run's median: a converging run's gradients
    # shrink 10-100x, and its early (healthy) norms would read as a blow-up against its late ones
    spikes = [(g / med, s, g, med) for i, (s, g) in enumerate(grads) if i >= 3 and isinstance(s, (int, float)) and s > warm
              and (med := median(x for _, x in grads[max(0, i - 10):i])) > 0]
    if spikes and (top := max(spikes))[0] > th.grad_explode:
        _, step, g, med = top
        evidence.append(f"gradient norm {_g(g)} at step {step}, {g / med:.0f}x the median {_g(med)} of the logged steps "
                        f"before it (limit {th.grad_explode:g}x)")
    if not evidence:
        return None
    lr = _cfg(run, "learning_rate")
    fixes = [f"learning_rate: {lr:g} -> {lr / 10:g}" if isinstance(lr, (int, float)) else "learning_rate: lower it 10x"]
    wr = _cfg(run, "warmup_ratio", 0.0) or 0.0
    if wr < 0.1:
        fixes.append(f"warmup_ratio: {wr:g} -> 0.1")
    if not _cfg(run, "max_grad_norm"):
        fixes.append(f"max_grad_norm: {_cfg(run, 'max_grad_norm')} -> 1.0")
    if _cfg(run, "precision") == "fp16":
        fixes.append("precision: fp16 -> bf16 (fp16 overflows; bf16 has fp32's range)")
    data = _cfg(run, "data")
    fixes.append(f"check the data for broken or extreme examples: sftlab doctor {data or 'DATA'}")
    return Finding("divergence", "error", "training diverged: the loss or gradients blew up", evidence=evidence, fixes=fixes)


def rule_plateau(run: RunData, th: Thresholds) -> Finding | None:
    """The train loss never really fell: the run learned (almost) nothing."""
    if run.summary is None or run.summary.stopped == "interrupted":
        raise Skip("the run did not finish (its loss may not have started to fall)")
    tr = [(r.get("step"), _num(r.get("loss"))) for r in run.train if _num(r.get("loss")) is not None]
    if len(tr) < 4:
        raise Skip(f"{len(tr)} train-loss rows, need 4")
    if not all(math.isfinite(v) for _, v in tr):
        return None  # non-finite: the divergence finding
    first, last = tr[0][1], sum(v for _, v in tr[-3:]) / 3
    if first < 0.1 or last < first * (1 - th.plateau_drop):  # already fitted, or it fell: learning
        return None
    evidence = [f"train loss {_g(first)} at step {tr[0][0]} -> {_g(last)} at the end (last 3 logs), "
                f"{last / first - 1:+.1%}; a run that learns falls by more than {th.plateau_drop:.0%}"]
    ev = [(r.get("step"), float(r["eval_loss"])) for r in run.evals if _finite(r.get("eval_loss"))]
    if len(ev) >= 2:
        evidence.append(f"eval loss {_g(ev[0][1])} at step {ev[0][0]} -> {_g(ev[-1][1])} at step {ev[-1][0]}")
    lr = _cfg(run, "learning_rate")
    fixes = [f"learning_rate: {lr:g} -> {lr * 3:g}" if isinstance(lr, (int, float)) else "learning_rate: raise it 3x",
             f"check what is trained: `sftlab prepare {run.dir.config_path} --show 3` (the labels of each example) "
             f"and `sftlab doctor {_cfg(run, 'data') or 'DATA'}`",
             "if the base model already knows this data, there is little to learn: `sftlab eval RUN --compare base`"]
    return Finding("plateau", "warning", "the train loss barely fell: the run learned (almost) nothing",
                   evidence=evidence, fixes=fixes, data={"first": first, "last": last})


def rule_eos(run: RunData, th: Thresholds) -> Finding | None:
    s = run.summary
    if s is None or s.eos_trained is None:
        raise Skip("summary.json has no eos_trained")
    if s.eos_trained is not False:
        return None
    if s.pad_equals_eos:
        return Finding("eos", "error", "pad token == EOS and the EOS label is masked: the model never learns to stop", evidence=[
            "summary: pad_equals_eos = true, eos_trained = false",
            "a collator that masks labels by token id (label == pad_id) masks every EOS too",
        ], fixes=["tokenizer: use a pad token other than EOS (sftlab's loader picks <|endoftext|> or adds <pad>); "
            "do not set pad_token = eos_token",
            "mask padding by position (attention_mask == 0), never by token id"], data={"pad_equals_eos": True})
    return Finding("eos", "warning", "the end-of-turn/EOS token of trained replies is not trained: the model may not stop", evidence=[
        "summary: eos_trained = false (the end-of-turn/EOS token closing a trained reply has no label)"],
        fixes=["masking: keep all_assistant or last_assistant so each reply's end-of-turn token is trained",
         "template: use one that ends replies with an end-of-turn token (e.g. chatml), or let sftlab append EOS"])


def rule_truncation(run: RunData, th: Thresholds) -> Finding | None:
    prep = run.summary.prepare if run.summary else None
    if not isinstance(prep, dict) or not prep:
        prep = run.dir.prepare_report()
        if not isinstance(prep, dict):
            raise Skip("no preparation report")
    n_in = prep.get("n_input") or 0
    dropped, cut = prep.get("n_dropped_too_long", 0) or 0, prep.get("n_truncated", 0) or 0
    turns = prep.get("n_turns_cut", 0) or 0
    hit = dropped + cut + turns
    if not n_in or not hit:
        return None
    share = hit / n_in
    max_len = _cfg(run, "max_seq_length")
    evidence = []
    if dropped:
        evidence.append(f"{dropped} of {n_in} examples ({dropped / n_in:.1%}) dropped as longer than max_seq_length {max_len}")
    if cut:
        evidence.append(f"{cut} of {n_in} examples ({cut / n_in:.1%}) truncated at max_seq_length {max_len}")
    if turns:
        evidence.append(f"{turns} of {n_in} examples ({turns / n_in:.1%}) lost earlier turns to fit")
    for d in (prep.get("dropped") or [])[:3]:
        if isinstance(d, dict):
            evidence.append(f"e.g. {d.get('where')}: {d.get('why')}")
    fixes = [f"max_seq_length: {max_len} -> {max_len * 2}" if isinstance(max_len, int) else "raise max_seq_length"]
    if _cfg(run, "truncation") != "cut_turns":
        fixes.append(f"truncation: {_cfg(run, 'truncation')} -> cut_turns (keep the last turns instead)")
    fixes.append("or shorten/split the longest examples (`sftlab doctor DATA --model MODEL` lists them)")
    sev = "warning" if share >= th.truncation_warn else "info"
    return Finding("truncation", sev, "examples were dropped or cut because they were too long", evidence=evidence, fixes=fixes,
                   data={"share": share, "dropped": dropped, "truncated": cut, "turns_cut": turns})


_PROBES = [
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Name?")],
    [("user", "Say x"), ("assistant", "x")],
]


def _renders(src: str, special: dict) -> list[str]:
    """The template's output on a few probe chats; a probe it refuses shows as its error."""

    try:
        t = ChatTemplate("probe", src, None, special)
    except SftlabError as exc:
        return [f"error: {exc}"]
    out = []
    for probe in _PROBES:
        for gen in (False, True):
            try:
                out.append(t.render([Message(r, c) for r, c in probe], add_generation_prompt=gen))
            except SftlabError as exc:
                out.append(f"error: {str(exc).split(':', 1)[-1]}")
    return out


def rule_template_mismatch(run: RunData, th: Thresholds) -> Finding | None:
    name = _cfg(run, "template")
    evidence = []
    ev = run.summary.eval if run.summary else None
    used = None
    if isinstance(ev, dict):
        used = (ev.get("after") or ev.get("result") or {}).get("template")
    trained = (run.summary.template if run.summary else None) or name
    if used and trained and used not in ("tokenizer", trained):
        evidence.append(f"trained with template '{trained}', evaluated with '{used}'")
    mdir = run.dir.model_dir
    if name is not None and mdir.is_dir():
        src_train = BUILTIN[name][0] if name in BUILTIN else (Path(name).read_text(encoding="utf-8") if Path(name).is_file() else None)
        saved, special = run.dir.saved_tokenizer_config()
        if saved is None and (mdir / "tokenizer_config.json").exists():
            evidence.append("the tokenizer saved in model/ has no chat template: inference falls back to the base model's")
        elif saved is not None and src_train is not None:
            if _renders(src_train, special) != _renders(saved, special):
                evidence.append(f"the chat template saved in model/ renders differently from the training template '{name}'")
    elif not mdir.is_dir() and not evidence:
        raise Skip("no model/ folder: the run saved no model")
    elif name is None and not evidence:
        raise Skip("trained with the tokenizer's own template, which is the one saved with the model")
    if not evidence:
        return None
    return Finding("template_mismatch", "error", "the chat template at inference differs from the one used in training",
                   evidence=evidence, fixes=[f"template: {name or trained} (use the training template at inference: load the tokenizer from "
                              f"{mdir}, or `sftlab eval --template {name or trained}`)",
                              "re-save the tokenizer with the training template (sftlab export writes it)"])

RULES: dict[str, Callable[[RunData, Thresholds], Finding | None]] = {
    "interrupted": rule_interrupted,
    "divergence": rule_divergence,
    "overfitting": rule_overfitting,
    "plateau": rule_plateau,
    "forgetting": rule_forgetting,
    "worse_than_base": rule_worse_than_base,
    "format": rule_format,
    "repetition": rule_repetition,
    "eos": rule_eos,
    "truncation": rule_truncation,
    "template_mismatch": rule_template_mismatch,
}



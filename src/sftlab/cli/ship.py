"""`sftlab export`, `chat` and `generate`: use the trained model."""

from __future__ import annotations

import argparse
import json

from sftlab.cli.base import _command, _config_flag, _print_json
from sftlab.core.errors import SftlabError


@_command("export", "export a run: the adapter or merged weights + tokenizer + the exact training chat template (+ GGUF)")
def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (holds config.yaml and model/)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the base weights (default: the adapter alone)")
    p.add_argument("--gguf", action="store_true", help="also write a llama.cpp GGUF file with the chat template (needs --merge for LoRA)")
    p.add_argument("--gguf-dtype", default=None, choices=("f16", "f32"), help="GGUF weight type (with --gguf; default f16)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype of the export (default fp32)")
    p.add_argument("--device", default="cpu", help="device used to merge and check (default cpu)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip loading the export back to compare logits")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from sftlab.export import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        export_run,
        format_export,
    )

    if args.gguf_dtype is not None and not args.gguf:  # else it would be ignored without a word
        raise SftlabError(f"--gguf-dtype {args.gguf_dtype} without --gguf: no GGUF file is written",
                          hint="add --gguf, or drop --gguf-dtype")
    res = export_run(args.run, args.out, merge=args.merge, gguf=args.gguf, gguf_dtype=args.gguf_dtype or "f16",
                     force=args.force, dtype=args.dtype, device=args.device, verify=args.verify)
    if args.json:
        _print_json(res.to_dict())
    else:
        print(format_export(res))
    return 0


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_RUN", help="run folder, export folder, local HF folder, .gguf file or hub id")
    p.add_argument("--system", dest="system_prompt",
                   help="system prompt (default: a run's system_prompt, as in training; '' for none)")
    p.add_argument("--template", help="chat template (default: the run's training template, or the tokenizer's own)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, with --temperature > 0")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")


@_command("chat", "chat with a run or model in the terminal (streaming, multi-turn, /reset, /exit)")
def _add_chat(p: argparse.ArgumentParser) -> None:
    _add_generation_flags(p)
    p.add_argument("--tools", metavar="FILE.json", help="function schemas offered to the model (a JSON list); "
                   "its tool calls are shown and you type each result")
    p.set_defaults(func=_cmd_chat)


def _check_sampling(args) -> None:
    """Generation flags out of range, or --top-p while greedy (--temperature 0, where it would be ignored):
    one clear error naming the value, before the model loads."""
    for flag, value, ok, want in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
                                  ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 is greedy)"),
                                  ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]")):
        if not ok:
            raise SftlabError(f"{flag} {value:g} must be {want}")
    if args.top_p != 1.0 and not args.temperature:
        raise SftlabError(f"--top-p {args.top_p:g} with greedy decoding (--temperature 0): the sampling mass is unused",
                          hint="add --temperature (e.g. 0.7) to sample, or drop --top-p")


def _cmd_chat(args) -> int:
    from sftlab.chat import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        ChatSession,
        default_system_prompt,
        load_chat_model,
        run_chat,
        run_reasoning,
    )
    from sftlab.chat_tools import (
        load_tools,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    _check_sampling(args)
    tools = load_tools(args.tools) if args.tools else None  # a bad file fails before the model loads
    model, tok, tpl = load_chat_model(args.model, template=args.template, device=args.device)
    session = ChatSession(model, tok, tpl, system_prompt=default_system_prompt(args.model, args.system_prompt),
                          max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, tools=tools,
                          reasoning=run_reasoning(args.model))
    return run_chat(session, name=args.model)


@_command("generate", "generate replies for --prompt texts or a --data file, as JSONL")
def _add_generate(p: argparse.ArgumentParser) -> None:
    _add_generation_flags(p)
    p.add_argument("--prompt", action="append", help="a user message to reply to (repeatable)")
    p.add_argument("--data", help="data file: each conversation's final assistant reply is generated (kept as 'reference'); "
                                  "prompts without a reply (ending on a user turn, prompt or instruction alone) are replied to")
    p.add_argument("--tools", metavar="FILE.json", help="function schemas offered with each --prompt (a JSON list, as "
                   "chat --tools); each row then has its tool_calls checked against them")
    _config_flag(p, "format")
    p.add_argument("--out", metavar="FILE.jsonl", help="write rows here (default: print them as JSONL)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON (without --out: one document with the rows under 'rows')")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from sftlab.chat import (
        generate_jsonl,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.chat_tools import (
        load_tools,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    tools = load_tools(args.tools) if args.tools else None  # a bad file fails before the model loads
    _check_sampling(args)
    res = generate_jsonl(args.model, prompts=args.prompt, data=args.data, out=args.out, fmt=args.format, tools=tools,
                         system_prompt=args.system_prompt, template=args.template, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                         device=args.device)
    if args.json:
        _print_json(res.summary() if args.out else {**res.summary(), "rows": res.rows})
    elif not args.out:
        for row in res.rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        s = res.summary()
        print(f"wrote {s['n']} replies to {args.out} in {s['seconds']} s ({s['cut_at_max_new_tokens']} cut at --max-new-tokens)")
    return 0

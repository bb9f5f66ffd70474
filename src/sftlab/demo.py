"""`make demo`: the whole workflow on the embedded default model, start to finish.

check the data -> show the labels -> fine-tune with LoRA -> evaluate before and after on the
held-out split (task score, format, forgetting) -> diagnose -> write the HTML report.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from sftlab.core.errors import SftlabError


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def clear_previous_demo(out_dir: str, train_data: str) -> bool:
    """Remove the run an earlier demo left in ``out_dir`` (training refuses a folder holding a run), and
    say so; True when one was removed. A run there that did not train on the demo data is not the demo's:
    an SftlabError, nothing removed."""
    from sftlab.rundir import (
        RunDir,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    run = RunDir(out_dir)
    if not run.run_files():
        return False
    try:
        data = run.config().data
    except SftlabError:
        data = None
    if not isinstance(data, str) or Path(data).resolve() != Path(train_data).resolve():
        raise SftlabError(f"{out_dir} holds a run that is not the demo's", hint="move or remove it, then run the demo again")
    print(f"removing the previous demo run in {out_dir}", flush=True)
    shutil.rmtree(out_dir)
    return True


def run_demo(out_dir: str = "runs/demo", *, max_steps: int | None = None, limit: int | None = None) -> int:
    from sftlab.config import (
        load_config,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.data.doctor import (
        run_doctor_config,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.data.prepare import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        prepare,
        render_example,
    )
    from sftlab.demo_data import (
        demo_path,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.diagnose import (
        diagnose,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.eval import (  # deferred: the command pulls in torch; `sftlab --help` stays fast
        GenerationSettings,
        attach_to_run,
        format_comparison,
        run_eval,
    )
    from sftlab.models import (
        load_tokenizer,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.report import (
        write_report,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )
    from sftlab.train.run import (
        train,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    t0 = time.perf_counter()
    train_data, eval_data, general = (str(demo_path(s)) for s in ("train", "eval", "general"))
    overrides = {"data": train_data, "eval_data": eval_data, "output_dir": out_dir}
    if max_steps:
        overrides["max_steps"] = max_steps
    cfg = load_config(Path(__file__).parent / "demo_data" / "demo.yaml", overrides)

    _step("1. check the data (sftlab doctor)")
    tok = load_tokenizer(cfg.model)
    doc = run_doctor_config(cfg, tok)  # the data as this run trains it (its template, limit, masking, reasoning)
    print(doc.format_text(limit=5))

    _step("2. what is trained (sftlab prepare --show 1): «trained» tokens")
    prepared = prepare(cfg, tok)
    print(render_example(tok, prepared.examples[0]))
    print(prepared.report.summary())

    _step("3. fine-tune with LoRA (sftlab train)")
    clear_previous_demo(out_dir, train_data)
    summary = train(cfg)
    print(f"{summary['steps']} steps in {summary['time_s']:.0f}s, {summary['tokens_per_second']:.0f} tokens/s, "
          f"peak memory {summary['peak_memory_mb']:.0f} MB, final eval loss {summary['final_eval_loss']:.4f}")

    _step("4. before and after on the held-out split (sftlab eval --compare base)")
    # Demo replies are compact JSON of at most ~45 tokens: 64 new tokens bound a base model that rambles.
    result = run_eval(out_dir, eval_data, compare_to="base", general=general, limit=limit,
                      settings=GenerationSettings(max_new_tokens=64), batch_size=16)
    print(format_comparison(result))
    attach_to_run(out_dir, result)

    _step("5. diagnosis (sftlab diagnose)")
    print(diagnose(out_dir).format_text())

    _step("6. report (sftlab report)")
    rep = write_report(out_dir)
    print(f"report: {rep['path']}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s. Try the model: sftlab chat {out_dir}")
    return 0


def main() -> int:
    from sftlab.cli import (
        quiet_libraries,  # deferred: the command pulls in torch; `sftlab --help` stays fast
    )

    quiet_libraries()
    max_steps = int(os.environ["SFTLAB_DEMO_STEPS"]) if os.environ.get("SFTLAB_DEMO_STEPS") else None
    try:
        return run_demo(max_steps=max_steps)
    except SftlabError as exc:
        print(f"sftlab demo: error: {exc}", file=sys.stderr)
        return exc.exit_code

if __name__ == "__main__":
    sys.exit(main())

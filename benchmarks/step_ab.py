"""Per-micro-step wall time of sftlab's default LoRA training with and without peft's input casts under
autocast (sftlab skips them: `sftlab.train.model.CastUnlessAutocast`), alternating the two in fresh
processes, medians printed. Not a peer comparison (bench_train.py is): it isolates one change.

    PYTHONPATH=src .venv/bin/python benchmarks/step_ab.py --steps 12 --reps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def worker(mode: str, steps: int, out: str) -> None:
    import transformers
    from train_ab import demo_config  # this folder: the same default run

    import sftlab.train.run as run

    build = run.build_model

    def build_model(*args, **kwargs):
        from peft.tuners.lora.layer import Linear as LoraLinear

        model, loss_fn = build(*args, **kwargs)
        for m in model.modules():  # peft's own forward (where the casts are), as when this was measured;
            if isinstance(m, LoraLinear):  # the default run now takes sftlab's fused linear instead
                m.__class__ = LoraLinear
        if mode == "cast":  # peft's own behaviour: cast every adapter input to fp32
            for m in model.modules():
                if hasattr(m, "cast_input_dtype_enabled"):
                    m.cast_input_dtype_enabled = True
        return model, loss_fn

    run.build_model = build_model
    times: list[float] = []
    step = transformers.Trainer.training_step

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return step(self, *args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    transformers.Trainer.training_step = timed
    s = run.train(demo_config(out, steps), quiet=True)
    print(json.dumps({"mode": mode, "precision": s.get("precision"), "loss": s["final_train_loss"],
                      "median_s": statistics.median(times[4:])}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--worker", choices=("skip", "cast"))
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.steps, a.out)
    from train_ab import alternate  # this folder

    rows = alternate(__file__, ["cast", "skip"], a.steps, a.reps, lambda rep, mode, r: print(
        f"rep {rep + 1} {mode}: median micro-step {r['median_s']:.3f} s, precision {r['precision']}, "
        f"final train loss {r['loss']:.6f}", flush=True))
    med = {m: statistics.median(r["median_s"] for r in rs) for m, rs in rows.items()}
    print(f"medians: cast {med['cast']:.3f} s, skip {med['skip']:.3f} s per micro-step -> "
          f"skipping is {med['cast'] / med['skip']:.2f}x")


if __name__ == "__main__":
    main()

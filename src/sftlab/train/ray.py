"""Ray Train: the same ``train(cfg)`` in each of N workers through ``ray.train.torch.TorchTrainer``
(``pip install 'sftlab[ray]'``; ``sftlab train CONFIG --ray-workers N [--ray-address ADDR]``).

Ray places the workers, sets up the torch process group (gloo on CPU, nccl on GPU) and RANK, LOCAL_RANK,
WORLD_SIZE in each worker, so a worker runs ``train(cfg)`` exactly as a process under torchrun does:
global rank 0 writes the run folder (``output_dir``, which should be shared storage on a cluster).
Every logged train/eval row goes to Ray as a report; the last report carries the summary, with the
saved model folder as the run's Ray checkpoint (copied under ``<output_dir>.ray/`` by Ray).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sftlab import rundir as A
from sftlab.config import Config, load_config
from sftlab.core.errors import SftlabError
from sftlab.train.run import train

_PATH_KEYS = ("model", "data", "eval_data", "replay_data", "output_dir", "deepspeed")


def _absolute_paths(cfg: Config) -> dict:
    """The config as a dict with local paths made absolute: a worker does not share the caller's cwd."""
    d = cfg.to_dict()
    for key in _PATH_KEYS:
        value = d.get(key)
        if isinstance(value, str) and value and (key == "output_dir" or Path(value).exists()):
            d[key] = str(Path(value).resolve())
    return d


def _report_callback():
    """A TrainerCallback that reports each logged row to Ray. Trainer logs on every process at the
    same steps, so every worker reports the same number of times (ray.train.report is a barrier)."""
    import ray.train  # deferred: optional extra
    from transformers import (
        TrainerCallback,  # deferred: heavy library, imported on first use
    )

    class ReportRows(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                row = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
                ray.train.report({"step": state.global_step, **row})

    return ReportRows()


def _worker(loop_config: dict) -> None:
    """One Ray Train worker: train, then report the summary (and, from rank 0, the model folder)."""
    import ray.train  # deferred: optional extra

    cfg = load_config(None, loop_config["config"])
    summary = train(cfg, quiet=True, callbacks=[_report_callback()])
    model_dir = Path(cfg.output_dir) / A.MODEL_DIR
    main = ray.train.get_context().get_world_rank() == 0
    checkpoint = ray.train.Checkpoint.from_directory(str(model_dir)) if main and model_dir.is_dir() else None
    ray.train.report({"step": summary["steps"], "summary": json.dumps(summary, default=str)}, checkpoint=checkpoint)


def _worker_failure(exc: Exception) -> Exception:
    """A worker's SftlabError (bad data, divergence) as itself; anything else as Ray raised it."""
    for failure in (getattr(exc, "worker_failures", None) or {}).values():
        if isinstance(failure, SftlabError):
            return failure
    return exc


def train_on_ray(cfg: Config, *, workers: int, address: str | None = None, quiet: bool = False) -> dict:
    """Run ``train(cfg)`` on ``workers`` Ray Train workers (a local Ray instance unless ``address``);
    returns the summary rank 0 wrote, plus ``ray``: workers, address, GPU use and the checkpoint path."""
    try:
        import ray  # deferred: optional extra
        from ray.train import RunConfig, ScalingConfig  # deferred: optional extra
        from ray.train.torch import TorchTrainer  # deferred: optional extra
    except ImportError as exc:
        raise SftlabError(f"--ray-workers needs Ray Train ({exc})", hint="pip install 'sftlab[ray]'") from exc
    if workers < 1:
        raise SftlabError(f"--ray-workers {workers}: needs at least 1 worker", hint="--ray-workers 2")
    started = not ray.is_initialized()
    if started:
        local = {} if address else {"num_cpus": max(workers, os.cpu_count() or 1), "include_dashboard": False}
        ray.init(address=address, log_to_driver=not quiet, **local)
    try:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers  # a GPU per worker, or CPUs with gloo
        out = Path(cfg.output_dir).resolve()
        trainer = TorchTrainer(_worker, train_loop_config={"config": _absolute_paths(cfg)},
                               scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                               run_config=RunConfig(name=out.name + ".ray", storage_path=str(out.parent)))
        try:
            result = trainer.fit()
        except Exception as exc:  # Ray's TrainingFailedError: raise the workers' own error when it is ours
            failure = _worker_failure(exc)
            if failure is exc:
                raise
            raise failure from exc
    finally:
        if started:
            ray.shutdown()
    summary = json.loads(result.metrics["summary"])
    summary["ray"] = {"workers": workers, "address": address, "use_gpu": use_gpu,
                      "checkpoint": result.checkpoint.path if result.checkpoint else None}
    return summary

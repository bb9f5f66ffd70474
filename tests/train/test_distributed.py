"""More than one process: DDP on one machine (torchrun), two "nodes" on localhost (torchrun's c10d
rendezvous), resume across nodes, Ray Train workers, FSDP2 over 2 CPU processes (gloo) for full
fine-tuning and LoRA, FSDP2 settings, and what is refused on CPU (DeepSpeed, FSDP in one process, offload).

Every launch runs the same 4-step fine-tune of the tiny model with the same global batch (8), so
each loss curve must match the 1-process curve within 1e-4 (gloo all-reduce sums in another order).
"""

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import chat_data, train_config

from sftlab import rundir as A
from sftlab.core.errors import SftlabError
from sftlab.rundir import RunDir
from sftlab.train.run import train

pytestmark = pytest.mark.xdist_group("distributed")

TOL = 1e-4
STEPS = 4
TIMEOUT = 300  # seconds for one launch; a hung rendezvous fails the test instead of the suite


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_errors(stderr: str) -> str:
    """The workers' own error lines (the launcher's traceback that ends stderr says only 'failed')."""
    lines = [ln for ln in stderr.splitlines() if ("rror" in ln or "sftlab" in ln) and "elastic" not in ln]
    return "\n".join(lines[:40]) + "\n--- stderr head ---\n" + stderr[:3000]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _start(cmd: list[str], env: dict, **kw) -> subprocess.Popen:
    """A launcher in its own process group, so that _stop ends it with every worker it started."""
    return subprocess.Popen(cmd, env=env, start_new_session=True, **kw)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _launch(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one launch to the end (at most TIMEOUT seconds); its process group is killed on any failure."""
    proc = _start(cmd, env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        _stop(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _train_args(model: Path, data: str, out: Path, per_process_batch: int, steps: int = STEPS,
                method: str = "full") -> list[str]:
    """`sftlab train` flags: global batch = per_process_batch x processes x 2 accumulation steps."""
    return ["train", "--model", str(model), "--data", data, "--method", method, "--output-dir", str(out),
            "--set", f"max_steps={steps}", "--set", "logging_steps=1", "--set", "group_by_length=false",
            "--set", "learning_rate=1e-2", "--set", "lr_scheduler=constant", "--set", "warmup_ratio=0",
            "--set", "gradient_checkpointing=false", "--set", "precision=fp32", "--set", "save_steps=2",
            "--set", f"batch_size={per_process_batch}", "--set", "gradient_accumulation=2",
            "--set", "merge_micro_batches=false", "--json"]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in RunDir(run).metrics() if r["split"] == "train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return chat_data(tmp_path_factory.mktemp("dist") / "d.jsonl", 16)


def _one_process_run(out: Path, model: Path, data: str, method: str = "full") -> Path:
    """The reference: 1 process, batch 4 x accumulation 2."""
    one = _launch([sys.executable, "-m", "sftlab.cli", *_train_args(model, data, out, 4, method=method)])
    assert one.returncode == 0, one.stderr[-2000:]
    assert len(_losses(out)) == STEPS
    return out


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_dir, data) -> Path:
    return _one_process_run(tmp_path_factory.mktemp("one") / "run", tiny_model_dir, data)


@pytest.fixture(scope="module")
def one_process(one_process_run) -> list[float]:
    return _losses(one_process_run)


def test_two_processes_match_one_process(tmp_path, tiny_model_dir, data, one_process):
    """DDP over 2 CPU processes (gloo) gives the same loss curve as 1 process with the same global batch."""
    two = _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   f"--master_port={_free_port()}", "-m", "sftlab.cli", *_train_args(tiny_model_dir, data, tmp_path / "two", 2)])
    assert two.returncode == 0, _worker_errors(two.stderr)
    assert _losses(tmp_path / "two") == pytest.approx(one_process, abs=TOL)


def _two_nodes(args: list[str], logs: Path) -> None:
    """Start two torchrun "nodes" of 1 process each on localhost, joined by a c10d rendezvous (the same
    command twice with a shared --rdzv-id, as on two machines); wait for both, kill both on any failure."""
    port, rdzv_id = _free_port(), uuid.uuid4().hex[:8]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
           "--local-addr=127.0.0.1", "-m", "sftlab.cli", *args]
    logs.mkdir(parents=True, exist_ok=True)
    procs, errs = [], []
    try:
        for node in range(2):
            err = open(logs / f"node{node}.err", "w+")
            errs.append(err)
            procs.append(_start(cmd, _env(), stdout=subprocess.DEVNULL, stderr=err))
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            _stop(p)
        for err in errs:
            err.close()
    text = "\n".join(f"--- node {i} ---\n" + (logs / f"node{i}.err").read_text() for i in range(2))
    assert codes == [0, 0], _worker_errors(text)


def test_two_nodes_match_one_process_and_resume_across_nodes(tmp_path, tiny_model_dir, data, one_process):
    """2 nodes x 1 process (each with LOCAL_RANK 0) train to step 2 and stop; 2 nodes resume from
    checkpoint-2 to step 4. Only global rank 0 writes: one metrics row per step, the checkpoint holds
    both processes' RNG states, and the 4-step curve is the 1-process curve."""
    out = tmp_path / "run"
    _two_nodes(_train_args(tiny_model_dir, data, out, 2, steps=2), tmp_path / "first")
    assert sorted(p.name for p in (out / A.CHECKPOINTS).iterdir()) == ["checkpoint-2"]
    ckpt = out / A.CHECKPOINTS / "checkpoint-2"
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert _losses(out) == pytest.approx(one_process[:2], abs=TOL)
    _two_nodes([*_train_args(tiny_model_dir, data, out, 2), "--resume"], tmp_path / "second")
    rows = [r for r in RunDir(out).metrics() if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # written once (rank 0), not once per node
    assert [r["loss"] for r in rows] == pytest.approx(one_process, abs=TOL)
    assert RunDir(out).summary().steps == STEPS and (out / A.MODEL_DIR / "model.safetensors").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging or temp folder left


@pytest.mark.slow
def test_ray_two_workers_match_one_process(tmp_path, tiny_model_dir, data, one_process):
    """`sftlab train --ray-workers 2` on a local Ray instance: the same curve, the summary and the model
    folder come back through Ray (metrics reports and the final checkpoint)."""
    pytest.importorskip("ray.train.torch", reason="Ray Train is not installed (pip install 'sftlab[ray]')")
    import json

    out = tmp_path / "run"
    # no usage report, no auth token written under ~/.ray: a throwaway local instance
    env = {**_env(), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    ray = _launch([sys.executable, "-m", "sftlab.cli", *_train_args(tiny_model_dir, data, out, 2), "--ray-workers", "2"],
                  env)
    assert ray.returncode == 0, _worker_errors(ray.stderr)
    summary = json.loads(ray.stdout)
    assert summary["steps"] == STEPS and summary["ray"]["workers"] == 2
    assert _losses(out) == pytest.approx(one_process, abs=TOL)
    ckpt = Path(summary["ray"]["checkpoint"])
    assert (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists()


_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("method,words", [
    ("full", "full_shard"),
    pytest.param("lora", "shard_grad_op auto_wrap", marks=pytest.mark.slow),  # + its own reference: 22-52 s
    pytest.param("full", "accelerate", marks=pytest.mark.slow),  # examples/fsdp/fsdp2.yaml, no `fsdp` key
])
def test_fsdp_over_two_cpu_processes_matches_one_process(tmp_path, tiny_model_dir, data, one_process_run,
                                                         method, words):
    """FSDP2 on 2 CPU processes (gloo; torchrun with `fsdp`, or `accelerate launch` with the example FSDP2
    config): the parameters really are sharded (DTensors, recorded in the summary), the loss curve is the
    1-process curve, and rank 0 saves the gathered model or adapter with the 1-process save's tensors (a
    tied weight once), which loads back to the same logits."""
    import torch
    from safetensors.torch import load_file

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: FSDP on GPUs is checked by benchmarks/gpu_check.py")
    ref = one_process_run if method == "full" else _one_process_run(tmp_path / "one", tiny_model_dir, data, method)
    out = tmp_path / "fsdp"
    args = _train_args(tiny_model_dir, data, out, 2, method=method)
    if words == "accelerate":
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(_EXAMPLES / "fsdp" / "fsdp2.yaml"), "--num_processes", "2", "--mixed_precision", "no",
                    "--main_process_port", str(_free_port())]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
        args += ["--set", f"fsdp={words}"]
    run = _launch([*launcher, "-m", "sftlab.cli", *args])
    assert run.returncode == 0, _worker_errors(run.stderr)
    assert _losses(out) == pytest.approx(_losses(ref), abs=TOL)
    assert RunDir(out).summary().distributed == {"processes": 2, "sharding": "fsdp2"}
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    want, got = load_file(ref / A.MODEL_DIR / name), load_file(out / A.MODEL_DIR / name)
    assert sorted(got) == sorted(want)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-3
    ids = torch.tensor([[1, 5, 9, 13, 2, 1, 7]])
    with torch.no_grad():
        logits = [RunDir(r).load_model()[0](input_ids=ids).logits for r in (ref, out)]
    assert torch.allclose(logits[0], logits[1], atol=1e-3)


@pytest.mark.parametrize("key,value,error", [
    ("deepspeed", "examples/deepspeed/zero2.json", "deepspeed needs CUDA GPUs"),
    ("fsdp", "full_shard auto_wrap", "fsdp on CPU shards the model over processes, and this run is one process"),
])
def test_sharding_on_cpu_is_refused_not_silently_ddp(tmp_path, tiny_model_dir, key, value, error):
    """accelerate turns DeepSpeed on for GPUs only (on CPU the run would quietly be plain DDP); FSDP on
    CPU needs processes to shard over."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: FSDP/DeepSpeed are checked by benchmarks/gpu_check.py")
    with pytest.raises(SftlabError, match=error):
        train(train_config(tmp_path, tiny_model_dir, max_steps=1, **{key: value}), quiet=True)
    assert not (tmp_path / "run" / A.MODEL_DIR).exists()


def test_fsdp_offload_on_cpu_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    """FSDP2's CPU offload pins memory, which needs a GPU: refused in one line, with the words to use."""
    from sftlab.train.distributed import sharding_arguments as _sharding_arguments

    monkeypatch.setenv("LOCAL_RANK", "0")  # as under torchrun
    rc = train_config(tmp_path, tiny_model_dir, fsdp="full_shard offload auto_wrap")
    with pytest.raises(SftlabError, match="fsdp 'offload' needs a GPU") as err:
        _sharding_arguments(rc, cuda=False)
    assert "--set fsdp='auto_wrap full_shard'" in str(err.value.hint)
    assert _sharding_arguments(train_config(tmp_path, tiny_model_dir, fsdp="full_shard"), cuda=False)["fsdp"] is True


def test_ray_flags_without_ray_say_how_to_install(monkeypatch, tmp_path, tiny_model_dir, capsys):
    from sftlab.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    code = main(["train", "--model", str(tiny_model_dir), "--data", chat_data(tmp_path / "d.jsonl", 4),
                 "--output-dir", str(tmp_path / "run"), "--ray-workers", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--ray-workers needs Ray Train" in err and "pip install 'sftlab[ray]'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_ray_workers_below_one_is_one_clear_error(tmp_path, tiny_model_dir, capsys, workers):
    # --ray-workers 0 trained in this process without a word (0 read as "no Ray"); -2 went on to Ray
    from sftlab.cli import main

    code = main(["train", "--model", str(tiny_model_dir), "--data", chat_data(tmp_path / "d.jsonl", 4),
                 "--output-dir", str(tmp_path / "run"), "--ray-workers", workers])
    err = capsys.readouterr().err
    assert code == 2 and f"--ray-workers {workers}" in err and "1 or more" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, message", [
    ("fsdp=bogus", "fsdp='bogus': FSDP2 takes"),
    ("fsdp=full_shard", "fsdp on CPU shards the model over processes, and this run is one process"),
    ("deepspeed=zero2.json", "deepspeed needs CUDA GPUs"),
])
def test_sharding_a_run_refuses_is_a_check_error_and_stops_the_run_before_loading(tmp_path, tiny_model_dir, capsys,
                                                                                   monkeypatch, setting, message):
    # --check called these configurations sound, and the run refused them only after loading the model and
    # creating the run folder
    import torch

    from sftlab.cli import main

    if torch.cuda.is_available():
        pytest.skip("the CPU refusals: a GPU runs these settings")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["train", "--model", str(tiny_model_dir), "--data", chat_data(tmp_path / "d.jsonl", 4),
            "--output-dir", str(tmp_path / "run"), "--set", setting]
    assert main([*args, "--check"]) == 2
    assert f"check error: {message}" in capsys.readouterr().out
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fsdp_options_become_accelerate_fsdp2_settings(tmp_path, tiny_model_dir):
    """`fsdp` words map to FSDP2 plugin settings that transformers and accelerate accept (built, not run);
    FSDP's own activation checkpointing replaces Trainer's; bad words are refused."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    from sftlab.train.distributed import sharding_arguments as _sharding_arguments

    rc = train_config(tmp_path, tiny_model_dir, fsdp="shard_grad_op offload auto_wrap", gradient_checkpointing=True)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, **_sharding_arguments(rc, cuda=True))
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is False and plugin["cpu_offload"] is True
    assert plugin["activation_checkpointing"] is True and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert FullyShardedDataParallelPlugin(**plugin).fsdp_version == 2
    full = _sharding_arguments(train_config(tmp_path, tiny_model_dir, fsdp="full_shard"), cuda=True)
    assert full["fsdp_config"]["reshard_after_forward"] is True and full["fsdp_config"]["cpu_offload"] is False
    for bad in ("hybrid_shard", "full_shard shard_grad_op"):
        with pytest.raises(SftlabError, match="FSDP2 takes 'full_shard' or 'shard_grad_op'"):
            _sharding_arguments(train_config(tmp_path, tiny_model_dir, fsdp=bad), cuda=True)


def test_only_global_rank_zero_judges_whether_output_dir_holds_a_run(tmp_path, tiny_model_dir, monkeypatch):
    """On node 2 LOCAL_RANK is 0 too, and a Ray worker or a later node may start after rank 0 wrote its
    first files: only global rank 0 refuses a folder that holds a run."""
    from sftlab.train.checks import run_folder_findings

    rc = train_config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / A.METRICS).write_text('{"step": 1}\n')
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "1")
    assert [f.rule for f in run_folder_findings(rc)] == []
    monkeypatch.setenv("RANK", "0")
    assert [f.message for f in run_folder_findings(rc)] == [f"{rc.output_dir} holds a run"]


def test_a_mixture_drawn_per_epoch_on_two_processes_resumes_mid_epoch(tmp_path, tiny_model_dir, data):
    """A 0.5/0.5 mixture of 12 + 4 examples: 16 per epoch, 2 steps of 8, so 4 steps are 2 epochs, each
    a fresh draw. 2 processes stop at step 3 (inside epoch 2) and resume to step 4: every step trains
    the 1-process run's examples (its curve within 1e-4), so each process took its shard of the right
    epoch's draw, also where resuming on several processes hides the sampler from accelerate's set_epoch."""
    big, small = chat_data(tmp_path / "big.jsonl", 12), chat_data(tmp_path / "small.jsonl", 4, offset=300)
    mix = ["--set", f"data=[{{path: '{big}', weight: 0.5}}, {{path: '{small}', weight: 0.5}}]"]
    cli = [sys.executable, "-m", "sftlab.cli"]
    one = _launch([*cli, *_train_args(tiny_model_dir, data, tmp_path / "one", 4), *mix])
    assert one.returncode == 0, one.stderr[-2000:]
    ref = _losses(tmp_path / "one")
    assert len(ref) == STEPS
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    out = tmp_path / "two"
    cut = _launch([*torchrun, f"--master_port={_free_port()}", *cli[1:],
                   *_train_args(tiny_model_dir, data, out, 2, steps=3), *mix, "--set", "save_steps=1"])
    assert cut.returncode == 0, _worker_errors(cut.stderr)
    assert (out / A.CHECKPOINTS / "checkpoint-3").is_dir()
    resumed = _launch([*torchrun, f"--master_port={_free_port()}", *cli[1:],
                       *_train_args(tiny_model_dir, data, out, 2), *mix, "--resume"])
    assert resumed.returncode == 0, _worker_errors(resumed.stderr)
    assert _losses(out) == pytest.approx(ref, abs=TOL)

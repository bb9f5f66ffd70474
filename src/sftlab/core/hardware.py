"""Facts about the machine a run is on: device, its memory, peak memory of this process,
and a measured answer to "is bf16 faster than fp32 here?" (:func:`probe_precision`)."""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sftlab.core.io import cached_entry, store_entry


def device_name() -> str:
    """The GPU's name on CUDA, else "cpu"."""
    import torch  # deferred: heavy library, imported on first use

    return torch.cuda.get_device_properties(0).name if torch.cuda.is_available() else "cpu"


def device_memory_gb() -> tuple[str, float]:
    """("cuda", the GPU's total GiB) on a GPU, else ("cpu", the RAM available now in GiB)."""
    import torch  # deferred: heavy library, imported on first use

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        import psutil  # deferred: heavy library, imported on first use

        return "cpu", psutil.virtual_memory().available / 2**30
    except ImportError:  # pragma: no cover - psutil is a dependency
        return "cpu", os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA max allocated on GPU, else peak resident set size."""
    import torch  # deferred: heavy library, imported on first use

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- precision probe -----------------------------------------------------------------------------
PROBE_FLOPS = 5e8  # per repetition and precision: ~5-10 ms on one core, so the probe stays under a second
PROBE_REPS = 3
PROBE_CACHE = "precision-probe.json"  # in core.io.cache_root()


@dataclass
class PrecisionProbe:
    """What one bf16-vs-fp32 measurement found. Times in milliseconds per forward+backward of the
    probe (two linear layers of the model's shapes, ``tokens`` rows); ``cached``: read from the cache."""

    fp32_ms: float
    bf16_ms: float
    hidden: int
    intermediate: int
    tokens: int
    threads: int
    cpu: str
    torch: str
    cached: bool = False

    @property
    def bf16_speedup(self) -> float:
        """fp32 time / bf16 time: above 1, bf16 is faster."""
        return self.fp32_ms / max(self.bf16_ms, 1e-9)

    def to_dict(self) -> dict:
        return {**asdict(self), "bf16_speedup": round(self.bf16_speedup, 3)}


def _cpuinfo(field_name: str) -> str | None:
    """The first ``field_name`` line of ``/proc/cpuinfo`` (its value), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field_name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpu_flags() -> str:
    return _cpuinfo("flags") or ""


def machine_key() -> str:
    """What a CPU speed measurement depends on besides its shapes: the CPU model, its instruction sets,
    oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``, e.g. ``AVX512_CORE_BF16`` turns AMX off on the same CPU)
    and the torch version."""
    import torch  # deferred: heavy library, imported on first use

    flags = hashlib.sha1(_cpu_flags().encode()).hexdigest()[:12]
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    isa_part = f"|isa {isa.upper()}" if isa else ""
    return f"{cpu_model()}|{flags}{isa_part}|torch {torch.__version__}"


def _probe_key(hidden: int, intermediate: int, tokens: int) -> str:
    """Same machine (:func:`machine_key`), same shapes: the same answer."""
    return f"{machine_key()}|{hidden}x{intermediate}x{tokens}"


def probe_rows(hidden: int, intermediate: int) -> int:
    """Rows of the probe's input: about :data:`PROBE_FLOPS` per repetition, 16..512 (a micro-batch of
    short rows; fewer rows would measure call overhead, not the matmul units)."""
    flops_per_row = 6 * (hidden * hidden + hidden * intermediate)  # forward 2, backward 4 per multiply-add
    return int(min(512, max(16, PROBE_FLOPS / flops_per_row)))


def _time_ms(fn, reps: int) -> float:
    """The fastest of ``reps`` calls after one warm-up call, in ms of this process's CPU time (all its
    threads): other processes on a shared machine slow the wall clock, not the work, and the
    fastest repetition is the one least disturbed by the cache and the scheduler."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return min(times)


def _probe_step(hidden: int, intermediate: int, tokens: int, dtype):
    """One forward+backward through hidden->hidden and hidden->intermediate linears, weights and
    input in ``dtype`` (what a bf16 LoRA run holds: the base weights in bf16; fp32 for fp32)."""
    import torch  # deferred: heavy library, imported on first use

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_(True)
    w1 = (torch.randn(hidden, hidden, generator=g) / hidden**0.5).to(dtype).requires_grad_(True)
    w2 = (torch.randn(intermediate, hidden, generator=g) / hidden**0.5).to(dtype).requires_grad_(True)

    def step():
        y = torch.nn.functional.linear(torch.nn.functional.linear(x, w1), w2)
        y.float().square().mean().backward()
        x.grad = w1.grad = w2.grad = None

    return step


def measure_precision(hidden: int, intermediate: int, *, reps: int = PROBE_REPS) -> PrecisionProbe:
    """Time fp32 and bf16 forward+backward of the model's two linear shapes on this CPU (no cache).

    Rows are chosen so one repetition is about :data:`PROBE_FLOPS` (16..512 rows); fp32 and bf16
    alternate three times on one thread, each time the fastest of ``reps`` after a warm-up (CPU time; see :func:`_time_ms`).
    """
    import torch  # deferred: heavy library, imported on first use

    tokens = probe_rows(hidden, intermediate)
    steps = {name: _probe_step(hidden, intermediate, tokens, dt)
             for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    threads = torch.get_num_threads()
    # One thread: the fp32/bf16 ratio is a property of the core's matmul units, and on a busy machine
    # a descheduled worker thread makes the others spin at the barrier, which CPU time would count.
    torch.set_num_threads(1)
    try:
        for _ in range(3):  # alternate, so a burst of load elsewhere hits both
            for name, step in steps.items():
                times[name].append(_time_ms(step, reps))
    finally:
        torch.set_num_threads(threads)
    return PrecisionProbe(fp32_ms=round(min(times["fp32"]), 3), bf16_ms=round(min(times["bf16"]), 3),
                          hidden=hidden, intermediate=intermediate, tokens=tokens,
                          threads=1, cpu=cpu_model(), torch=torch.__version__)


def probe_precision(hidden: int, intermediate: int, *, use_cache: bool = True) -> PrecisionProbe:
    """:func:`measure_precision`, cached per machine in ``~/.cache/sftlab/precision-probe.json``
    (``$SFTLAB_CACHE``), keyed by CPU model and flags, torch version and shapes."""
    key = _probe_key(hidden, intermediate, probe_rows(hidden, intermediate))
    entry = cached_entry(PROBE_CACHE, key) if use_cache else None
    if entry is not None:
        try:
            return PrecisionProbe(**{**entry, "cached": True})
        except TypeError:
            pass  # an entry of another version: measure again
    probe = measure_precision(hidden, intermediate)
    if use_cache:
        store_entry(PROBE_CACHE, key, {k: v for k, v in asdict(probe).items() if k != "cached"})
    return probe

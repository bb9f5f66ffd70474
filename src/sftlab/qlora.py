"""Whether QLoRA (bitsandbytes 4-bit NF4) can train here: one shared rule (`sftlab plan` uses it).

QLoRA needs bitsandbytes. On CUDA any supported release will do (the ``qlora`` extra pins the floor);
on CPU its 4-bit kernels train NF4 as on a GPU (the base dequantised one linear at a time). 0.50 is the
oldest release we have seen train a QLoRA step on CPU, so it is the floor there.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

from sftlab.core.errors import SftlabError

MIN_BITSANDBYTES_CPU = "0.50"


@functools.lru_cache(maxsize=None)
def bitsandbytes_version() -> str | None:
    """The version of bitsandbytes if it imports, else None. Imported once, without its optional-kernel notices."""

    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # deferred: heavy optional library (the qlora extra)
    except Exception:  # not installed, or an install that fails to load its native library
        return None
    finally:
        log.setLevel(level)
    version = getattr(bitsandbytes, "__version__", None)
    if not version:
        try:
            version = dist_version("bitsandbytes")
        except PackageNotFoundError:  # pragma: no cover - imported from a source tree
            version = "0"
    return str(version)


def _at_least(version: str, minimum: str) -> bool:
    try:
        from packaging.version import Version  # deferred: only QLoRA checks need it

        return Version(version) >= Version(minimum)
    except Exception:  # packaging missing or an unparsable version: compare the leading numbers
        def nums(v: str) -> tuple[int, ...]:
            out = []
            for part in v.split(".")[:3]:
                digits = "".join(c for c in part if c.isdigit())
                if not digits:
                    break
                out.append(int(digits))
            return tuple(out)

        return nums(version) >= nums(minimum)


def qlora_unavailable(device: str) -> str | None:
    """None when QLoRA can train on ``device`` ("cuda" or "cpu") here; else one line saying why, with the fix."""
    version = bitsandbytes_version()
    where = "on CPU " if device == "cpu" else ""
    floor = f">={MIN_BITSANDBYTES_CPU}" if device == "cpu" else ""
    if version is None:
        return (f"QLoRA {where}needs bitsandbytes{' ' + floor if floor else ''}, which is not installed "
                f"(pip install 'bitsandbytes{floor}', or use --method lora)")
    if device == "cpu" and not _at_least(version, MIN_BITSANDBYTES_CPU):
        return (f"QLoRA on CPU needs bitsandbytes {floor}, found {version} "
                f"(pip install -U 'bitsandbytes{floor}', or use --method lora)")
    return None


def require_qlora(device: str) -> None:
    """Raise :class:`SftlabError` (one line, with the fix) unless QLoRA can train on ``device`` here."""
    reason = qlora_unavailable(device)
    if reason:
        raise SftlabError(reason)

__all__ = ["MIN_BITSANDBYTES_CPU", "bitsandbytes_version", "qlora_unavailable", "require_qlora"]

"""Atomic file writes: write to a temporary path next to the target, then rename.

A write that fails (a full disk, a read-only or missing folder, a file where a folder should be)
leaves the previous file or folder as it was and raises one :class:`SftlabError` line naming the path.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from sftlab.core.errors import SftlabError

_UMASK = os.umask(0)
os.umask(_UMASK)


# errno values a user fixes (free space, permissions, the path): one line, not a traceback.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                errno.EISDIR, errno.ENAMETOOLONG}


def describe_os_error(exc: OSError) -> str:
    """A few words for an OSError: "the disk is full", "Permission denied", ..."""
    return {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only"}.get(exc.errno, exc.strerror or str(exc))


def write_error(path: Path, exc: OSError, kept: bool) -> SftlabError:
    """The one-line error for an OSError while writing ``path`` (``kept``: a previous version survives)."""
    what = describe_os_error(exc)
    fix = {errno.ENOSPC: "free some space and run again", errno.EDQUOT: "free some space and run again",
           errno.ENOTDIR: "a parent of it is a file: choose another path",
           errno.EEXIST: "a file is in the way: choose another path"}.get(exc.errno, "choose a writable path")
    keep = "; the previous version is kept" if kept else "; nothing was written"
    return SftlabError(f"cannot write {path}: {what}{keep}", hint=fix)


def _publish_mode(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) paths; give the result the usual permissions
    (0666 less the umask; 0777 for a folder or an executable)."""
    mode = os.stat(path).st_mode & 0o777
    os.chmod(path, (mode | (0o777 if directory or mode & 0o111 else 0o666)) & ~_UMASK)


def publish_tree(root: str | Path) -> None:
    """Give folder ``root`` and everything in it the usual permissions (see :func:`_publish_mode`).

    What a library writes into a folder sftlab then publishes can be private: mkdtemp makes the folder
    0700, and safetensors writes every ``*.safetensors`` file 0600, so without this an exported or
    saved model is unreadable to other users and containers. Links are left alone."""
    root = Path(root)
    _publish_mode(root, directory=True)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder, name)
            if not p.is_symlink():
                _publish_mode(p, directory=name in dirs)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w"):
    """Open a temporary sibling of ``path``; it replaces ``path`` only if the block finishes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno not in USER_ERRNOS | {errno.ENOENT}:  # ENOENT here: a folder no file can be made in
            raise
        raise write_error(path, exc, path.exists()) from None
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        _publish_mode(Path(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno not in USER_ERRNOS:
            raise
        raise write_error(path, exc, path.exists()) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# In each output folder: the names sftlab wrote there, so a later run may replace them (and only them).
OUTPUT_MARK = ".sftlab-output"


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside ``path``; it is renamed to ``path`` only on success.

    An existing ``path`` is replaced only when everything in it is sftlab's: what an earlier output
    recorded in its :data:`OUTPUT_MARK`, or what the new output holds too. A file at ``path``, or a
    folder with anything else in it (the input data, the user's notes, ``--out .``), is an error and
    nothing is written or removed."""
    path = _out_dir(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        if exc.errno not in USER_ERRNOS | {errno.ENOENT}:  # ENOENT here: a folder no file can be made in
            raise
        raise write_error(path, exc, path.exists()) from None
    try:
        yield tmp
        publish_tree(tmp)
        _mark_output(tmp, path)
        _swap_in(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in USER_ERRNOS:
            raise
        raise write_error(path, exc, path.exists()) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _out_dir(path: str | Path) -> Path:
    """``path`` as an output folder; SftlabError when a file is there."""
    path = Path(path)
    if path.name in ("", ".", ".."):  # `--out .`: the folder by its own name, beside it in its parent
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise SftlabError(f"{path} is a file: the output is a folder and would replace it",
                          hint="choose another output path")
    return path


def check_output_dir(path: str | Path, names: list[str]) -> None:
    """The refusals of :func:`atomic_dir` for an output of the files ``names``, made before a command
    writes anything else (e.g. `prepare --dump` beside `--out`), so that a refused output leaves nothing."""
    path = _out_dir(path)
    _refuse_foreign(path, names)


def _refuse_foreign(path: Path, written: list[str]) -> None:
    """SftlabError when the folder ``path`` holds anything neither ``written`` nor recorded as sftlab's."""
    if path.is_dir():
        try:
            earlier = set(json.loads((path / OUTPUT_MARK).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            earlier = set()
        foreign = sorted({p.name for p in path.iterdir()} - set(written) - earlier - {OUTPUT_MARK})
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise SftlabError(f"{path} already holds {shown}, which this output would delete; nothing was written",
                              hint="choose a new output folder, or move those files out of it")


def _mark_output(tmp: Path, path: Path) -> None:
    """Record what ``tmp`` holds; refuse when the folder it would replace holds anything else."""
    written = sorted(p.name for p in tmp.iterdir())
    _refuse_foreign(path, written)
    (tmp / OUTPUT_MARK).write_text(json.dumps(written), encoding="utf-8")


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is moved aside first and put back if that fails."""
    aside = None
    if path.exists():
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        if aside is not None:
            os.replace(aside, path)
        raise
    if aside is not None:
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink()


def json_safe(obj):
    """``obj`` with each NaN/inf float as the string "nan"/"inf"/"-inf": json.dumps writes them as NaN and
    Infinity, which no strict JSON parser (jq, JavaScript) reads (a diverged model's eval loss is NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_jsonl(path: str | Path, rows) -> int:
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def cache_root() -> Path:
    """sftlab's per-user cache: ``$SFTLAB_CACHE`` if set, else ``~/.cache/sftlab`` (converted models,
    cached measurements)."""
    env = os.environ.get("SFTLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sftlab"


def cached_entry(name: str, key: str) -> dict | None:
    """Entry ``key`` of the JSON cache file ``name`` in :func:`cache_root`, or None (missing, unreadable)."""
    try:
        entry = json.loads((cache_root() / name).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) else None


def store_entry(name: str, key: str, entry: dict) -> None:
    """Set ``key`` in the JSON cache file ``name`` (atomically); a read-only home is not an error: the
    measurement is simply taken again next time."""
    path = cache_root() / name
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache, indent=1))
    except OSError:
        pass

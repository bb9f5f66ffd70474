"""Read data files into records: (line, dict) pairs, each remembering where it came from.

JSONL, JSON (a list, or an object holding one list), CSV, Parquet and local Hugging Face datasets
(a folder written by ``Dataset.save_to_disk`` or a folder of data files) are supported. Every record
carries the 1-based line of the input file (JSONL, CSV, JSON arrays) or the 1-based row number
(Parquet, datasets), so every later error and finding can point at it.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from sftlab.core.errors import SftlabError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_BOM = b"\xef\xbb\xbf"


@dataclass
class Record:
    source: str  # file name as given
    line: int  # 1-based line (or row) in that file
    data: dict | None  # None when the line could not be parsed
    error: str | None = None  # why it could not be parsed

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_records(path: str | Path, *, strict: bool = True) -> list[Record]:
    """Read every record of a data file or a local dataset folder.

    With ``strict`` a line that does not parse raises SftlabError naming it; without, it is
    returned as a Record with ``data=None`` and ``error`` set (the data doctor reports those).
    """
    p = Path(path)
    if not p.exists():
        raise SftlabError(f"data file '{path}' not found", hint="check the path")
    if p.is_dir():
        records = _read_dataset_dir(p)
    else:
        suffix = p.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise SftlabError(
                f"{path}: unsupported file type '{suffix or '(none)'}'",
                hint="use .jsonl, .json, .csv, .parquet or a local Hugging Face dataset folder",
            )
        records = readers[suffix](p)
    if strict:
        for r in records:
            if r.data is None:
                raise SftlabError(f"{r.where()}: {r.error}", hint="fix or remove that line; `sftlab doctor` lists every such line")
    if not records:
        raise SftlabError(f"{path}: no examples found", hint="the file is empty")
    return records


def _read_jsonl(p: Path) -> list[Record]:
    out: list[Record] = []
    raw = p.read_bytes()
    if raw.startswith(_BOM):  # a UTF-8 byte order mark (Excel, Notepad) is no part of the first line
        raw = raw[len(_BOM):]
    for i, bline in enumerate(raw.split(b"\n"), start=1):
        if not bline.strip():
            continue
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.append(Record(str(p), i, None, f"invalid UTF-8 at byte {exc.start} of the line"))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            out.append(Record(str(p), i, None, f"line is not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(obj, dict):
            out.append(Record(str(p), i, None, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        out.append(Record(str(p), i, obj))
    return out


def _read_json(p: Path) -> list[Record]:
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: a leading byte order mark is skipped
    except UnicodeDecodeError as exc:
        raise SftlabError(f"{p}: invalid UTF-8 at byte {exc.start}", hint="re-encode the file as UTF-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SftlabError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg})", hint="fix the JSON, or use JSONL")
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise SftlabError(f"{p}: expected a JSON list of examples (or an object holding one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise SftlabError(f"{p}: expected a JSON list of examples")
    # Point each example at the line where it starts: scan for top-level item starts.
    starts = _json_item_lines(text, len(obj))
    out = []
    for i, item in enumerate(obj):
        line = starts[i] if i < len(starts) else i + 1
        if isinstance(item, dict):
            out.append(Record(str(p), line, item))
        else:
            out.append(Record(str(p), line, None, f"expected a JSON object, got {type(item).__name__}"))
    return out


def _json_item_lines(text: str, n: int) -> list[int]:
    """1-based line numbers where each element of the (first) top-level JSON list begins."""
    lines: list[int] = []
    depth = 0
    in_str = esc = False
    line = 1
    list_depth = None
    expect_item = False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if expect_item and not ch.isspace():
            if ch != "]":
                lines.append(line)
            expect_item = False
        if ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if ch == "[" and list_depth is None:
                list_depth = depth
                expect_item = True
        elif ch in "]}":
            depth -= 1
        elif ch == "," and list_depth is not None and depth == list_depth:
            expect_item = True
        if len(lines) >= n:
            break
    return lines


def _read_csv(p: Path) -> list[Record]:
    # The csv module refuses cells over 128 KiB by default ("field larger than field limit"): long
    # documents are valid data, and the length policy (max_seq_length) is what deals with them.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the limit is a C long (32 bits on Windows)
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            out = []
            for row in reader:
                # reader.line_num is the physical line the row ended on; multi-line cells are rare.
                out.append(Record(str(p), reader.line_num, {k: v for k, v in row.items() if k is not None}))
            return out
    except UnicodeDecodeError as exc:
        raise SftlabError(f"{p}: invalid UTF-8 at byte {exc.start}", hint="re-encode the file as UTF-8")
    except csv.Error as exc:
        raise SftlabError(f"{p}: malformed CSV ({exc})")


def _read_parquet(p: Path) -> list[Record]:
    import pyarrow.parquet as pq  # deferred: heavy library, imported on first use

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as exc:  # pyarrow raises many types for a damaged file
        raise SftlabError(f"{p}: cannot read Parquet file ({exc})")
    return [Record(str(p), i, row) for i, row in enumerate(rows, start=1)]


def _read_dataset_dir(p: Path) -> list[Record]:
    """A folder from Dataset.save_to_disk, or a folder of data files (the first split found)."""
    import datasets  # deferred: heavy library, imported on first use

    if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as exc:
            raise SftlabError(f"{p}: cannot load the dataset folder ({exc})")
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        return [Record(str(p), i, row) for i, row in enumerate(ds, start=1)]
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in SUFFIXES)
    if not files:
        raise SftlabError(f"{p}: no data files (.jsonl/.json/.csv/.parquet) in this folder")
    out: list[Record] = []
    for f in files:
        out.extend(read_records(f, strict=False))
    return out

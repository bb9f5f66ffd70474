"""Read data files into records: (line, dict) pairs, each remembering where it came from.

JSONL, JSON (a list, an object holding one list, or one conversation object), CSV, Parquet and local Hugging Face datasets
(a folder written by ``Dataset.save_to_disk``, or a folder of data files whose train split is read,
as ``load_dataset(folder)`` picks it) are supported. Every record carries the 1-based line of the
input file (JSONL, CSV, JSON arrays) or the 1-based row number (Parquet, datasets), so every later
error and finding can point at it.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from sftlab.core.errors import SftlabError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON text spells one: only then is a walk needed
SURROGATE_FIX = "remove or complete the cut character: \\ud83d\\ude00 is a whole emoji, \\ud83d alone is half of one"
_DEEP_FIX = "no chat record nests that deep: fix or remove it"
_CSV_COMMA_FIX = 'put double quotes around each value that holds a comma ("red, green, blue"), doubling quotes inside it'


@dataclass
class Record:
    source: str  # file name as given
    line: int  # 1-based line (or row) in that file
    data: dict | None  # None when the line could not be parsed
    error: str | None = None  # why it could not be parsed
    fix: str | None = None  # how to fix it, when more specific than "fix or remove that line"
    check: str = "parse"  # the doctor's check for the error: "parse" or "encoding"
    header: tuple[str, ...] | None = None  # a CSV or Parquet row: the file's column names as written (for format errors)

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_records(path: str | Path, *, strict: bool = True, split: str = "train") -> list[Record]:
    """Read every record of a data file or a local dataset folder (of a folder, its ``split``: "train",
    or "eval" for held-out data, see :func:`folder_files`).

    With ``strict`` a line that does not parse raises SftlabError naming it; without, it is
    returned as a Record with ``data=None`` and ``error`` set (the data doctor reports those).
    """
    p = Path(path)
    if not p.exists():
        where = "" if p.is_absolute() else f"; a relative path starts at the working folder, {Path.cwd()}, also in a config file"
        raise SftlabError(f"data file '{path}' not found", hint=f"check the path{where}")
    if p.is_dir():
        records = _read_dataset_dir(p, split)
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
                raise SftlabError(f"{r.where()}: {r.error}",
                                  hint=r.fix or "fix or remove that line; `sftlab doctor` lists every such line")
    if not records:
        raise SftlabError(f"{path}: no examples found", hint=_why_empty(p))
    return records


def _why_empty(p: Path) -> str:
    """Why a file or folder read as no records: what it holds instead."""
    if p.is_dir():
        return "its data files hold no records"
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return "the Parquet file has no rows"
    if not p.read_bytes().removeprefix(_BOM):
        return "the file is empty"
    return {".csv": "the CSV file has a header but no rows",
            ".json": "the JSON holds an empty list"}.get(suffix, "the file holds only blank lines")


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
            out.append(Record(str(p), i, None, f"invalid UTF-8 at byte {exc.start} of the line", check="encoding"))
            continue
        try:
            obj, repeated = _loads(line)
        except json.JSONDecodeError as exc:
            out.append(Record(str(p), i, None, f"line is not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except RecursionError:
            out.append(Record(str(p), i, None, "line is nested too deeply to read (lists or objects inside "
                              "each other over a thousand levels)", fix=_DEEP_FIX))
            continue
        if not isinstance(obj, dict):
            out.append(Record(str(p), i, None, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        out.append(_checked(str(p), i, obj, line, repeated))
    return out


class _Repeated(dict):
    """A JSON object that spelled a key twice (``key``: the first such); plain ``json`` keeps the last value."""

    key = ""


_REPEATS = [0]  # objects with a repeated key parsed so far: a parse that added none needs no walk


def _loads(text: str):
    """``json.loads``, and whether the text gave some object a key twice (see :func:`repeated_key`)."""
    before = _REPEATS[0]
    obj = json.loads(text, object_pairs_hook=_pairs)
    return obj, _REPEATS[0] != before


def _pairs(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) == len(pairs):
        return d
    _REPEATS[0] += 1
    seen: set = set()
    rep = _Repeated(d)
    rep.key = next(k for k, _ in pairs if k in seen or seen.add(k))
    return rep


def repeated_key(obj) -> str | None:
    """Where ``obj`` (parsed with :func:`_pairs`) holds an object with a key given twice: a one-line
    problem naming the key, or None. JSON readers keep only the last value: the first is lost silently."""
    stack = [(obj, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, _Repeated):
            return (f"key '{v.key}' is given twice in {path or 'the record'}; JSON keeps only the last value, "
                    "so the first would be lost silently")
        if isinstance(v, dict):
            stack += [(x, f"{path}.{k}" if path else str(k)) for k, x in reversed(v.items())]
        elif isinstance(v, list):
            stack += [(x, f"{path}[{j}]") for j, x in reversed(list(enumerate(v)))]
    return None


REPEATED_KEY_FIX = "remove or rename one of the two"


def unpaired_surrogate(obj, text: str | None = None) -> str | None:
    """Where ``obj`` (parsed JSON) holds a lone UTF-16 surrogate, e.g. ``"\\ud83d"``, half an emoji:
    "messages[0].content holds ..."; None when it holds none. Such a string cannot be encoded as
    UTF-8, so no tokenizer takes it. ``text``, the JSON it was parsed from, skips the walk when it
    spells no surrogate escape."""
    if text is not None and not _SURROGATE_ESCAPE.search(text):
        return None
    stack = [(obj, "")]
    while stack:  # iterative: a deep (but parseable) record must not hit the recursion limit here
        v, path = stack.pop()
        if isinstance(v, dict):
            for k, x in reversed(v.items()):
                stack += [(x, f"{path}.{k}" if path else str(k)), (k, f"a key of {path or 'the record'}")]
        elif isinstance(v, list):
            stack += [(x, f"{path}[{j}]") for j, x in reversed(list(enumerate(v)))]
        elif isinstance(v, str) and not v.isascii() and (m := _SURROGATE.search(v)):
            return f"{path or 'the value'} holds an unpaired UTF-16 surrogate {ascii(m.group())[1:-1]} (half of a cut character)"
    return None


def _checked(source: str, line: int, obj, text: str | None, repeated: bool = False) -> Record:
    """The record, or an unreadable one when its strings hold a lone surrogate (no tokenizer takes those),
    or (``repeated``: the text spelled a key twice somewhere) an object that gives a key twice."""
    problem = repeated_key(obj) if repeated else None
    if problem:
        return Record(source, line, None, problem, fix=REPEATED_KEY_FIX)
    problem = unpaired_surrogate(obj, text)
    if problem:
        return Record(source, line, None, problem, fix=SURROGATE_FIX, check="encoding")
    return Record(source, line, obj)


def _read_json(p: Path) -> list[Record]:
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: a leading byte order mark is skipped
    except UnicodeDecodeError:
        raise _bad_utf8(p) from None
    try:
        obj, repeated = _loads(text)
    except json.JSONDecodeError as exc:
        raise SftlabError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg})", hint="fix the JSON, or use JSONL")
    except RecursionError:
        raise SftlabError(f"{p}:{_deep_line(text)}: nested too deeply to read (lists or objects inside each other "
                          "over a thousand levels)", hint=_DEEP_FIX)
    if isinstance(obj, dict) and _one_conversation(obj):  # {"messages": [...]}: one example, not a list of them
        return [_checked(str(p), 1, obj, text, repeated)]
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
            out.append(_checked(str(p), line, item, text, repeated))
        else:
            out.append(Record(str(p), line, None, f"expected a JSON object, got {type(item).__name__}"))
    return out


def _one_conversation(obj: dict) -> bool:
    """Is this JSON object one chat (a 'messages' or 'conversations' list of role/from objects)?"""
    turns = next((obj[k] for k in ("messages", "conversations", "conversation") if isinstance(obj.get(k), list)), None)
    return bool(turns) and all(isinstance(t, dict) and ("role" in t or "from" in t) for t in turns)


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


def _deep_line(text: str, limit: int = 500) -> int:
    """The 1-based line where lists/objects first nest ``limit`` levels deep (outside strings)."""
    depth, line, in_str, esc = 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        elif in_str:
            esc, in_str = (False, in_str) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth >= limit:
                return line
        elif ch in "]}":
            depth -= 1
    return line


# Columns the formats read: a CSV header (or Parquet file) names them in any case, with spaces around ("Instruction",
# " prompt ").
CSV_COLUMNS = ("messages", "conversations", "conversation", "instruction", "input", "output", "prompt", "completion",
               "text", "system", "weight", "tools", "functions", "history")


def csv_columns(p: Path, header: list[str]) -> list[str]:
    """The header with each name of a known column (:data:`CSV_COLUMNS`, matched ignoring case and surrounding
    spaces) written as the formats read it; other names as they are. Two names for one column: SftlabError."""
    out = [k if (k := str(h).strip().casefold()) in CSV_COLUMNS else h for h in header]
    twice = next((k for k in CSV_COLUMNS if out.count(k) > 1), None)
    if twice:
        same = " and ".join(repr(h) for h, k in zip(header, out) if k == twice)
        what, verb = ("CSV header", "names") if p.suffix.lower() == ".csv" else ("columns", "name")
        raise SftlabError(f"{p}: the {what} {','.join(header)!r} {verb} the column '{twice}' twice ({same})",
                          hint="keep one of them (column names are read ignoring case and surrounding spaces)")
    return out


def _read_csv(p: Path) -> list[Record]:
    # The csv module refuses cells over 128 KiB by default ("field larger than field limit"): long
    # documents are valid data, and the length policy (max_seq_length) is what deals with them.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the limit is a C long (32 bits on Windows)
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            header = tuple(reader.fieldnames or ())
            reader.fieldnames = csv_columns(p, list(header))
            out = []
            for row in reader:
                # reader.line_num is the physical line the row ended on; multi-line cells are rare.
                if None in row:  # more cells than the header: an unquoted comma split a value
                    n, m = len(reader.fieldnames) + len(row[None]), len(reader.fieldnames)
                    out.append(Record(str(p), reader.line_num, None, f"row has {n} cells, the header {m}: "
                                      "a value holding a comma was split", fix=_CSV_COMMA_FIX))
                    continue
                out.append(Record(str(p), reader.line_num, row, header=header))
            return out
    except UnicodeDecodeError:  # its offset counts from the reader's last chunk, not the file: find the line
        raise _bad_utf8(p) from None
    except csv.Error as exc:
        raise SftlabError(f"{p}: malformed CSV ({exc})")


def _bad_utf8(p: Path) -> SftlabError:
    """The error for a file that is not UTF-8, naming its first bad line and the byte in it."""
    for i, line in enumerate(p.read_bytes().split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return SftlabError(f"{p}:{i}: invalid UTF-8 at byte {exc.start} of the line ({line[exc.start:exc.end]!r})",
                               hint="re-encode the file as UTF-8 (it may be cp1252 or latin-1)")
    return SftlabError(f"{p}: invalid UTF-8", hint="re-encode the file as UTF-8")


def _read_parquet(p: Path) -> list[Record]:
    import pyarrow.parquet as pq  # deferred: heavy library, imported on first use

    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises many types for a damaged file
        raise SftlabError(f"{p}: cannot read Parquet file ({exc})")
    header = tuple(table.column_names)
    table = table.rename_columns(csv_columns(p, list(header)))
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:  # a string column holds bytes that are not UTF-8: find the rows
        return [_parquet_row(p, table, i, header) for i in range(table.num_rows)]
    return [Record(str(p), i, row, header=header) for i, row in enumerate(rows, start=1)]


def _parquet_row(p: Path, table, i: int, header: tuple[str, ...]) -> Record:
    try:
        return Record(str(p), i + 1, table.slice(i, 1).to_pylist()[0], header=header)
    except UnicodeDecodeError as exc:  # e.g. a surrogate written as UTF-8 bytes (CESU-8), a cut character
        return Record(str(p), i + 1, None, f"invalid UTF-8 in a text column ({exc.reason} at byte {exc.start})",
                      fix="re-encode the text as UTF-8; remove or complete any cut character", check="encoding")


# Split names in file or folder names, as Hugging Face's load_dataset(folder) reads them: the keyword
# between separators ("train.jsonl", "data/train-00000-of-00002.parquet", "train/part1.jsonl").
_SPLITS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
           "test": ("test", "testing", "eval", "evaluation")}
_SPLIT_RES = {name: re.compile(rf"(?:^|[-._ 0-9/])(?:{'|'.join(words)})(?=[-._ 0-9/])", re.I)
              for name, words in _SPLITS.items()}


def split_of(rel: str) -> str | None:
    return next((name for name, rx in _SPLIT_RES.items() if rx.search(rel)), None)


def folder_files(p: Path, split: str = "train") -> tuple[list[Path], list[Path]]:
    """(the data files of folder ``p`` in ``split``, the other data files), as Hugging Face's
    ``load_dataset(folder)`` picks them: hidden files and folders (``.ipynb_checkpoints``, ``.git``)
    and ``__``-folders are skipped; when file names name splits (train*, test*, valid*/dev*, eval*, or
    such a subfolder), only ``split`` is read ("train"; "eval": the validation split, else the test
    split); when none does, every file is. No file of the split raises SftlabError."""
    found = sorted(f for f in p.rglob("*") if f.suffix.lower() in SUFFIXES and f.is_file()
                   and not any(part.startswith((".", "__")) for part in f.relative_to(p).parts))
    if not found:
        raise SftlabError(f"{p}: no data files (.jsonl/.json/.csv/.parquet) in this folder",
                          hint="hidden files and folders (.name) are skipped")
    splits = {f: split_of(f.relative_to(p).as_posix()) for f in found}
    if not any(splits.values()):  # one file named as another split is that split: not read as this one
        return found, []
    wanted = ("train",) if split == "train" else ("validation", "test")
    name = next((w for w in wanted if any(splits[f] == w for f in found)), None)
    if name is None:
        named = ", ".join(f"{f.relative_to(p)} is {splits[f]}" for f in found if splits[f])
        what = "training" if split == "train" else "validation or test"
        raise SftlabError(f"{p}: no {what} split in this folder of {len(found)} data file{'s' * (len(found) != 1)}, "
                          f"named as other splits: {named}",
                          hint=f"name the file {'train' if split == 'train' else 'validation or test'}.jsonl "
                               "(or *-NNNNN-of-NNNNN), or pass that file itself")
    return [f for f in found if splits[f] == name], [f for f in found if splits[f] != name]


def is_saved_dataset(p: Path) -> bool:
    """``p`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return any((p / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_dataset_dir(p: Path, split: str = "train") -> list[Record]:
    """A folder from Dataset.save_to_disk, or a folder of data files (by file name, as
    :func:`folder_files` picks them): its train split ("train"), or validation, else test ("eval")."""
    import datasets  # deferred: heavy library, imported on first use

    if is_saved_dataset(p):
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as exc:
            raise SftlabError(f"{p}: cannot load the dataset folder ({exc})")
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[_dict_split(p, list(ds), split)]
        header = tuple(ds.column_names)  # matched to the formats' columns as a CSV header or Parquet file is
        ds = ds.rename_columns({a: b for a, b in zip(header, csv_columns(p, list(header))) if a != b})
        return [Record(str(p), i, row, header=header) for i, row in enumerate(ds, start=1)]
    out: list[Record] = []
    for f in folder_files(p, split)[0]:
        out.extend(read_records(f, strict=False))
    return out


def _dict_split(p: Path, names: list[str], split: str) -> str:
    """The split of a saved DatasetDict to read: "train" (or the one split named so, e.g. train_sft), for
    "eval" validation, else test; a dict of one unnamed split is that split. Never another split."""
    wanted = ("train",) if split == "train" else ("validation", "test")
    for w in wanted:
        found = [n for n in names if n == w] or [n for n in names if split_of(f"{n}.") == w]
        if len(found) > 1:
            raise SftlabError(f"{p}: several {w} splits in this dataset ({', '.join(found)})",
                              hint="save the one to use as a dataset of its own: ds['NAME'].save_to_disk(FOLDER)")
        if found:
            return found[0]
    if len(names) == 1 and split_of(f"{names[0]}.") is None:
        return names[0]
    what = "training" if split == "train" else "validation or test"
    raise SftlabError(f"{p}: no {what} split in this dataset (it has {', '.join(names)})",
                      hint="save the split to use as a dataset of its own: ds['NAME'].save_to_disk(FOLDER)")

"""Turn every data source into one record schema: {id, question, cot, answer}.

A source is a built-in name (``gsm8k`` ships inside the package, the others are read from
``--data-dir``), a file path (format detected from its extension and fields), or
``hf:<dataset id>[:<config>]`` for a Hugging Face dataset when the machine is online.
Ids are stable, so a re-run maps each row to the same shard: a row's own ``id`` field when it has
one (a repeated id is a bad row), else ``<source>-<split>-<line>`` for the built-in sets and
``<file stem>-<8 hex digits of the file's resolved path>-<line>`` for a file (two files with the same
name in different folders do not collide).
A malformed row is never dropped silently: it raises ``RecordError`` (``on_error="fail"``) or is
returned in the ``skipped`` list that ends up in the shard manifest (``on_error="skip"``).

Text files (.jsonl, .txt) are decoded line by line: a UTF-8 byte-order mark at the start of the file is
accepted, a line that is not valid UTF-8 is a bad row (file:line and the byte), a trailing CR (Windows
line ends) is dropped, blank lines are ignored. Control characters other than tab, CR and LF (NUL,
ESC, DEL, U+0080-U+009F, ...) and unpaired surrogates in a field make the row bad: they cannot be
drawn and usually mean a damaged or binary file (tab, CR and LF are drawn as spaces). A .json file is one document: invalid UTF-8 or JSON there stops with file:line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

PACKAGE_DATA = Path(__file__).parent / "data"
CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")

# name -> (folder under the data dir, file name per split). Every split but icot_gsm8k's train ships in the package
# (packages/rot_data/data/README.md: sources and licences); --data-dir points at another copy.
BUILTIN_SOURCES = {
    "gsm8k": ("gsm8k", {"train": "train.jsonl", "test": "test.jsonl"}),
    "gsm_hard": ("gsm_hard", {"test": "test.jsonl"}),
    "svamp": ("svamp", {"test": "test.jsonl"}),
    "multiarith": ("multiarith", {"test": "test.json"}),
    "icot_gsm8k": ("icot_gsm8k", {"train": "train_no_aug.txt", "valid": "valid.txt", "test": "test.txt"}),
    "icot_mult_4x4": ("icot_mult_4x4", {"valid": "valid.txt", "test": "test_bigbench.txt"}),
    "icot_mult_5x5": ("icot_mult_5x5", {"valid": "valid.txt", "test": "test_bigbench.txt"}),
    "mult_3x3": ("mult_3x3", {"valid": "valid.txt", "test": "test.txt"}),  # generated here, same format
    "mult_6x6": ("mult_6x6", {"valid": "valid.txt", "test": "test.txt"}),
}


def builtin_datasets_help() -> str:
    """The built-in --dataset names for help texts, and which of their splits do not ship (read from the package folder,
    so the help cannot claim a file that is not there)."""
    missing = [f"{name} {split}" for name, (folder, files) in BUILTIN_SOURCES.items() for split, file in files.items()
               if not (PACKAGE_DATA / folder / file).exists()]
    return (f"{', '.join(BUILTIN_SOURCES)} (shipped in the package" + (f"; {', '.join(missing)} needs --data-dir" if missing else "")
            + ")")


UTF8_BOM = b"\xef\xbb\xbf"
FIELDS = ("id", "question", "cot", "answer")


class RecordError(ValueError):
    """A row that cannot become a record; the message names file, line and the fix."""


@dataclass(frozen=True)
class Record:
    id: str
    question: str
    cot: str
    answer: str
    file: str = field(default="", compare=False, repr=False)  # where the row came from, for bad-row messages
    line: int = field(default=0, compare=False, repr=False)

    def to_dict(self) -> dict:
        """The stored fields (not where the row came from)."""
        return {key: getattr(self, key) for key in FIELDS}


@dataclass(frozen=True)
class SkippedRow:
    file: str
    line: int
    reason: str


def bad_row(file: str, line: int, reason: str, on_error: str, skipped: list[SkippedRow]) -> None:
    """Stop on a bad row (``on_error="fail"``) or record it in ``skipped``: the one policy for every check."""
    if on_error == "fail":
        raise RecordError(f"{file}:{line}: {reason}; fix the row or pass --on-error skip")
    skipped.append(SkippedRow(file, line, reason))


def _number_text(value) -> str:
    """Render a numeric gold answer without a spurious '.0' (39.0 -> '39')."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"answer {value} is not a finite number")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _require_text(row: dict, key: str) -> str:
    if key not in row:
        raise KeyError(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise TypeError(f"field '{key}' is {type(value).__name__}, not a string")
    return value


def _split_gsm8k_solution(solution: str, keep_calculator: bool) -> tuple[str, str]:
    if "####" not in solution:
        raise ValueError("solution has no '#### <answer>' line")
    if solution.count("####") > 1:  # which one is the answer is a guess; the other would be drawn into the CoT
        raise ValueError(f"solution has {solution.count('####')} '####' markers; a solution ends with exactly one '#### <answer>'")
    cot, answer = solution.split("####")
    if not keep_calculator:
        cot = CALCULATOR_NOTE.sub("", cot)
    return cot.strip(), answer.strip().replace(",", "")


def _parse_row(row, fmt: str, keep_calculator: bool) -> tuple[str, str, str]:
    """One raw row of a known format -> (question, cot, answer). Raises on malformed rows."""
    if fmt == "icot":
        if "||" not in row or "####" not in row:
            raise ValueError("line is not 'question||cot #### answer'")
        question, rest = row.split("||", 1)
        if rest.count("####") > 1:  # which one is the answer is a guess; the other would be drawn into the CoT
            raise ValueError(f"line has {rest.count('####')} '####' markers; a row is 'question||cot #### answer' with exactly one")
        cot, answer = rest.split("####")
        return question.strip(), cot.strip(), answer.strip()
    if not isinstance(row, dict):
        raise TypeError(f"row is {type(row).__name__}, not an object")
    if fmt == "record":
        answer = row.get("answer")
        answer = _number_text(answer) if isinstance(answer, (int, float)) and not isinstance(answer, bool) \
            else _require_text(row, "answer")  # integer answers are accepted as in the benchmark formats
        return _require_text(row, "question").strip(), _require_text(row, "cot").strip(), answer.strip()
    if fmt == "gsm8k":
        cot, answer = _split_gsm8k_solution(_require_text(row, "answer"), keep_calculator)
        return _require_text(row, "question").strip(), cot, answer
    if fmt in ("gsm_hard", "svamp"):
        if "target" not in row:
            raise KeyError("missing field 'target'")
        return _require_text(row, "input").strip(), "", _number_text(row["target"])
    if fmt == "multiarith":
        solutions = row.get("lSolutions")
        if not solutions:
            raise KeyError("missing field 'lSolutions'")
        return _require_text(row, "sQuestion").strip(), "", _number_text(solutions[0])
    raise ValueError(f"unknown format {fmt}")


def _detect_format(path: Path, first_row) -> str:
    if path.suffix == ".txt":
        return "icot"
    keys = set(first_row) if isinstance(first_row, dict) else set()
    if {"question", "cot", "answer"} <= keys:
        return "record"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if {"input", "code", "target"} <= keys:
        return "gsm_hard"
    if {"input", "target"} <= keys:
        return "svamp"
    if "sQuestion" in keys:
        return "multiarith"
    raise RecordError(
        f"{path}: cannot tell the format from the first row's fields {sorted(keys)}; "
        "give rows with fields question, cot, answer"
    )


LINE_END = re.compile(rb"\r\n|\r|\n")
SUFFIXES = ".jsonl, .json, .parquet or .txt (question||cot #### answer)"
_MAGIC = ((b"\x1f\x8b", "gzip-compressed"), (b"PK\x03\x04", "a zip archive"), (b"\xff\xfe", "UTF-16 (little-endian)"),
          (b"\xfe\xff", "UTF-16 (big-endian)"), (b"BZh", "bzip2-compressed"), (b"\xfd7zXZ", "xz-compressed"))


def file_kind_problem(path: Path) -> str | None:
    """Why ``path`` is not a rows file this loader reads, named by what it is (None: go ahead and parse it)."""
    if not path.is_file():
        kind = "a FIFO" if path.is_fifo() else "a folder" if path.is_dir() else "not a regular file"
        return f"--dataset {path} is {kind}; give a {SUFFIXES} file"
    if path.suffix.lower() in (".csv", ".tsv"):
        return f"--dataset {path} is {path.suffix[1:].upper()}; convert it to {SUFFIXES}"
    with path.open("rb") as handle:
        head = handle.read(4096)
    for magic, kind in _MAGIC:
        if head.startswith(magic) and path.suffix != ".parquet":
            return f"--dataset {path} is {kind}; {'decompress it' if 'compress' in kind or 'zip' in kind else 're-save it as UTF-8'} to a {SUFFIXES} file"
    if path.suffix != ".parquet" and head.count(b"\x00") > len(head) // 4:
        return f"--dataset {path} looks like UTF-16 or binary data (NUL bytes); re-save it as UTF-8 {SUFFIXES}"
    return None


def _raw_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, raw row) pairs; a row that is not valid UTF-8 or JSON is yielded as a RecordError."""
    problem = file_kind_problem(path)
    if problem:
        raise RecordError(problem)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise RecordError(f"{path}: cannot be read as Parquet ({error}); check the file") from None
        yield from enumerate(rows, start=1)
    elif path.suffix == ".json":
        data = path.read_bytes().removeprefix(UTF8_BOM)
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            raise RecordError(f"{path}:{line}: invalid UTF-8 (byte 0x{data[error.start]:02x}); re-save the file as UTF-8") from None
        except json.JSONDecodeError as error:
            raise RecordError(f"{path}:{error.lineno}: bad JSON ({error.msg}); fix the file") from None
        except (ValueError, RecursionError) as error:
            raise RecordError(f"{path}: bad JSON ({error}); fix the file") from None
        if not isinstance(rows, list):
            raise RecordError(f"{path}: expected a JSON list of rows")
        yield from enumerate(rows, start=1)
    else:
        # CR LF, LF and a lone CR each end a line (JSON escapes CR inside strings, so none is cut); each line decoded alone
        for line_number, raw in enumerate(LINE_END.split(path.read_bytes().removeprefix(UTF8_BOM)), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield line_number, RecordError(f"invalid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})")
                continue
            if not line.strip():
                continue
            if path.suffix == ".txt":
                yield line_number, line
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                yield line_number, RecordError(f"bad JSON ({error.msg})")
            except (ValueError, RecursionError) as error:  # e.g. an integer of more than 4300 digits, or deep nesting
                yield line_number, RecordError(f"bad JSON ({type(error).__name__}: {str(error)[:80]})")


def _own_id(raw) -> str | None:
    """A row's own ``id`` field, kept as its record id (a string or an integer)."""
    if not isinstance(raw, dict) or raw.get("id") is None:
        return None
    value = raw["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise ValueError(f"field 'id' must be a non-empty string or an integer, not {value!r:.40}")
    return str(value)


# what makes a field bad: Unicode category Cc (U+0000-U+001F, U+007F-U+009F) less tab, LF and CR, and category Cs
# (U+D800-U+DFFF: half of a UTF-16 surrogate pair, which JSON's "\ud800" escape decodes to); one regex scan per field
# (checking each character's category in Python cost ~1.4 s per 30 000 GSM8k rows, most of a build's row checks)
_BAD_CHARACTERS = (("control character", re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")),
                   ("unpaired surrogate", re.compile("[\ud800-\udfff]")))


def _control_characters(*fields: str) -> str | None:
    """The reason a row is bad if a field holds control characters other than tab, CR and LF, or half of a
    UTF-16 surrogate pair (not a character: it cannot be stored)."""
    for name, text in zip(("question", "cot", "answer"), fields):
        for kind, pattern in _BAD_CHARACTERS:
            found = sorted(set(pattern.findall(text)))
            if found:
                return f"{kind}{'s' if len(found) > 1 else ''} {', '.join(f'U+{ord(c):04X}' for c in found[:5])} in field '{name}'"
    return None


def resolve_source(source: str, split: str, data_dir: Path | None) -> tuple[str, Path]:
    """Map a built-in name or a file path to (id prefix, file path)."""
    if source in BUILTIN_SOURCES:
        folder, files = BUILTIN_SOURCES[source]
        if split not in files:
            raise RecordError(f"--dataset {source} has splits {sorted(files)}, not '{split}'; pass --split with one of them")
        base = data_dir if data_dir is not None else PACKAGE_DATA
        path = Path(base) / folder / files[split]
        if not path.exists():
            if data_dir is None:
                raise RecordError(f"--dataset {source} --split {split} is not shipped with the package; pass --data-dir "
                                  f"pointing at a folder that holds {folder}/{files[split]}")
            raise RecordError(f"{path} does not exist; check --data-dir")
        return f"{source}-{split}", path
    path = Path(source)
    try:
        exists = path.exists()
    except OSError as error:  # a symlink loop, a name too long, ...
        raise RecordError(f"--dataset {source} cannot be opened ({error.strerror or error}); give a {SUFFIXES} file") from None
    if not exists and path.is_symlink():
        raise RecordError(f"--dataset {source} cannot be opened: a symbolic link that leads nowhere (a loop or a "
                          f"missing target); give a {SUFFIXES} file")
    if not exists:
        raise RecordError(f"--dataset {source}: neither a built-in name ({', '.join(BUILTIN_SOURCES)}) nor an existing file")
    problem = file_kind_problem(path)
    if problem:
        raise RecordError(problem)
    return f"{path.stem}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}", path


def load_records(
    source: str,
    split: str = "train",
    *,
    data_dir: Path | None = None,
    on_error: str = "fail",
    keep_calculator: bool = False,
    require_cot: bool = True,
) -> tuple[list[Record], list[SkippedRow]]:
    """Load every row of a source as a Record.

    ``require_cot`` is on for rendering (a record without a CoT has nothing to render) and off for
    evaluation sets, which carry no CoT.
    """
    if on_error not in ("fail", "skip"):
        raise RecordError(f"--on-error must be 'fail' or 'skip', not '{on_error}'")
    if source.startswith("hf:"):
        return _load_hf(source, split, require_cot)
    prefix, path = resolve_source(source, split, data_dir)
    records, skipped, fmt, first_line = [], [], None, {}
    for line_number, raw in _raw_rows(path):
        try:
            if isinstance(raw, RecordError):
                raise raw
            fmt = fmt or _detect_format(path, raw)
            question, cot, answer = _parse_row(raw, fmt, keep_calculator)
            if not question:
                raise ValueError("empty question")
            if require_cot and not cot:
                raise ValueError("empty CoT (this source has nothing to render)")
            if not answer:
                raise ValueError("empty answer")
            control = _control_characters(question, cot, answer)
            if control:
                raise ValueError(control)
            record_id = _own_id(raw) or f"{prefix}-{line_number:06d}"
            if record_id in first_line:
                raise ValueError(f"duplicate id {record_id!r} (first at line {first_line[record_id]})")
        except RecordError as error:
            if str(error).startswith(str(path)):
                raise
            reason = str(error)
        except (KeyError, TypeError, ValueError) as error:
            reason = str(error.args[0]) if error.args else type(error).__name__
        else:
            first_line[record_id] = line_number
            records.append(Record(record_id, question, cot, answer, str(path), line_number))
            continue
        bad_row(str(path), line_number, reason, on_error, skipped)
    if not records:
        raise RecordError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return records, skipped


def _load_hf(source: str, split: str, require_cot: bool) -> tuple[list[Record], list[SkippedRow]]:
    """A Hugging Face dataset with question/cot/answer (or GSM8k-style question/answer) columns."""
    import datasets

    name, _, config = source[3:].partition(":")
    table = datasets.load_dataset(name, config or None, split=split)
    fmt = _detect_format(Path(name), table[0])
    records, seen = [], set()
    for index, row in enumerate(table, start=1):
        question, cot, answer = _parse_row(row, fmt, keep_calculator=False)
        if require_cot and not cot:
            raise RecordError(f"{source}[{split}] row {index}: empty CoT")
        record_id = _own_id(row) or f"{name.replace('/', '_')}-{split}-{index:06d}"
        if record_id in seen:
            raise RecordError(f"{source}[{split}] row {index}: duplicate id {record_id!r}")
        seen.add(record_id)
        records.append(Record(record_id, question, cot, answer, f"{source}[{split}]", index))
    return records, []

"""Turn every data source into one record schema: {id, question, cot, answer}.

A source is a built-in name (``gsm8k`` ships inside the package, the others are read from
``--data-dir``), a file path (format detected from its extension and fields), or
``hf:<dataset id>[:<config>]`` for a Hugging Face dataset when the machine is online.
Ids are stable: ``<source>-<split>-<row number>``, so a re-run maps each row to the same shard.
A malformed row is never dropped silently: it raises ``RecordError`` (``on_error="fail"``) or is
returned in the ``skipped`` list that ends up in the shard manifest (``on_error="skip"``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

PACKAGE_DATA = Path(__file__).parent / "data"
CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")

# name -> (folder under the data dir, file name per split); gsm8k's folder ships in the package.
BUILTIN_SOURCES = {
    "gsm8k": ("gsm8k", {"train": "train.jsonl", "test": "test.jsonl"}),
    "gsm_hard": ("gsm_hard", {"test": "test.jsonl"}),
    "svamp": ("svamp", {"test": "test.jsonl"}),
    "multiarith": ("multiarith", {"test": "test.json"}),
    "icot_gsm8k": ("icot_gsm8k", {"train": "train_no_aug.txt", "valid": "valid.txt", "test": "test.txt"}),
    "icot_mult_4x4": ("icot_mult_4x4", {"valid": "valid.txt", "test": "test_bigbench.txt"}),
    "icot_mult_5x5": ("icot_mult_5x5", {"valid": "valid.txt", "test": "test_bigbench.txt"}),
}


class RecordError(ValueError):
    """A row that cannot become a record; the message names file, line and the fix."""


@dataclass(frozen=True)
class Record:
    id: str
    question: str
    cot: str
    answer: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SkippedRow:
    file: str
    line: int
    reason: str


def _number_text(value) -> str:
    """Render a numeric gold answer without a spurious '.0' (39.0 -> '39')."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
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
    cot, answer = solution.rsplit("####", 1)
    if not keep_calculator:
        cot = CALCULATOR_NOTE.sub("", cot)
    return cot.strip(), answer.strip().replace(",", "")


def _parse_row(row, fmt: str, keep_calculator: bool) -> tuple[str, str, str]:
    """One raw row of a known format -> (question, cot, answer). Raises on malformed rows."""
    if fmt == "icot":
        if "||" not in row or "####" not in row:
            raise ValueError("line is not 'question||cot #### answer'")
        question, rest = row.split("||", 1)
        cot, answer = rest.rsplit("####", 1)
        return question.strip(), cot.strip(), answer.strip()
    if not isinstance(row, dict):
        raise TypeError(f"row is {type(row).__name__}, not an object")
    if fmt == "record":
        return _require_text(row, "question").strip(), _require_text(row, "cot").strip(), _require_text(row, "answer").strip()
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


def _raw_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, raw row) pairs; a row that is not valid JSON is yielded as a RecordError."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for index, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield index, row
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise RecordError(f"{path}: expected a JSON list of rows")
        yield from enumerate(rows, start=1)
    else:
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if path.suffix == ".txt":
                    yield line_number, line.rstrip("\n")
                    continue
                try:
                    yield line_number, json.loads(line)
                except json.JSONDecodeError as error:
                    yield line_number, RecordError(f"bad JSON ({error.msg})")


def resolve_source(source: str, split: str, data_dir: Path | None) -> tuple[str, Path]:
    """Map a built-in name or a file path to (id prefix, file path)."""
    if source in BUILTIN_SOURCES:
        folder, files = BUILTIN_SOURCES[source]
        if split not in files:
            raise RecordError(f"--dataset {source} has splits {sorted(files)}, not '{split}'; pass --split with one of them")
        base = PACKAGE_DATA if source == "gsm8k" else data_dir
        if base is None:
            raise RecordError(f"--dataset {source} is not shipped with the package; pass --data-dir pointing at a folder that holds {folder}/")
        path = Path(base) / folder / files[split]
        if not path.exists():
            raise RecordError(f"{path} does not exist; check --data-dir")
        return f"{source}-{split}", path
    path = Path(source)
    if not path.exists():
        raise RecordError(f"--dataset {source}: neither a built-in name ({', '.join(BUILTIN_SOURCES)}) nor an existing file")
    return f"{path.stem}", path


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
    records, skipped, fmt = [], [], None
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
        except RecordError as error:
            if str(error).startswith(str(path)):
                raise
            reason = str(error)
        except (KeyError, TypeError, ValueError) as error:
            reason = str(error.args[0]) if error.args else type(error).__name__
        else:
            records.append(Record(f"{prefix}-{line_number:06d}", question, cot, answer))
            continue
        if on_error == "fail":
            raise RecordError(f"{path}:{line_number}: {reason}; fix the row or pass --on-error skip")
        skipped.append(SkippedRow(str(path), line_number, reason))
    if not records:
        raise RecordError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return records, skipped


def _load_hf(source: str, split: str, require_cot: bool) -> tuple[list[Record], list[SkippedRow]]:
    """A Hugging Face dataset with question/cot/answer (or GSM8k-style question/answer) columns."""
    import datasets

    name, _, config = source[3:].partition(":")
    table = datasets.load_dataset(name, config or None, split=split)
    fmt = _detect_format(Path(name), table[0])
    records = []
    for index, row in enumerate(table, start=1):
        question, cot, answer = _parse_row(row, fmt, keep_calculator=False)
        if require_cot and not cot:
            raise RecordError(f"{source}[{split}] row {index}: empty CoT")
        records.append(Record(f"{name.replace('/', '_')}-{split}-{index:06d}", question, cot, answer))
    return records, []

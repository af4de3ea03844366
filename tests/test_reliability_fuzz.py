"""Fuzz of the record loaders (issue 14.7): arbitrary bytes and text never crash them, and every
non-blank line becomes either a record or a counted bad row with its line number."""

import json
import re
import tempfile
from pathlib import Path

from hypothesis import given, settings, strategies as st

from rot_data.records import RecordError, load_records

_text = st.text(max_size=30)
_line = st.one_of(
    st.binary(max_size=40),  # anything, invalid UTF-8 included
    _text.map(lambda t: t.encode("utf-8")),  # any character, control characters included
    st.fixed_dictionaries({"question": _text, "cot": _text, "answer": st.one_of(_text, st.integers(), st.floats())},
                          optional={"id": st.one_of(st.sampled_from(["a", "b"]), st.integers(0, 2), st.none())})
      .map(lambda row: json.dumps(row, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")),
    st.tuples(_text, _text, _text).map(lambda t: f"{t[0]}||{t[1]} #### {t[2]}".encode("utf-8")),  # the .txt format
    st.sampled_from([b"", b"  ", b"\r", b"\xef\xbb\xbf"]),
).map(lambda b: b.replace(b"\n", b" "))


def _non_blank(content: bytes) -> set[int]:
    """Line numbers the loader must account for: all but the blank ones (one BOM may open the file). CR LF, LF and a
    lone CR (old Mac files) each end a line, as the loader counts them."""
    numbers = set()
    for number, raw in enumerate(re.split(rb"\r\n|\r|\n", content.removeprefix(b"\xef\xbb\xbf")), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            numbers.add(number)
            continue
        if text.strip():
            numbers.add(number)
    return numbers


@settings(max_examples=50, deadline=None, database=None)  # fast, and no .hypothesis folder in the checkout
@given(lines=st.lists(_line, max_size=8), suffix=st.sampled_from([".jsonl", ".txt"]), bom=st.booleans())
def test_every_line_is_a_record_or_a_counted_bad_row(lines, suffix, bom):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        content = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines)
        path.write_bytes(content)
        try:
            records, skipped = load_records(str(path), on_error="skip")
        except RecordError as error:  # a whole-file answer (no usable rows, unknown format, NUL bytes): one line naming
            # the file, led by it or by the flag that gave it ("--dataset <file> looks like UTF-16 ...")
            message = str(error)
            assert message.startswith((str(path), f"--dataset {path}")) and "\n" not in message, message
            return
        seen = [r.line for r in records] + [s.line for s in skipped]
        assert sorted(seen) == sorted(_non_blank(content)) and len(seen) == len(set(seen))
        assert len({r.id for r in records}) == len(records)
        assert all(r.question and r.cot and r.answer for r in records)
        assert all(s.file == str(path) and "\n" not in s.reason for s in skipped)
        for record in records:  # every accepted row can be stored (Arrow needs valid UTF-8)
            json.dumps(record.to_dict(), ensure_ascii=False).encode("utf-8")

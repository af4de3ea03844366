"""The shard format of docs/shard-format.md, the one contract between the build (rot_render, the writer) and the
trainer (rot_model.shard_stream, the reader): schema, names, fingerprint, manifest, checks. Parquet files plus a manifest
written last.

Every shard carries the build fingerprint in its Parquet metadata, so a re-run can tell a shard it
may keep (same settings) from one made with other settings. Files are written under a temporary
name and renamed, so a killed job never leaves a half-written shard behind. Pages carry CRC-32
checksums (Parquet's page checksums), so a damaged shard fails to read instead of returning changed
values, even before the manifest with the files' SHA-256 exists.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from rot_data.checksums import file_sha256

FORMAT = "rot-visual-embeddings/1"
STORED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A manifest.json that cannot be read (truncated, damaged, not a manifest); the message names the file."""
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("question", pa.string()),
    ("cot", pa.string()),
    ("answer", pa.string()),
    ("n_tokens", pa.int32()),
    ("image_width", pa.int32()),
    ("embedding", pa.large_binary()),
])


THOUGHT_TAGS = ("<|begin_of_thought|>  ", "  <|end_of_thought|>")  # the official code's optional wrapping


def drawn_text(cot: str, thought_tags: bool) -> str:
    """The exact string a shard's line shows for a CoT (one line; the build's ``render.thought_tags``): the renderer
    draws it and visualisation places characters on visual tokens with it, so the two always agree."""
    text = " ".join(cot.split())
    return f"{THOUGHT_TAGS[0]}{text}{THOUGHT_TAGS[1]}" if thought_tags else text


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def embedding_bytes(embedding: torch.Tensor, dtype: str) -> bytes:
    """[n_tokens, d] -> little-endian row-major bytes of the stored dtype (bf16 kept bit-exact)."""
    return embedding_column(embedding, [len(embedding)], dtype)[0].as_py()


def decode_embedding(data: bytes, n_tokens: int, dim: int, dtype: str) -> torch.Tensor:
    """The inverse of ``embedding_bytes``: stored bytes -> [n_tokens, dim] float32; ValueError if the size is off."""
    stored = STORED_DTYPES[dtype]
    if len(data) != n_tokens * dim * stored.itemsize:
        raise ValueError(f"{len(data)} embedding bytes, not {n_tokens * dim * stored.itemsize} ({n_tokens} tokens x dim {dim}, {dtype})")
    return torch.frombuffer(bytearray(data), dtype=stored).view(n_tokens, dim).float()


def embedding_column(packed: torch.Tensor, tokens_per_row: list[int], dtype: str) -> pa.Array:
    """The ``embedding`` column for a pack of rows: [sum n_i, d] (any device) -> one binary value per row.

    One device-to-host copy for the whole pack, and the Arrow array is built on that buffer with
    offsets (no per-row Python bytes objects)."""
    data = packed.detach().to("cpu", STORED_DTYPES[dtype]).contiguous().view(torch.uint8).numpy()
    row_bytes = packed.shape[1] * STORED_DTYPES[dtype].itemsize
    offsets = np.concatenate([[0], np.cumsum(tokens_per_row, dtype=np.int64) * row_bytes])
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(tokens_per_row),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(data.reshape(-1))])


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


TEMPORARY = ".rot-partial-"  # a temporary file's mark: '.shard-00003.parquet.rot-partial-<pid>', a name no user picks
PARTIAL_SHARDS = ".shard-[0-9][0-9][0-9][0-9][0-9].parquet" + TEMPORARY + "*"  # what a killed writer leaves


def _atomic_write(path: Path, write) -> None:
    """Write under a temporary name, then rename: the final name only ever holds a whole file. A write that fails
    (a full disk) removes its temporary file; one killed outright leaves it for the next build to remove."""
    temporary = path.with_name(f".{path.name}{TEMPORARY}{os.getpid()}")
    try:
        write(temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def write_shard(path: Path, table: pa.Table, build_fingerprint: str, dim: int, dtype: str) -> dict:
    """Write a table with the columns of SCHEMA (others are dropped) and return its manifest entry.
    A ``truncated`` column (rows whose line was cut to --max-tokens) is counted into the file's metadata."""
    truncated = int(pc.sum(table["truncated"]).as_py() or 0) if "truncated" in table.column_names else 0
    table = table.select(SCHEMA.names).cast(SCHEMA).replace_schema_metadata({
        "rot.fingerprint": build_fingerprint, "rot.dim": str(dim), "rot.dtype": dtype,
        "rot.format": FORMAT, "rot.truncated": str(truncated),
    })
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", write_page_checksum=True))
    return shard_summary(path)


def shard_fingerprint(path: Path) -> str | None:
    """The build fingerprint a shard was written with; None if the file is not a readable shard."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:  # pyarrow raises several types for a damaged footer
        return None
    value = metadata.get(b"rot.fingerprint")
    return value.decode() if value else None


def foreign_parquet(path: Path) -> bool:
    """A readable Parquet file that this project did not write (no build fingerprint, not the shard schema)."""
    try:
        schema = pq.read_schema(path)
    except Exception:  # unreadable: a damaged shard of ours, re-encoded as such
        return False
    return b"rot.fingerprint" not in (schema.metadata or {}) and not set(SCHEMA.names) <= set(schema.names)


def read_back(path: Path, ids: list[str]) -> str | None:
    """Why a shard without a recorded checksum cannot be kept (None: every page reads back with its
    CRC right and the rows are exactly ``ids``, in order)."""
    try:
        table = pq.ParquetFile(path, page_checksum_verification=True).read()
    except Exception as error:
        return f"cannot be read ({str(error).splitlines()[0][:120]})"
    if "id" not in table.column_names or table.column("id").to_pylist() != ids:
        return "holds other rows than planned"
    return None


def shard_summary(path: Path) -> dict:
    table = pq.read_table(path, columns=["n_tokens"])
    return {
        "name": path.name,
        "rows": table.num_rows,
        "tokens": int(np.asarray(table["n_tokens"]).sum()),
        "truncated": int((table.schema.metadata or {}).get(b"rot.truncated", b"0")),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def write_manifest(out: Path, manifest: dict) -> None:
    _atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))


def read_manifest(out: Path) -> dict | None:
    """The manifest of a shard set, None if there is none yet; ManifestError if it cannot be read."""
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise ManifestError(f"{path} is not valid JSON ({reason}): truncated or damaged") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list) or \
            not all(isinstance(s, dict) and {"name", "rows", "sha256"} <= set(s) for s in manifest["shards"]):
        raise ManifestError(f"{path} is not a shard-set manifest (no valid 'shards' list)")
    return manifest


def verify(out: Path) -> list[str]:
    """Problems with a finished shard set (empty list = every shard present and its checksum right); what
    ``rot-render inspect`` prints and the trainer refuses to start on."""
    try:
        manifest = read_manifest(out)
    except ManifestError as error:
        return [rebuild_advice(error, out)]
    if manifest is None:
        return [no_manifest(out)]
    return shard_problems(out, manifest)


def no_manifest(out: Path) -> str:
    """Why a folder has no manifest, in one line: never there, never built, or a build that did not finish."""
    build = f"rot-render build --dataset <rows> --out {out}"
    if not out.is_dir():
        return f"{out} does not exist; build a shard set there first: {build}"
    started = any(out.glob("shard-*.parquet")) or any(out.glob(PARTIAL_SHARDS))
    if not started:
        return f"{out} holds no shard set (no {MANIFEST}, no shards): build one there first: {build}"
    return f"{out / MANIFEST} is missing: the build did not finish; re-run the same rot-render build command to resume"


def rebuild_advice(error: ManifestError, out: Path) -> str:
    return f"{error}; re-run the rot-render build command with --overwrite to rebuild {out}"


def shard_problems(out: Path, manifest: dict) -> list[str]:
    """Each listed shard that is missing or whose SHA-256 differs from the one the manifest recorded."""
    problems = []
    for shard in manifest["shards"]:
        path = out / shard["name"]
        if not path.exists():
            problems.append(f"{path} is missing; re-run the same rot-render build command (--out {out}) to remake it")
        elif file_sha256(path) != shard["sha256"]:
            problems.append(f"{path} does not match its checksum in {out / MANIFEST} (corrupt or changed); "
                            "re-run the same rot-render build command to remake it")
    return problems

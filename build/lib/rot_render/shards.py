"""Write the shard format of docs/shard-format.md: Parquet files plus a manifest written last.

Every shard carries the build fingerprint in its Parquet metadata, so a re-run can tell a shard it
may keep (same settings) from one made with other settings. Files are written under a temporary
name and renamed, so a killed job never leaves a half-written shard behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rot_data.checksums import file_sha256
from rot_data.shard_format import FORMAT, STORED_DTYPES

MANIFEST = "manifest.json"
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("question", pa.string()),
    ("cot", pa.string()),
    ("answer", pa.string()),
    ("n_tokens", pa.int32()),
    ("image_width", pa.int32()),
    ("embedding", pa.large_binary()),
])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def embedding_bytes(embedding: torch.Tensor, dtype: str) -> bytes:
    """[n_tokens, d] -> little-endian row-major bytes of the stored dtype (bf16 kept bit-exact)."""
    return embedding_column(embedding, [len(embedding)], dtype)[0].as_py()


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


def _atomic_write(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(temporary)
    os.replace(temporary, path)


def write_shard(path: Path, table: pa.Table, build_fingerprint: str, dim: int, dtype: str) -> dict:
    """Write a table with the columns of SCHEMA (others are dropped) and return its manifest entry."""
    table = table.select(SCHEMA.names).cast(SCHEMA).replace_schema_metadata({
        "rot.fingerprint": build_fingerprint, "rot.dim": str(dim), "rot.dtype": dtype,
        "rot.format": FORMAT,
    })
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return shard_summary(path)


def shard_fingerprint(path: Path) -> str | None:
    metadata = pq.read_schema(path).metadata or {}
    value = metadata.get(b"rot.fingerprint")
    return value.decode() if value else None


def shard_summary(path: Path) -> dict:
    table = pq.read_table(path, columns=["n_tokens"])
    return {
        "name": path.name,
        "rows": table.num_rows,
        "tokens": int(np.asarray(table["n_tokens"]).sum()),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def write_manifest(out: Path, manifest: dict) -> None:
    _atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def verify(out: Path) -> list[str]:
    """Problems with a finished shard set (empty list = every shard present and its checksum right)."""
    manifest = read_manifest(out)
    if manifest is None:
        return [f"{out / MANIFEST} is missing: the build did not finish; re-run the same rot-render build command to resume"]
    problems = []
    for shard in manifest["shards"]:
        path = out / shard["name"]
        if not path.exists():
            problems.append(f"{path} is missing; re-run the build to remake it")
        elif file_sha256(path) != shard["sha256"]:
            problems.append(f"{path} checksum differs from the manifest; delete it and re-run the build to remake it")
    return problems

"""Encoded rows on their way from the encoder actors to their shard's writer, past the driver.

An encoder actor writes the rows of each shard its pack touches as one uncompressed Arrow file (a piece) into a
scratch folder of the output folder, and hands Ray Data back only a small record per row: its shard, its piece and
the node that encoded it. The driver counts the records; when a shard is complete it starts the shard's writer on the
node that encoded most of its rows, which reads the pieces (mostly from that node's page cache), writes the shard and
removes them. A cluster's nodes share the output folder (the README says so), so a shard whose packs were encoded on
two nodes is finished by one of them. A piece is written under a temporary name and renamed: a pack encoded again (its
actor died) replaces its piece, it never adds the rows twice.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FOLDER = ".rot-pieces"  # in the output folder; the driver makes it and removes it, the actors only write into it


def folder(out: Path) -> Path:
    return Path(out) / FOLDER


def stash(table: pa.Table, out: Path, node: str) -> pa.Table:
    """In the encoder actor: write the pack's rows as one piece per shard; return each row's record (shard, piece,
    node), the only thing that goes on to the driver."""
    names = np.empty(table.num_rows, dtype=object)
    shard_of_row = table["shard"].to_numpy()
    in_pack = np.unique(shard_of_row).tolist()
    for shard in in_pack:
        rows = table if len(in_pack) == 1 else table.filter(pc.equal(table["shard"], shard))  # most packs: one shard
        name = f"{shard}-{pc.min(rows['position']).as_py()}.arrow"  # the pack's first row of this shard
        path = folder(out) / name
        temporary = path.with_name(f"{name}.partial-{os.getpid()}")
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, rows.schema) as writer:
            writer.write_table(rows)
        os.replace(temporary, path)
        names[shard_of_row == shard] = name
    return pa.table({"shard": table["shard"], "piece": pa.array(names, pa.string()),
                     "node": pa.array([node] * table.num_rows, pa.string())})


def gather(out: Path, names: list[str], rows: int) -> pa.Table:
    """In the shard's writer: the rows of the named pieces in source order; they must be exactly positions 0..rows-1."""
    table = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(folder(out) / name))).read_all() for name in names])
    table = table.sort_by("position")
    if table["position"].to_pylist() != list(range(rows)):
        raise RuntimeError(f"the pieces {names} in {folder(out)} hold {table.num_rows} rows, not positions 0..{rows - 1}")
    return table


def remove(out: Path, names: list[str]) -> None:
    for name in names:
        (folder(out) / name).unlink(missing_ok=True)


def clear(out: Path) -> None:
    """Remove the scratch folder (pieces of a build that ended or was killed)."""
    shutil.rmtree(folder(out), ignore_errors=True)

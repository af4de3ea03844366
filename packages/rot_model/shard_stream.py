"""Read the shards of docs/shard-format.md for training, through the format's own module (rot_data.shards).

The order of an epoch is a pure function of (seed, epoch): shards in a seeded random order, rows
passed through a seeded shuffle buffer, then sorted by visual-token count within each run of
``LENGTH_GROUP`` optimizer batches (a batch rolls out as many latents as its longest row). Every
rank computes the same order from the manifest alone, cuts it into global micro-batches of
``micro_batch * world_size`` rows, and takes its own slice, so ranks never overlap and a checkpoint
only has to record (epoch, micro-batch index) to resume. The last global micro-batch of an epoch is
filled with weight-0 copies so every rank runs the same number of steps; those copies add nothing
to the loss.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from rot_data.shards import (FORMAT, MANIFEST, STORED_DTYPES, ManifestError, decode_embedding, no_manifest, read_manifest, rebuild_advice,
                             shard_problems)


class ShardError(RuntimeError):
    """A shard set that cannot be trained on; the message names the file and the fix.

    Raised in a DataLoader worker, it reaches the trainer re-made from "Caught ShardError in DataLoader
    worker process N. Original Traceback ...": only the original one-line message is kept, so the
    trainer prints one line there too."""

    def __init__(self, message: str = ""):
        if message.startswith("Caught ShardError") and "ShardError: " in message:
            message = message.rstrip().rsplit("ShardError: ", 1)[1]
        super().__init__(message)


@dataclass
class ShardSet:
    folder: Path
    manifest: dict

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding"]["dim"])

    @property
    def dtype(self) -> torch.dtype:
        return STORED_DTYPES[self.manifest["embedding"]["dtype"]]

    @property
    def shard_rows(self) -> list[int]:
        return [s["rows"] for s in self.manifest["shards"]]

    @property
    def rows(self) -> int:
        return sum(self.shard_rows)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @classmethod
    def open(cls, folder: Path | str, verify: bool = True) -> "ShardSet":
        """The shard set in ``folder``, its manifest checked and (``verify``) every shard's SHA-256 compared with the
        manifest's, by the same functions as ``rot-render inspect``."""
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        try:
            manifest = read_manifest(folder) if folder.is_dir() else None
        except ManifestError as error:
            raise ShardError(rebuild_advice(error, folder)) from None
        if manifest is None:
            raise ShardError(no_manifest(folder))
        if manifest.get("format") != FORMAT:
            raise ShardError(f"{manifest_path} has format {manifest.get('format')!r}, this trainer reads {FORMAT!r}; rebuild the shards with this version of rot-render")
        if not manifest.get("shards") or not manifest.get("rows"):
            raise ShardError(f"{manifest_path} lists no rows: the shard set is empty; rebuild it from a dataset with rows")
        problems = shard_problems(folder, manifest) if verify else []
        if problems:
            raise ShardError(problems[0])
        return cls(folder, manifest)

    def check_dim(self, expected_dim: int, where: str) -> None:
        """Refuse shards whose embedding size differs from what a trained head expects."""
        if self.dim != expected_dim:
            raise ShardError(f"{self.folder / MANIFEST} has embedding dim {self.dim} but {where} was trained on dim "
                             f"{expected_dim}; use the shard set that {where} was trained on, or start again from Stage I")

    def row_lengths(self) -> list[list[int]]:
        """Each shard's rows' visual-token counts (the one column read; no embeddings)."""
        return [self._read(i, lambda name: name == "n_tokens").column("n_tokens").to_pylist()
                for i in range(len(self.manifest["shards"]))]

    def read_rows(self, index: int, with_embeddings: bool = True) -> list[dict]:
        """The rows of one shard; without the embedding column when the caller never looks at it (SFT)."""
        return self._read(index, lambda name: with_embeddings or name != "embedding").to_pylist()

    def _read(self, index: int, wanted) -> pa.Table:
        """The ``wanted`` columns of one shard, its pages checked against their CRC-32 (one open, one footer read)."""
        path = self.folder / self.manifest["shards"][index]["name"]
        try:
            file = pq.ParquetFile(path, page_checksum_verification=True)
            return file.read(columns=[name for name in file.schema_arrow.names if wanted(name)])
        except Exception as error:  # pyarrow raises several types for a damaged file
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ShardError(f"{path} cannot be read ({reason}); delete it and re-run rot-render build to remake it") from None

    def embedding(self, row: dict) -> torch.Tensor:
        """The stored [n_tokens, dim] matrix of a row, as float32."""
        try:
            return decode_embedding(row["embedding"], row["n_tokens"], self.dim, self.manifest["embedding"]["dtype"])
        except ValueError as error:
            raise ShardError(f"row {row['id']} of {self.folder} has {error}; rebuild the shard set with rot-render build --overwrite") from None


def epoch_order(shard_rows: list[int], seed: int, epoch: int, shuffle_buffer: int) -> list[tuple[int, int]]:
    """(shard, row) pairs of one epoch: shards in seeded order, rows through a seeded shuffle buffer."""
    rng = np.random.default_rng([seed, epoch])
    stream = ((s, r) for s in rng.permutation(len(shard_rows)) for r in range(shard_rows[s]))
    if shuffle_buffer <= 1:
        return [(int(s), r) for s, r in stream]
    order, buffer = [], []
    for item in stream:
        if len(buffer) < shuffle_buffer:
            buffer.append(item)
            continue
        slot = int(rng.integers(len(buffer)))
        order.append(buffer[slot])
        buffer[slot] = item
    rng.shuffle(buffer)
    order.extend(buffer)
    return [(int(s), r) for s, r in order]


LENGTH_GROUP = 16  # optimizer batches whose rows are sorted by length together


def group_by_length(order: list[tuple[int, int]], lengths: list[list[int]], global_batch: int) -> list[tuple[int, int]]:
    """``order`` with each run of ``LENGTH_GROUP * global_batch`` rows sorted by visual-token count, so a batch holds
    rows of about one length. A batch's rollout and padding run to its longest row: on 3x3-6x6 multiplication
    (15-64 tokens) random batches of 256 roll out 64 latents each, grouped ones about 39 on average. Rows move only
    within their run (memory stays a few runs of rows, see ``ShardStream.__iter__``); the runs are counted in
    optimizer batches, so a step's rows are the same however its batch is split into micro-batches and ranks; the
    sort is stable, so a set of one length keeps its order exactly."""
    span = LENGTH_GROUP * global_batch
    return [pair for start in range(0, len(order), span)
            for pair in sorted(order[start:start + span], key=lambda pair: lengths[pair[0]][pair[1]])]


class ShardStream(IterableDataset):
    """Yields this rank's collated micro-batches, in order, from ``(epoch, start_batch)`` on."""

    def __init__(self, shard_set: ShardSet, collate, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_buffer: int = 1024, global_batch: int | None = None, by_length: bool = True):
        self.shard_set, self.collate = shard_set, collate
        self.reads_embeddings = getattr(collate, "reads_embeddings", True)  # SFT's collator sets it False
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.global_batch = global_batch or micro_batch * world_size  # rows per optimizer step (accumulation included)
        self.epoch, self.start_batch = 0, 0
        self.lengths = shard_set.row_lengths() if by_length else None  # None: batches as shuffled (a profiler's sample)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.shard_set.rows / (self.micro_batch * self.world_size))

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def rank_plan(self) -> list[list[tuple[int, int, float]]]:
        """This rank's micro-batches of the epoch as (shard, row, weight) triples."""
        per_global = self.micro_batch * self.world_size
        order = epoch_order(self.shard_set.shard_rows, self.seed, self.epoch, self.shuffle_buffer)
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.global_batch)
        plan = []
        for b in range(self.batches_per_epoch):
            chunk = [(s, r, 1.0) for s, r in order[b * per_global:(b + 1) * per_global]]
            chunk += [(order[0][0], order[0][1], 0.0)] * (per_global - len(chunk))  # weight-0 filler, last batch only
            plan.append(chunk[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch])
        return plan

    def __iter__(self):
        """Each shard is read once per epoch and worker; of its rows, only those this worker will still emit are
        kept, and each is dropped when emitted (memory: about a shuffle buffer of rows). Fetching rows through a
        cache of recent shards instead re-read a whole shard for every row that lingered in the shuffle buffer:
        at 100 shards that made a batch of 256 take a second."""
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        mine = [(b, triples) for b, triples in enumerate(self.rank_plan())
                if b >= self.start_batch and (b - self.start_batch) % workers == worker_id]
        uses = Counter((shard, index) for _, triples in mine for shard, index, _ in triples)  # a filler repeats a row
        wanted: dict[int, set[int]] = {}
        for shard, index in uses:
            wanted.setdefault(shard, set()).add(index)
        waiting: dict[tuple[int, int], dict] = {}

        def row(shard: int, index: int) -> dict:
            if shard in wanted:  # first touch of this shard: keep the rows this worker needs from it
                rows = self.shard_set.read_rows(shard, self.reads_embeddings)
                waiting.update({(shard, i): rows[i] for i in wanted.pop(shard)})
            return waiting[(shard, index)]

        for b, triples in mine:
            rows = [row(s, r) for s, r, _ in triples]
            for s, r, _ in triples:
                uses[(s, r)] -= 1
                if not uses[(s, r)]:
                    del waiting[(s, r)]
            embeddings = [self.shard_set.embedding(r) for r in rows] if self.reads_embeddings else []
            batch = self.collate(rows, embeddings)
            batch["weights"] = torch.tensor([w for _, _, w in triples])
            batch["batch_index"] = b
            yield batch

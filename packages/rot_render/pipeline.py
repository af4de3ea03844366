"""The offline job: records -> rendered lines (CPU tasks) -> embeddings (GPU actors) -> Parquet shards.

Rows are assigned to shards up front (shard i holds rows i*shard_size ... (i+1)*shard_size-1 of
the source), so a re-run knows exactly which shards are finished and only sends the rows of the
missing ones through Ray. No embedding passes through the driver: the encoder actors leave each pack's
rows on their node (rot_render/pieces.py) and the driver only keeps the books on each row's shard; as soon
as all rows of a shard are encoded it starts that shard's writer task on the node that encoded most of
them, which takes the shard's rows in source order (whatever order the workers finished in). The
manifest is written last.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from rot_data import registry
from rot_data.checksums import file_sha256
from rot_data import locks, shards
from rot_render import pieces
from rot_vision.tower import PACKED, EncoderSource, VisionEncoder, read_encoder_source
from rot_data.records import bad_row, load_records
from rot_render.ray_output import ray_noise_filtered
from rot_render.ray_reaper import watch_local_ray
from rot_vision.render import RenderSettings, check_font, drawing_problem, line_text, render_fitted


STATS = "build-stats.txt"
OOM_RETRIES = 3  # retries of a task killed by Ray's memory monitor (Ray's default: unbounded)
ENCODER_RESTARTS = 3  # encoder actors may die and be restarted by Ray this often in one build, not forever
STARTS = ".encoder-starts"  # one line per encoder actor start, in the output folder (the actors count themselves)
# three encoder actors share each GPU: an actor's host work on a pack (unpacking pixels, the embeddings' copy to the host,
# writing its piece) leaves the GPU idle unless another actor's pack runs meanwhile; with several GPUs' actors, render
# tasks and shard writers on one host that host work grows, and two actors per GPU left the GPUs idle between packs
# (docs/benchmarks.md: the 4-GPU build)
ENCODERS_PER_GPU = 3
# on a CPU, float results depend on torch's thread count (how a reduction is split), so every CPU encoder runs this
# many threads whatever the number of encoders or cores: a resume with another --num-encoders, or on a machine with
# other cores (the same CPU kind and torch), writes the same bytes. The default number of CPU encoders fills the
# cores with them, up to MAX_CPU_ENCODERS (each holds its own copy of the tower)
CPU_THREADS_PER_ENCODER = 2
MAX_CPU_ENCODERS = 8
WRITE_RETRIES = 2  # a shard writer task whose worker died is run again (the write is atomic: a rename at the end)


class EncoderDied(RuntimeError):
    """Raised by an encoder actor started once more than the build's budget of restarts allows."""


class BuildError(RuntimeError):
    """A build that must not go on (settings clash, bad worker state); the message says the fix."""


@dataclass
class BuildConfig:
    dataset: str
    out: Path
    split: str = "train"
    encoder: str = registry.ANCHOR  # the shipped pretrained VLM's tower
    dtype: str = "bf16"
    shard_size: int = 1024
    on_error: str = "fail"
    keep_calculator: bool = False
    data_dir: Path | None = None
    limit: int | None = None
    render: RenderSettings = field(default_factory=RenderSettings)
    batch_size: int = 256
    num_encoders: int | None = None
    address: str | None = None
    overwrite: bool = False
    attn_implementation: str = PACKED  # one varlen attention call per layer for the whole pack


def render_batch(batch: pa.Table, settings: RenderSettings, token_px: int) -> pa.Table:
    """Ray task: add the rendered grey pixels (bytes), the image width and whether the line was cut to every row."""
    images, truncated = zip(*[render_fitted(cot, settings, token_px) for cot in batch.column("cot").to_pylist()])
    return batch.append_column("pixels", pa.array([image.tobytes() for image in images], pa.large_binary())) \
                .append_column("image_width", pa.array([image.shape[1] for image in images], pa.int32())) \
                .append_column("truncated", pa.array(truncated, pa.bool_()))


def write_shard_from_pieces(out: Path, shard_index: int, names: list[str], rows: int, build_fingerprint: str, dim: int,
                            dtype: str) -> tuple[dict, str]:
    """Ray task, on the node that encoded most of the shard: its rows, read from their pieces, written in source order.
    Returns the shard's manifest entry and the node it was written on."""
    import ray

    path = out / shards.shard_name(shard_index)
    if path.exists() and not any((pieces.folder(out) / name).exists() for name in names):
        summary = shards.shard_summary(path)  # this task, run again: its first run wrote the shard, then its worker died
    else:
        summary = shards.write_shard(path, pieces.gather(out, names, rows), build_fingerprint, dim, dtype)
        pieces.remove(out, names)
    return summary, ray.get_runtime_context().get_node_id()


class EncodeBatch:
    """Ray actor: holds the frozen tower on its GPU (or the CPU) and encodes a batch in one packed call. The embeddings
    stay on this node, in pieces of the output folder; Ray Data takes on each row's shard, piece and node."""

    def __init__(self, encoder: str, expected_sha256: str, dtype: str, height: int, attn_implementation: str,
                 starts_file: str, max_starts: int, out: str, cpu_threads: int = 0):
        import ray
        import torch

        if cpu_threads:  # Ray gives a 1-CPU actor one torch thread; the build fixes the count (it changes the bytes)
            torch.set_num_threads(cpu_threads)

        # Ray restarts a dead actor forever (a finite max_restarts stalled 2-actor builds on 2 CPUs), so the actors
        # count their own starts: past the budget the constructor fails, which Ray does not retry, and the build ends
        with open(starts_file, "a") as starts:
            starts.write(f"{os.getpid()}\n")
        if len(Path(starts_file).read_text().splitlines()) > max_starts:
            raise EncoderDied(f"encoder actors started {max_starts + 1} times")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = VisionEncoder.from_pretrained(encoder, device=device, attn_implementation=attn_implementation)
        if self.encoder.source.weights_sha256 != expected_sha256:
            raise BuildError(f"worker on {os.uname().nodename} loaded other weights for --encoder {encoder} than the driver; "
                             "make every node see the same checkpoint")
        self.dtype, self.height = dtype, height
        self.out, self.node = Path(out), ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        widths = batch.column("image_width").to_pylist()
        images = [np.frombuffer(pixels, np.uint8).reshape(self.height, width)
                  for pixels, width in zip(batch.column("pixels").to_pylist(), widths)]
        packed, tokens_per_image = self.encoder.encode_packed(images)
        encoded = batch.drop_columns(["pixels"]) \
                       .append_column("n_tokens", pa.array(tokens_per_image, pa.int32())) \
                       .append_column("embedding", shards.embedding_column(packed, tokens_per_image, self.dtype))
        return pieces.stash(encoded, self.out, self.node)


def _start_ray(address: str | None):
    import ray

    # Ray's lines that say nothing to a user of this job: the local cluster's token note, "progress bars disabled" beside
    # our own bar, "execution finished" (levels set on those modules' loggers: Ray's own logging setup keeps them)
    for name, level in (("ray._private.authentication.authentication_token_setup", logging.ERROR),
                        ("ray.data._internal.progress", logging.ERROR),
                        ("ray.data._internal.execution.streaming_executor", logging.WARNING)):
        logging.getLogger(name).setLevel(level)
    if not ray.is_initialized():
        # a task the memory monitor kills is retried a few times, not forever (Ray's default): a build on an
        # exhausted node fails with Ray's out-of-memory message instead of waiting (a set value is kept)
        os.environ.setdefault("RAY_task_oom_retries", str(OOM_RETRIES))
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING,
                 log_to_driver=False, include_dashboard=False)
        watch_local_ray()  # a killed build's Ray agents are stopped at once (they outlive it by a minute otherwise)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    if "RAY_DATA_ENABLE_OP_RESOURCE_RESERVATION" not in os.environ:  # a set value is kept
        # Ray Data's per-operator reservation holds the render tasks to about a third of a many-core host, fewer rows a
        # second than 4 GPUs' encoders take (docs/benchmarks.md, 4-GPU build): off
        context.op_resource_reservation_enabled = False
    return ray


def rows_sha256(records) -> str:
    """SHA-256 of every stored field of the rows to encode, in order: the fingerprint covers the source's
    content, so an edited source is never passed off as the shards made from the old one."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record.to_dict()).encode() + b"\n")
    return digest.hexdigest()


def _what_differs(manifest: dict, settings: dict) -> str:
    """Why a previous manifest's fingerprint differs from these settings, in words."""
    keys = [key for key in settings if manifest.get(key) != settings[key]]
    old = {k: v for k, v in (manifest.get("dataset") or {}).items() if k != "rows_sha256"}
    if keys == ["dataset"] and old == {k: v for k, v in settings["dataset"].items() if k != "rows_sha256"}:
        return f"other rows of {settings['dataset']['source']} (the source changed since)"
    return f"different settings ({', '.join(keys) or 'format'})"


def _kept_shards(config: BuildConfig, build_fingerprint: str, plan: list[list],
                 settings: dict | None = None) -> tuple[dict[int, dict], list[str]]:
    """Finished shards a re-run keeps, with their manifest entries, and the names of those it re-encodes.

    A shard is kept only if it was made with these settings and is intact: its SHA-256 equals the one the
    previous manifest recorded, or, when a killed build left no manifest, every page reads back with its
    CRC right and it holds exactly the planned rows. Anything else made with these settings is re-encoded
    (never re-hashed into a clean manifest); a shard set made with other settings is refused or removed.
    """
    out = config.out
    try:
        manifest = shards.read_manifest(out)
    except shards.ManifestError as error:
        if not config.overwrite:
            raise BuildError(f"{error}; pass --overwrite to rebuild the shard set in {out}, or choose another --out") from None
        (out / shards.MANIFEST).unlink()
        manifest = None
    found = sorted(out.glob("shard-*.parquet"))
    fingerprints = {p: shards.shard_fingerprint(p) for p in found}
    stale = [p for p in found if fingerprints[p] not in (build_fingerprint, None)]  # None: unreadable, see below
    if manifest is not None and manifest.get("fingerprint") != build_fingerprint:
        stale.append(out / shards.MANIFEST)
    if stale and not config.overwrite:
        if stale[-1].name == shards.MANIFEST and settings is not None:
            why = f"{stale[-1]} was made with {_what_differs(manifest, settings)}"
        else:
            why = f"{stale[0]} was made with different settings (encoder, render, dataset or its rows, dtype or shard size)"
        raise BuildError(f"{why}; pass --overwrite to replace the shard set in {out}, or choose another --out")
    for path in stale + list(out.glob(shards.PARTIAL_SHARDS)):  # and what a killed writer left half-written
        path.unlink()
    recorded = {s["name"]: s for s in manifest["shards"]} if manifest is not None and not stale else {}
    names = {shards.shard_name(i): i for i in range(len(plan))}
    kept, damaged = {}, []
    for path in found:
        if path in stale or path.name not in names:
            continue
        index = names[path.name]
        if path.name in recorded:
            problem = None if file_sha256(path) == recorded[path.name]["sha256"] else "checksum differs from the manifest"
        else:
            problem = shards.read_back(path, [record.id for record in plan[index]])
        if problem is None:
            kept[index] = recorded.get(path.name) or shards.shard_summary(path)
        else:
            damaged.append(f"{path.name} ({problem})")
            path.unlink()
    return kept, damaged


def build(config: BuildConfig, progress: bool = True) -> dict:
    """Run the whole job and return the manifest (which is also written to ``config.out``). The build holds
    ``config.out``'s writer lock throughout: a second build into the same folder is refused, not interleaved."""
    _check_options(config)
    check_font(config.render.font_path)
    try:
        with locks.exclusive(config.out, f"rot-render build --dataset {config.dataset}"):
            (config.out / STARTS).unlink(missing_ok=True)  # scratch state of an earlier build killed before its cleanup
            pieces.clear(config.out)
            foreign = [p for p in sorted(config.out.glob("shard-*.parquet")) if shards.foreign_parquet(p)]
            if foreign:  # a user's file under a shard's name: never overwritten (checked before Ray starts)
                raise BuildError(f"{foreign[0]} is a Parquet file that rot-render did not write; move it out of "
                                 f"{config.out} (the build would overwrite it) or choose another --out")
            return _build(config, progress)
    except locks.FolderBusy as error:
        raise BuildError(str(error)) from None


def _build(config: BuildConfig, progress: bool) -> dict:
    started = time.perf_counter()
    records, skipped = load_records(config.dataset, config.split, data_dir=config.data_dir,
                                    on_error=config.on_error, keep_calculator=config.keep_calculator)  # bad rows: fail fast
    with ThreadPoolExecutor(1) as pool:  # the encoder is read and the rows checked while Ray starts (each takes seconds)
        reading = pool.submit(_prepare_rows, config, records, skipped, started)
        ray = _start_ray(config.address)  # in the main thread: Ray started from another thread lost its GCS
        ray_started = time.perf_counter()
        records, source, render, rows_seconds = reading.result()
    prepared = time.perf_counter()
    expected_sha256, token_px = source.weights_sha256, source.token_px
    source_rows_sha256 = rows_sha256(records)
    resources = ray.cluster_resources()
    n_gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    num_encoders = config.num_encoders or max(1, ENCODERS_PER_GPU * n_gpus if n_gpus else
                                              min(cpus // CPU_THREADS_PER_ENCODER, MAX_CPU_ENCODERS))
    encoder_info = source.describe(config.attn_implementation, "bfloat16" if n_gpus else "float32",
                                   cpu_threads=None if n_gpus else CPU_THREADS_PER_ENCODER)
    settings = {
        "format": shards.FORMAT,
        "dataset": {"source": config.dataset, "split": config.split, "keep_calculator": config.keep_calculator,
                    "limit": config.limit, "rows_sha256": source_rows_sha256},
        "encoder": encoder_info, "render": render.to_dict(), "dtype": config.dtype, "shard_size": config.shard_size,
    }
    build_fingerprint = shards.fingerprint(settings)
    config.out.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(records) / config.shard_size)
    plan = [records[i * config.shard_size:(i + 1) * config.shard_size] for i in range(n_shards)]
    kept, damaged = _kept_shards(config, build_fingerprint, plan, settings)
    done = set(kept)
    todo = [dict(record.to_dict(), shard=i, position=j)
            for i in range(n_shards) if i not in done for j, record in enumerate(plan[i])]

    encode_seconds, steady_rate, first_rows_seconds, written = 0.0, 0.0, 0.0, {}
    if todo:
        encode_started = time.perf_counter()
        with ray_noise_filtered():  # Ray's error-level line about its own actor arguments, printed on every build
            steady_rate, first_rows_at, written = _encode_and_write(
                ray, BuildPlan(config, render, token_px, expected_sha256, build_fingerprint, encoder_info["dim"], plan,
                               todo, num_encoders, n_gpus), progress)
        encode_seconds, first_rows_seconds = time.perf_counter() - encode_started, first_rows_at - encode_started

    summaries = [written[i] if i in written else kept[i] for i in range(n_shards)]
    manifest = dict(
        settings,
        fingerprint=build_fingerprint,
        embedding={"dim": encoder_info["dim"], "dtype": config.dtype, "layout": "row-major [n_tokens, dim], little-endian"},
        rows=sum(s["rows"] for s in summaries),
        tokens=sum(s["tokens"] for s in summaries),
        truncated_rows=sum(s.get("truncated", 0) for s in summaries),
        skipped_rows=len(skipped),
        skipped=[vars(s) for s in skipped],
        shards=summaries,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    try:
        shards.write_manifest(config.out, manifest)
    except OSError as error:
        raise _disk_error(error, config.out) from None
    manifest["run"] = {  # printed in the summary, not stored: it differs between a build and its resume
        "encoded_rows": len(todo), "resumed_shards": len(done), "reencoded_damaged": damaged, "encode_seconds": encode_seconds,
        "steady_images_per_s": steady_rate,
        "seconds": time.perf_counter() - started, "encoders": num_encoders, "gpus": n_gpus,
        # where a build's start-up goes: reading and checking the rows and, beside it, starting Ray; then until the
        # first encoded rows arrive (actors importing torch and loading the tower, the first render tasks)
        "startup": {"rows_and_ray_s": prepared - started, "rows_s": rows_seconds, "ray_s": ray_started - started,
                    "first_rows_s": first_rows_seconds},
    }
    return manifest


def _prepare_rows(config: BuildConfig, records: list, skipped: list, started: float) -> tuple[list, EncoderSource, RenderSettings, float]:
    """The encoder's source (weights read and hashed), the render settings for its token size, the rows its font
    draws faithfully (cut to --limit); and the seconds this took since the build started."""
    source = read_encoder_source(config.encoder)
    source.weights_sha256  # hashed here, beside Ray's start
    render = config.render.resolved(source.token_px)
    records = _drawable(records, render, config.on_error, skipped, config.limit)
    return records, source, render, time.perf_counter() - started


def _check_options(config: BuildConfig) -> None:
    """Numbers that would build nothing, everything or fail deep inside Ray: refused in one line first."""
    for flag, value in (("--shard-size", config.shard_size), ("--batch-size", config.batch_size),
                        ("--num-encoders", config.num_encoders), ("--limit", config.limit)):
        if value is not None and value < 1:
            raise BuildError(f"{flag} {value} must be at least 1" + (" (leave --limit out to build every row)" if flag == "--limit" else ""))
    if config.dtype not in shards.STORED_DTYPES:
        raise BuildError(f"--dtype {config.dtype} is not one of {', '.join(shards.STORED_DTYPES)}")


def _drawable(records: list, render: RenderSettings, on_error: str, skipped: list, limit: int | None) -> list:
    """The first ``limit`` records (all without one) whose CoT the font can draw faithfully; the others before them are
    bad rows (missing glyphs, right-to-left). Rows after the limit are neither checked nor counted: a --limit 8 smoke
    build neither waits on, nor fails for, the rest of a 7 473-row source."""
    kept = []
    for record in records:
        if limit is not None and len(kept) == limit:
            break
        problem = drawing_problem(line_text(record.cot, render), render.font_path)
        if problem is None:
            kept.append(record)
        else:
            bad_row(record.file, record.line, problem, on_error, skipped)
    skipped.sort(key=lambda row: (row.file, row.line))
    if not kept:
        first = skipped[0]
        raise BuildError(f"every row was skipped ({len(skipped)}), nothing to build; the first: {first.file}:{first.line}: {first.reason}")
    return kept


@dataclass
class BuildPlan:
    """What the Ray job encodes and where it goes, worked out before any encoding starts."""

    config: BuildConfig
    render: RenderSettings  # resolved to the encoder's token size
    token_px: int
    expected_sha256: str  # the encoder weights every actor must load
    fingerprint: str  # of the build's settings: every shard records it
    dim: int  # embedding size
    shard_rows: list  # shard i holds these records, in this order
    todo: list[dict]  # the rows of the shards not kept from before, with their shard and position
    num_encoders: int
    n_gpus: int


def _encode_and_write(ray, plan: BuildPlan, progress: bool) -> tuple[float, float, dict]:
    """Render (CPU tasks) and encode (GPU actors) the plan's rows; each shard is written by a Ray task as soon as its
    last row is encoded. Returns the steady encoding rate, when the first encoded rows arrived, and each written shard's
    summary."""
    from collections import Counter

    from tqdm import tqdm

    config, render, token_px, todo = plan.config, plan.render, plan.token_px, plan.todo
    pieces.folder(config.out).mkdir()  # build() removed an earlier one
    batch_size = min(config.batch_size, max(1, math.ceil(len(todo) / plan.num_encoders)))
    dataset = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / 32)))
    dataset = dataset.map_batches(render_batch, fn_kwargs={"settings": render, "token_px": token_px},
                                  batch_format="pyarrow", batch_size=min(32, batch_size))  # small: many CPU tasks in parallel
    dataset = dataset.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"encoder": config.encoder, "expected_sha256": plan.expected_sha256, "dtype": config.dtype,
                               "height": render.height, "attn_implementation": config.attn_implementation,
                               "starts_file": str(config.out / STARTS), "max_starts": plan.num_encoders + ENCODER_RESTARTS,
                               "out": str(config.out), "cpu_threads": 0 if plan.n_gpus else CPU_THREADS_PER_ENCODER},
        batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=plan.num_encoders),
        num_gpus=gpu_share(plan.num_encoders, plan.n_gpus), num_cpus=0 if plan.n_gpus else 1,
    )
    # a shard is written by a task on the node that encoded most of its rows (soft: elsewhere if that node is gone),
    # so compressing and hashing it overlaps with encoding, and its pieces are read where they were written
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    write_shard = ray.remote(num_cpus=1, max_retries=WRITE_RETRIES)(write_shard_from_pieces)
    encoded_on: dict[int, Counter] = {}  # shard -> rows encoded on each node
    names: dict[int, set] = {}  # shard -> its pieces
    writes: dict[int, object] = {}
    arrived = np.zeros(len(plan.shard_rows), dtype=np.int64)
    arrivals = []  # (seconds, rows so far) per encoded block
    received = 0  # bytes of the rows' records the driver took from Ray Data: no embedding is among them
    try:
        with tqdm(total=len(todo), unit="row", desc="render+encode", disable=not progress) as bar:
            for records in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):  # one per encoded block
                received += records.nbytes
                rows = zip(*(records[column].to_pylist() for column in ("shard", "node", "piece")))
                for (index, node, piece), count in Counter(rows).items():
                    encoded_on.setdefault(index, Counter())[node] += count
                    names.setdefault(index, set()).add(piece)
                    arrived[index] += count
                    if arrived[index] == len(plan.shard_rows[index]):  # complete: off to a writer task
                        here = NodeAffinitySchedulingStrategy(encoded_on[index].most_common(1)[0][0], soft=True)
                        writes[index] = write_shard.options(scheduling_strategy=here).remote(
                            config.out, index, sorted(names.pop(index)), int(arrived[index]), plan.fingerprint, plan.dim,
                            config.dtype)
                bar.update(records.num_rows)
                arrivals.append((time.perf_counter(), records.num_rows + (arrivals[-1][1] if arrivals else 0)))
        written = dict(zip(writes, ray.get(list(writes.values()))))
    except Exception as error:  # a writer task's error, or the encoder actors' restart budget spent
        _settle(ray, writes)
        if full := _full_disk(error):
            raise _disk_error(full, config.out) from None
        if "EncoderDied" in f"{type(error).__name__} {error}":
            raise BuildError(f"the encoder actors died {ENCODER_RESTARTS + 1} times in this build (memory? the GPU? see Ray's "
                             f"lines above); the finished shards in {config.out} are kept: fix the cause, then re-run the "
                             "same command to resume") from None
        raise
    except KeyboardInterrupt:  # Ctrl-C: the writers already started finish (their shards are kept) before their
        _settle(ray, writes)  # pieces are cleared below; else they fail on missing pieces and Ray prints it at exit
        raise
    finally:
        (config.out / STARTS).unlink(missing_ok=True)
        pieces.clear(config.out)
    for leftover in config.out.glob(shards.PARTIAL_SHARDS):  # of a writer task killed mid-write and run again
        leftover.unlink(missing_ok=True)
    arrivals.append((time.perf_counter(), arrivals[-1][1] if arrivals else 0))  # the last shard written
    (config.out / STATS).write_text(dataset.stats() + "\n" + _placement(written, encoded_on, received, len(todo)))
    if names:
        raise BuildError(f"shards {sorted(names)} did not receive all their rows; re-run the same command to resume")
    return steady_rate(arrivals), arrivals[0][0], {index: summary for index, (summary, _) in written.items()}


def _placement(written: dict, encoded_on: dict, received: int, rows: int) -> str:
    """build-stats.txt's account of where the shards were written (beside the nodes that encoded their rows) and of
    the bytes the driver received: what shows that the build scales on a cluster."""
    lines = ["Shard writers (the node each shard was written on; the nodes that encoded its rows: rows):"]
    for index, (summary, node) in sorted(written.items()):
        encoders = ", ".join(f"{encoder}: {count}" for encoder, count in sorted(encoded_on[index].items()))
        lines.append(f"  {summary['name']} written on {node}; encoded on {encoders}")
    lines.append(f"Driver received {received} bytes from Ray Data for {rows} encoded rows (their shard, piece and node; "
                 f"no embedding); the shards hold {sum(summary['bytes'] for summary, _ in written.values())} bytes")
    return "\n".join(lines) + "\n"


def gpu_share(num_encoders: int, n_gpus: int) -> float:
    """The fraction of a GPU each encoder actor asks Ray for: actors are spread evenly, as many on each GPU as it
    takes to place them all (3 actors per GPU: a third each)."""
    return 1 / math.ceil(num_encoders / n_gpus) if n_gpus else 0


def _settle(ray, writes: dict) -> None:
    """Let the other writer tasks end before the build stops (their shards are kept; a failed one is not reported
    again by Ray as an unhandled error at exit)."""
    for ref in writes.values():
        try:
            ray.get(ref)
        except Exception:
            pass


def _full_disk(error: BaseException | None) -> OSError | None:
    """The full disk (or quota) behind an error of the Ray job, if any. A shard writer's OSError is the cause of Ray's
    error; an encoder actor's, writing its pieces, reaches the driver only as text in Ray Data's error."""
    full, text = (errno.ENOSPC, errno.EDQUOT), ""
    while error is not None:  # Ray wraps a task's error once or twice
        if isinstance(error, OSError) and error.errno in full:
            return error
        text += str(error)
        error = getattr(error, "cause", None) or error.__cause__
    number = next((number for number in full if f"OSError: [Errno {number}]" in text), None)
    return OSError(number, os.strerror(number)) if number else None


def _disk_error(error: OSError, out: Path) -> Exception:
    """A full disk (or quota) in one line that says what to do; any other OSError as it is."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return error
    return BuildError(f"no space left on the device of {out} ({os.strerror(error.errno)}); the finished shards are kept "
                      "and nothing half-written is: free space, then re-run the same command to resume")


def steady_rate(arrivals: list[tuple[float, int]]) -> float:
    """Rows/s once every encoder is up: over the middle 80% of the rows (start-up and the last stragglers
    left out), or from the first batch to the end when there are too few batches for that."""
    if len(arrivals) < 2:
        return 0.0
    total = arrivals[-1][1]
    inside = [(t, n) for t, n in arrivals if 0.1 * total <= n <= 0.9 * total]
    (t0, n0), (t1, n1) = (inside[0], inside[-1]) if len(inside) >= 3 else (arrivals[0], arrivals[-1])
    return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

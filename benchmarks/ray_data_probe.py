"""How many render tasks does Ray Data run at once in front of the encoder actors? The build's pipeline shape with
sleeps in place of work (a render task: 32 rows, 150 ms; an encoder call: 255 rows, 300 ms; no GPU), so it measures
Ray Data's scheduling, not the host. Run it with and without RAY_DATA_ENABLE_OP_RESOURCE_RESERVATION=0.

    python benchmarks/ray_data_probe.py --cpus 64 --actors 12 --rows 30000
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow as pa
import ray

RENDER_S, ENCODE_S = 0.15, 0.3  # a render task of 32 rows and an encoder call of 255 rows, as measured on a 4-GPU host


def render(batch: pa.Table) -> pa.Table:
    started = time.time()
    time.sleep(RENDER_S)
    rows = batch.num_rows
    return batch.append_column("pixels", pa.array([b"x" * 80_000] * rows, pa.large_binary())) \
                .append_column("started", pa.array([started] * rows)).append_column("ended", pa.array([time.time()] * rows))


class Encode:
    def __call__(self, batch: pa.Table) -> pa.Table:
        time.sleep(ENCODE_S * batch.num_rows / 255)
        return batch.drop_columns(["pixels"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--actors", type=int, default=12)
    parser.add_argument("--rows", type=int, default=30000)
    args = parser.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    dataset = ray.data.from_items([{"i": i} for i in range(args.rows)], override_num_blocks=max(1, args.rows // 32))
    dataset = dataset.map_batches(render, batch_format="pyarrow", batch_size=32)
    dataset = dataset.map_batches(Encode, batch_format="pyarrow", batch_size=255, num_cpus=0,
                                  compute=ray.data.ActorPoolStrategy(size=args.actors))
    started, spans = time.time(), set()
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):  # the pixels are dropped: small rows
        spans.update(zip(table.column("started").to_pylist(), table.column("ended").to_pylist()))  # a set: one per task
    wall = time.time() - started
    grid = np.arange(min(s for s, _ in spans), max(e for _, e in spans), 0.05)
    running = [sum(1 for s, e in spans if s <= t < e) for t in grid]
    print(json.dumps({"cpus": args.cpus, "actors": args.actors, "rows": args.rows,
                      "reservation": os.environ.get("RAY_DATA_ENABLE_OP_RESOURCE_RESERVATION", "default"),
                      "rows_per_s": round(args.rows / wall), "render_tasks_at_once_mean": round(float(np.mean(running)), 1),
                      "render_tasks_at_once_max": max(running), "render_rows_per_s_if_all_cpus": round(args.cpus * 32 / RENDER_S),
                      "encode_rows_per_s_possible": round(args.actors * 255 / ENCODE_S)}))


if __name__ == "__main__":
    main()

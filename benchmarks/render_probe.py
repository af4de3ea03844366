"""The renderer's cost on this host: Pillow's version, one process, then N processes at once (GSM8k CoTs).

The build's render tasks run on the host's cores; when they cannot keep up, more GPUs do not make a build faster
(docs/benchmarks.md, issue 16). Run on the GPU machine: ``python benchmarks/render_probe.py --out render.json``.
"""

import argparse
import json
import os
import time
from multiprocessing import Pool

import PIL

from rot_data.records import load_records
from rot_vision.render import RenderSettings, render_fitted

SETTINGS = RenderSettings().resolved(32)  # Qwen3-VL's 32 px token
COTS = [r.cot for r in load_records("gsm8k", "train")[0][:2000]]


def render_all(cots: list[str]) -> float:
    """Seconds to render ``cots`` in this process."""
    started = time.perf_counter()
    for cot in cots:
        render_fitted(cot, SETTINGS, 32)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="render_probe.json")
    parser.add_argument("--processes", default="8,16,32,48,64")
    args = parser.parse_args()
    results = {"pillow": PIL.__version__, "cpus": os.cpu_count(), "one_process_ms_per_row": render_all(COTS[:500]) / 500 * 1e3}
    for n in map(int, args.processes.split(",")):
        chunks = [COTS[(i * 125) % 2000:(i * 125) % 2000 + 125] for i in range(4 * n)]
        with Pool(n) as pool:
            pool.map(render_all, chunks[:n])  # warm-up: every worker imports and loads the font
            started = time.perf_counter()
            seconds = pool.map(render_all, chunks)
            wall = time.perf_counter() - started
        results[f"{n}_processes_rows_per_s"] = len(chunks) * 125 / wall
        results[f"{n}_processes_ms_per_row_each"] = sum(seconds) / (len(chunks) * 125) * 1e3
    print(json.dumps(results, indent=1))
    with open(args.out, "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()

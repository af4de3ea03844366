"""The 1-GPU build rate of this code against another version's, taking turns on the same rows and tower, and whether
their shards are the same bytes (issue 32.4: the build's writers moved off the driver; the rate must not fall).

    git worktree add /tmp/old 80efaf2        # the version to compare with (its packages/ folder)
    python benchmarks/build_ab.py --encoder <tower> --old /tmp/old/packages --out build_ab.json

Each side runs ``rot-render build`` (multi_gpu.build: steady images/s from the build's own summary) on GSM8k train
``--repeat`` times, new, old, new, old.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import multi_gpu

PACKAGES = Path(__file__).resolve().parents[1] / "packages"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encoder", required=True, help="the tower both builds encode with (a folder or 'anchor')")
    parser.add_argument("--old", required=True, help="the other version's packages/ folder")
    parser.add_argument("--repeat", type=int, default=2, help="GSM8k train this many times (7 473 rows each)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows (a smoke run on a CPU)")
    parser.add_argument("--work", default="/tmp/build-ab")
    parser.add_argument("--out", default="build_ab.json")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = multi_gpu.repeated_gsm8k(work / f"gsm8k-x{args.repeat}.jsonl", args.repeat)
    # the installed wheels stay on the path; each side runs from its own tree (multi_gpu.command: working directory
    # and PYTHONPATH), and says which rot_render it imported, so the comparison cannot run one version twice
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                               if p and Path(p).resolve() != PACKAGES.resolve())
    trees = {"new": PACKAGES, "old": Path(args.old).resolve()}
    results = {"encoder": args.encoder, "old": args.old, "rows": sum(1 for _ in open(rows)), "imported": {}, "runs": {}}
    for name, tree in trees.items():
        probe = work / f"import-{name}.log"
        multi_gpu.command([sys.executable, "-c", "import rot_render; print(rot_render.__file__)"], probe, 60, None, tree)
        results["imported"][name] = probe.read_text().strip()
        if not results["imported"][name].startswith(str(tree)):
            raise SystemExit(f"the {name} side imported {results['imported'][name]!r}, not its tree {tree}")
    for turn in range(2):
        for name, tree in trees.items():
            out = work / f"{name}{turn}"
            run = multi_gpu.build(out, args.encoder, args.limit, 1024, work, 600, dataset=str(rows),
                                  gpus=1, packages=tree)
            results["runs"][f"{name}{turn}"] = {k: run.get(k) for k in ("returncode", "seconds", "images_per_s_with_startup",
                                                                       "images_per_s_steady", "summary", "log_tail")}
            Path(args.out).write_text(json.dumps(results, indent=1))
            if run.get("returncode") != 0:
                raise SystemExit(f"the {name} build of turn {turn + 1} failed: {(run.get('log_tail') or '').strip()[-300:]}")
            print(f"{name} (turn {turn + 1}): {run.get('images_per_s_steady')} images/s steady", flush=True)
    steady = {side: [results["runs"][f"{side}{t}"]["images_per_s_steady"] for t in range(2)] for side in ("new", "old")}
    if all(v is not None for side in steady.values() for v in side):
        results["steady_new_vs_old"] = sum(steady["new"]) / sum(steady["old"])
    results["shards_new_vs_old"] = multi_gpu.compare_shards(work / "new0", work / "old0")
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: results.get(k) for k in ("steady_new_vs_old", "shards_new_vs_old")}))


if __name__ == "__main__":
    main()

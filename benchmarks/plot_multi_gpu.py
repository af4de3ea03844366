"""Loss curves of the multi-GPU runs (one panel per stage and ZeRO stage in each JSON written by multi_gpu.py).

    python benchmarks/plot_multi_gpu.py docs/multi-gpu-2xh100-*.json --out docs/figures/multi_gpu_losses.png

Resumed runs are drawn from the step after their checkpoint, over the run they continue.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

RUN = re.compile(r"stage(?P<stage>\d)_zero(?P<zero>\d)_(?P<label>.+)")
LABELS = {"1gpu": "1 GPU", "2gpu": "2 GPUs", "1gpu_halved_micro_batch": "1 GPU, 2-GPU-sized micro-batches",
          "resume_2to1": "saved on 2, resumed on 1", "resume_1to2": "saved on 1, resumed on 2"}


def panels(paths: list[Path]) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """(title, {label: [(step, loss)]}) for every stage / ZeRO stage group in every file."""
    found = []
    for path in paths:
        results = json.loads(path.read_text())
        half = results["args"]["train_rows"] // 32 // 2  # checkpoint step of the resume runs (global batch 32)
        groups: dict[tuple[str, str], dict] = {}
        for name, run in results.get("train", {}).items():
            match, losses = RUN.fullmatch(name), run.get("losses", {}).get("loss", [])
            if not match or not losses or match["label"] not in LABELS:
                continue
            first = half + 1 if match["label"].startswith("resume") else 1
            curves = groups.setdefault((match["stage"], match["zero"]), {})
            curves[LABELS[match["label"]]] = [(first + i, loss) for i, loss in enumerate(losses)]
        for (stage, zero), curves in sorted(groups.items()):
            found.append((f"{path.stem}\nStage {'I' * int(stage)} ZeRO-{zero}", curves))
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("multi_gpu_losses.png"))
    args = parser.parse_args()
    found = panels(args.results)
    figure, axes = plt.subplots(1, len(found), figsize=(4.2 * len(found), 3.6), squeeze=False)
    for axis, (title, curves) in zip(axes[0], found):
        for label, points in curves.items():
            steps, losses = zip(*points)
            axis.plot(steps, losses, marker="o", markersize=3, linestyle="--" if "resumed" in label else "-", label=label)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("optimizer step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("training loss")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(found)} panels)")


if __name__ == "__main__":
    main()

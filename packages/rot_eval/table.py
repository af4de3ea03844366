"""The results of evaluation runs side by side: every run its own row, the paper's layout where it is unambiguous,
and the compression picture (accuracy against reasoning tokens).

Why every run gets a row: runs of one method and dataset (a control beside the real run, a ``--limit`` smoke run
beside the full one) used to share a cell and the last one won, so a table could show a zeros control as the model.
The paper-style grid (methods x datasets) is printed only for cells holding exactly one run without a control.
"""

from __future__ import annotations

import json
from pathlib import Path

BENCHMARKS = ["gsm8k", "gsm_hard", "svamp", "multiarith"]  # the paper's column order; other sets follow by name


def load_runs(folders: list[Path]) -> list[dict]:
    """Each folder's summary.json, with the folder it came from under ``run``."""
    return [dict(json.loads((Path(f) / "summary.json").read_text()), run=str(f)) for f in folders]


def model_name(summary: dict) -> str:
    """'RoT (rot-4x4)': the method and the checkpoint's run folder (or the shipped name)."""
    checkpoint = Path(summary["checkpoint"])
    where = checkpoint.parent.name if checkpoint.name == "export" else checkpoint.name
    return f"{summary['method']} ({where or summary['checkpoint']})"


def runs_table(runs: list[dict]) -> str:
    """One row per run: nothing merged, every control and example count shown."""
    lines = ["| run | model | dataset | split | control | n | accuracy % | 95% interval | mean #L | s/question |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        low, high = r["accuracy_95ci"]
        lines.append(f"| {r['run']} | {model_name(r)} | {r['dataset']} | {r['split']} | {r.get('control') or '-'} | "
                     f"{r['examples']} | {100 * r['accuracy']:.1f} | {100 * low:.1f}-{100 * high:.1f} | "
                     f"{r['mean_reasoning_tokens']:.1f} | {r['seconds_per_sample']:.4f} |")
    return "\n".join(lines)


def paper_table(runs: list[dict]) -> tuple[str, list[str]]:
    """(methods x datasets grid of the runs without a control, notes on the cells left out because several runs
    share them). The grid is empty when no cell is unambiguous."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if not r.get("control"):
            cells.setdefault((model_name(r), r["dataset"]), []).append(r)
    notes = [f"{model} on {dataset}: {len(group)} runs ({', '.join(g['run'] for g in group)}), not in the grid"
             for (model, dataset), group in cells.items() if len(group) > 1]
    single = {key: group[0] for key, group in cells.items() if len(group) == 1}
    if not single:
        return "", notes
    present = {dataset for _, dataset in single}
    datasets = [d for d in BENCHMARKS if d in present] + sorted(present - set(BENCHMARKS))
    models = list(dict.fromkeys(model for model, _ in single))
    lines = ["| model | " + " | ".join(datasets) + " | Avg | Avg #L |", "|---" * (len(datasets) + 3) + "|"]
    for model in models:
        row = [single.get((model, d)) for d in datasets]
        shown = [r for r in row if r]
        average = sum(r["accuracy"] for r in shown) / len(shown)
        mean_l = sum(r["mean_reasoning_tokens"] for r in shown) / len(shown)
        lines.append(f"| {model} | " + " | ".join(f"{100 * r['accuracy']:.1f}" if r else "-" for r in row)
                     + f" | {100 * average:.1f} | {mean_l:.1f} |")
    return "\n".join(lines), notes


MARKERS = {"RoT": "o", "SFT with CoT": "s", "SFT without CoT": "^"}


def plot(runs: list[dict], path: Path) -> Path:
    """Accuracy against mean reasoning tokens per run (latents for RoT, CoT tokens for SFT-CoT, 0 without CoT), one
    colour per dataset, one marker per method, 95% intervals as bars; controls drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    colours = {d: plt.cm.tab10(i % 10) for i, d in enumerate(datasets)}
    for r in runs:
        x, y = r["mean_reasoning_tokens"], 100 * r["accuracy"]
        low, high = (100 * v for v in r["accuracy_95ci"])
        colour = colours[r["dataset"]]
        axis.errorbar(x, y, yerr=[[y - low], [high - y]], fmt=MARKERS.get(r["method"], "o"), color=colour,
                      markerfacecolor="none" if r.get("control") else colour, markersize=8, capsize=3)
        label = model_name(r) + (f", control {r['control']}" if r.get("control") else "")
        axis.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
    for method, marker in MARKERS.items():
        axis.plot([], [], marker, color="grey", label=method)
    for dataset, colour in colours.items():
        axis.plot([], [], "s", color=colour, label=dataset)
    axis.set_xlabel("mean reasoning tokens per question (latents / CoT tokens)")
    axis.set_ylabel("accuracy %")
    axis.set_ylim(-3, 103)
    axis.set_title("accuracy against the thought's length (hollow: a control)")
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

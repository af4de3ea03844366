"""``rot-eval``: evaluate an export on a benchmark, print the paper-style table, look inside the latents."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from rot_data.terminal import wide_help_when_piped

from rot_data import registry
from rot_data.records import builtin_datasets_help
from rot_eval import MAX_ANSWER_TOKENS

wide_help_when_piped()
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Evaluate RoT and SFT-baseline exports.")


@app.command("run")
def run_eval(
    checkpoint: str = typer.Option(..., help="an export folder (<run --out>/export) or a shipped model: 'rot-4x4' or 'rot-5x5' (4x4 or 5x5 multiplication)"),
    dataset: str = typer.Option(..., help=f"{builtin_datasets_help()}, or a .jsonl/.json/.parquet/.txt file"),
    out: Path = typer.Option(..., help="folder for predictions.jsonl and summary.json"),
    split: str = typer.Option("test"),
    data_dir: Optional[Path] = typer.Option(None, help="another copy of the package's data folders (e.g. ../shared/data)"),
    latents: Optional[int] = typer.Option(None, help="latent budget (default: the one recorded in the export; the paper uses 32 for GSM8k)"),
    dynamic_threshold: Optional[float] = typer.Option(None, help="stop latents early when within this mean squared distance of <img_end>"),
    learned_stop: bool = typer.Option(False, help="stop each question's latents where the LM head gives <img_end> a probability above one half (a model trained with --stop-weight; at most the budget)"),
    oracle_latents: bool = typer.Option(False, help="each question's budget is its own CoT's visual-token count, read from --truth-shards (the oracle a stop is measured against)"),
    batch_size: int = typer.Option(64),
    max_answer_tokens: int = typer.Option(MAX_ANSWER_TOKENS),
    max_cot_tokens: int = typer.Option(256, help="SFT-CoT baseline: generation cap"),
    limit: Optional[int] = typer.Option(None, help="only the first N examples"),
    control: Optional[str] = typer.Option(None, help="a control: latents replaced by 'zeros', by another question's ('shuffled'), or by the true visual embeddings ('truth')"),
    truth_shards: Optional[Path] = typer.Option(None, help="--control truth: a shard set of the evaluated split, built with the training encoder"),
) -> None:
    """Generate for every question; write per-example predictions and a summary."""
    from rot_data.records import RecordError
    from rot_eval.evaluate import evaluate

    try:
        summary = evaluate(checkpoint, dataset, out, split, data_dir, latents, dynamic_threshold, batch_size,
                           max_answer_tokens, max_cot_tokens, limit, control=control, truth_shards=truth_shards,
                           learned_stop=learned_stop, oracle_latents=oracle_latents)
    except (RecordError, FileNotFoundError, ValueError) as error:
        message = str(error).replace(" or pass --on-error skip", "")  # rot-eval has no --on-error: every row is evaluated
        typer.secho(f"error: {message}", fg="red", err=True)
        raise typer.Exit(1)
    low, high = summary["accuracy_95ci"]
    controlled = f" with the {control} control" if control else ""
    typer.echo(f"{summary['method']} on {dataset} [{split}]{controlled}: accuracy {100 * summary['accuracy']:.2f}% "
               f"(95% interval {100 * low:.1f}-{100 * high:.1f}%) over "
               f"{summary['examples']} examples, mean #L {summary['mean_reasoning_tokens']:.1f}, "
               f"{summary['seconds_per_sample']:.4f} s/sample ({summary['samples_per_s']:.1f} samples/s, "
               f"batch {batch_size}, {summary['device']}); predictions in {out / 'predictions.jsonl'}")


@app.command()
def table(
    runs: List[Path] = typer.Argument(..., help="evaluation output folders (each with summary.json)"),
    plot: Optional[Path] = typer.Option(None, help="also draw accuracy against mean reasoning tokens per run (a .png)"),
) -> None:
    """Every run as its own row (control, n, 95% interval), then the paper's grid where each cell has one run."""
    from rot_eval.table import load_runs, paper_table, plot as draw, runs_table

    missing = [r for r in runs if not (r / "summary.json").exists()]
    if missing:
        typer.secho(f"error: {missing[0] / 'summary.json'} is missing; run rot-eval run --out {missing[0]} first", fg="red", err=True)
        raise typer.Exit(1)
    summaries = load_runs(runs)
    typer.echo(runs_table(summaries))
    grid, notes = paper_table(summaries)
    if grid:
        typer.echo("\nPaper layout (runs without a control, one per cell):\n" + grid)
    for note in notes:
        typer.echo(f"note: {note}")
    if plot:
        typer.echo(f"picture: {draw(summaries, plot)}")


@app.command()
def viz(
    checkpoint: str = typer.Option(..., help="an export folder (<run --out>/export) or a shipped model: 'rot-4x4' or 'rot-5x5' (4x4 or 5x5 multiplication)"),
    question: str = typer.Option(..., help="the question to reason about"),
    out: Path = typer.Option(Path("viz")),
    latents: Optional[int] = typer.Option(None, help="latent budget (default: the one recorded in the export)"),
    shards: Optional[Path] = typer.Option(None, help="a shard set: also list the rendered CoT text nearest to each latent"),
    reader: Optional[str] = typer.Option(None, help="a VLM that reads the latents back as text ('anchor': the tower's own VLM)"),
    cot: Optional[str] = typer.Option(None, help="the question's true CoT: the read-back picture marks what matches it"),
) -> None:
    """Save the latent heatmap, the token-similarity matrix and per-token statistics for one question (and, with
    --reader, what the latents read as)."""
    from rot_model.export import latent_budget
    from rot_eval.evaluate import check_positions
    from rot_eval.generate import generate_rot, load_for_inference
    from rot_model.shard_stream import ShardSet
    from rot_eval.viz import draw, nearest_text

    try:
        model, tokenizer, config = load_for_inference(checkpoint)
        latents = latent_budget(config, latents)
        check_positions(model, tokenizer, [question], latents + MAX_ANSWER_TOKENS + 2, "--latents + answer tokens")
    except (FileNotFoundError, ValueError) as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(1)
    (result,) = generate_rot(model, tokenizer, [question], latents=latents, max_answer_tokens=MAX_ANSWER_TOKENS)
    paths = draw(result.latents, out, question[:60])
    if shards:
        (out / "nearest.md").write_text(nearest_text(result.latents, ShardSet.open(shards)))
        paths.append(out / "nearest.md")
    read_as = ""
    if reader:
        from rot_vision import read
        from rot_eval.readback import draw_transcript

        vlm, vlm_tokenizer = read.load(reader)
        (transcript,) = read.transcribe(vlm, vlm_tokenizer, [result.latents], max_new_tokens=max(64, 4 * len(cot or "")))
        paths.append(draw_transcript(transcript, out / "readback.png", cot, title=f"the latents of '{question[:50]}' read by {reader}"))
        read_as = f"\nthe latents read as: {' '.join(transcript.split())!r}"
    typer.echo(f"answer: {result.text!r} after {len(result.latents)} latents{read_as}\nwrote " + ", ".join(str(p) for p in paths))


@app.command()
def stops(
    checkpoint: str = typer.Option(..., help="an export folder (<run --out>/export) or a shipped model: 'rot-4x4' or 'rot-5x5' (4x4 or 5x5 multiplication)"),
    dataset: str = typer.Option(..., help=f"{builtin_datasets_help()}, or a .jsonl/.json/.parquet/.txt file"),
    out: Path = typer.Option(..., help="folder for stops.json and stops.png"),
    split: str = typer.Option("valid", help="choose thresholds on valid, not test"),
    data_dir: Optional[Path] = typer.Option(None, help="another copy of the package's data folders (e.g. ../shared/data)"),
    limit: int = typer.Option(200, min=1, help="the first N questions"),
    steps: Optional[int] = typer.Option(None, help="latent steps to read, past the longest length (default: it + 8)"),
    truth_shards: Optional[Path] = typer.Option(None, help="the split's shard set (rot-render build, the training encoder): each question's own visual-token count as its length, not the export's budget (a mixed-length model)"),
) -> None:
    """Where a stop would end each thought: at every latent step, the distance to <img_end> (what --dynamic-threshold
    reads) and p(<img_end>) (what --learned-stop reads), with no stop in between; the thresholds that end every
    question after its length (the export's budget, or with --truth-shards each question's own), and a picture."""
    import torch

    from rot_data.records import RecordError, load_records
    from rot_eval import stops as stop_module
    from rot_eval.evaluate import oracle_budgets, truth_embeddings
    from rot_eval.generate import load_for_inference
    from rot_model.export import latent_budget, latent_merge

    try:
        model, tokenizer, config = load_for_inference(checkpoint)
        records, _ = load_records(dataset, split, data_dir=data_dir, require_cot=False)
        questions = [record.question for record in records[:limit]]
        if truth_shards is None:
            lengths, named = torch.full((len(questions),), latent_budget(config)), "the export's budget"
        else:
            lengths = oracle_budgets(questions, truth_embeddings(truth_shards, latent_merge(config)))
            named = "each question's own length" if len(set(lengths.tolist())) > 1 else "the questions' length"
        longest = int(lengths.max())
        if steps is not None and steps <= longest:
            raise ValueError(f"--steps {steps}: the stops are read past {named} ({longest} latents): pass at least {longest + 1}")
    except (RecordError, FileNotFoundError, ValueError) as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(1)
    distances, end_probabilities = stop_module.stop_signals(model, tokenizer, questions, steps or longest + 8)
    summary = stop_module.summarize(distances, end_probabilities, lengths)
    paths = stop_module.write(summary, out, f"{checkpoint} on {dataset} [{split}], {len(questions)} questions")
    window = summary["dynamic_window"]
    verdict = (f"any --dynamic-threshold in ({window['low']:.4g}, {window['high']:.4g}] ends every question there"
               if window["separates"] else f"no --dynamic-threshold does (largest distance at it {window['low']:.4g}, "
               f"smallest before it {window['high']:.4g})")
    shown = "/".join(str(length) for length in summary["lengths"])
    typer.echo(f"{named}, {shown} latents: {verdict}; the learned stop ends "
               f"{100 * summary['learned_stop_at_length']:.1f}% of questions there\nwrote "
               + ", ".join(str(p) for p in paths))


@app.command()
def readback(
    checkpoint: str = typer.Option(..., help="an export folder (<run --out>/export) or a shipped model: 'rot-4x4' or 'rot-5x5' (4x4 or 5x5 multiplication)"),
    dataset: str = typer.Option(..., help="a set with CoTs (e.g. icot_mult_4x4)"),
    shards: Path = typer.Option(..., help="the shard set the model was trained on (its render settings place each character)"),
    out: Path = typer.Option(Path("readback"), help="folder for readback.json and readback.png"),
    split: str = typer.Option("test"),
    data_dir: Optional[Path] = typer.Option(None),
    reader: str = typer.Option(registry.ANCHOR, help="the VLM that reads the latents as visual tokens"),
    latents: Optional[int] = typer.Option(None, help="latent budget (default: the export's)"),
    limit: Optional[int] = typer.Option(None),
) -> None:
    """Read a RoT model's latents back as text with the anchor VLM; score them per latent position."""
    from rot_data.records import RecordError
    from rot_eval.readback import read_back

    try:
        summary = read_back(checkpoint, dataset, shards, out, split, data_dir, reader, latents, limit)
    except (RecordError, FileNotFoundError, ValueError) as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"read back {summary['examples']} questions' latents: {100 * summary['char_accuracy']:.1f}% of the true CoT's "
               f"characters; per position in {out / 'readback.png'}")


if __name__ == "__main__":
    app()

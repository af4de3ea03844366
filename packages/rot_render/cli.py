"""``rot-render``: build visual-embedding shards, look at one rendered line, inspect a shard set."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Optional

import typer

from rot_data.terminal import wide_help_when_piped

from rot_data import registry
from rot_data import shards
from rot_data.records import RecordError, builtin_datasets_help
from rot_render.pipeline import BuildConfig
from rot_vision.render import RenderSettings

RENDER = RenderSettings()  # how a line is drawn: `build` and `show` take their defaults from here and nowhere else
BUILD = {f.name: f.default for f in fields(BuildConfig) if f.default is not MISSING}  # and `build` the rest from here

wide_help_when_piped()
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Render chains of thought as one-line images and encode them with a frozen VLM vision tower.")


def _render_settings(height, font_size, padding, font, thought_tags, max_tokens=RENDER.max_tokens) -> RenderSettings:
    return RenderSettings(height=height, font_size=font_size, padding=padding, font_path=font, thought_tags=thought_tags,
                          max_tokens=max_tokens)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(1)


def _human_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024


@app.command()
def build(
    dataset: str = typer.Option(..., help=f"{builtin_datasets_help()}, a .jsonl/.json/.parquet/.txt file, or hf:<id>[:<config>]"),
    out: Path = typer.Option(..., help="output folder for shards and manifest.json"),
    split: str = typer.Option(BUILD["split"]),
    encoder: str = typer.Option(BUILD["encoder"], help="'anchor' (the shipped pretrained VLM), a hub id or folder of a Qwen2-VL/Qwen2.5-VL/Qwen3-VL checkpoint, or 'tiny' (untrained smoke-test tower)"),
    dtype: str = typer.Option(BUILD["dtype"], help="stored embedding dtype: bf16, fp16 or fp32"),
    shard_size: int = typer.Option(BUILD["shard_size"], help="rows per Parquet shard"),
    on_error: str = typer.Option(BUILD["on_error"], help="malformed rows: 'fail' stops at the first, 'skip' skips and counts them in the manifest"),
    keep_calculator: bool = typer.Option(BUILD["keep_calculator"], help="keep GSM8k's <<a*b=c>> calculator notes in the CoT"),
    data_dir: Optional[Path] = typer.Option(BUILD["data_dir"], help="another copy of the package's data folders (e.g. ../shared/data)"),
    limit: Optional[int] = typer.Option(BUILD["limit"], help="only the first N rows (smoke runs)"),
    height: Optional[int] = typer.Option(RENDER.height, help="line height in px (default: one token row of the encoder, 32 for Qwen3-VL)"),
    font_size: int = typer.Option(RENDER.font_size),
    padding: int = typer.Option(RENDER.padding),
    font: Optional[str] = typer.Option(RENDER.font_path, help="a .ttf file (default: DejaVu Sans shipped with matplotlib)"),
    thought_tags: bool = typer.Option(RENDER.thought_tags, help="wrap the CoT in <|begin_of_thought|> ... <|end_of_thought|>"),
    max_tokens: int = typer.Option(RENDER.max_tokens, help="width cap in visual tokens: a longer line is cut after the last character that fits (counted in the manifest)"),
    batch_size: int = typer.Option(BUILD["batch_size"], help="images per packed encoder call"),
    num_encoders: Optional[int] = typer.Option(BUILD["num_encoders"], help="encoder actors (default: three per GPU, sharing it, so one encodes while the others do their host work; on a CPU-only cluster one per 2 cores, at most 8, each running 2 torch threads whatever their number, so the shards' bytes do not depend on it)"),
    address: Optional[str] = typer.Option(BUILD["address"], help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)"),
    overwrite: bool = typer.Option(BUILD["overwrite"], help="replace a shard set made with different settings"),
) -> None:
    """Render and encode every CoT of a dataset into Parquet shards (resumes if re-run)."""
    from rot_render.pipeline import STATS, BuildError, build as run_build

    config = BuildConfig(dataset=dataset, out=out, split=split, encoder=encoder, dtype=dtype, shard_size=shard_size,
                         on_error=on_error, keep_calculator=keep_calculator, data_dir=data_dir, limit=limit,
                         render=_render_settings(height, font_size, padding, font, thought_tags, max_tokens),
                         batch_size=batch_size, num_encoders=num_encoders, address=address, overwrite=overwrite)
    if encoder == "tiny":
        typer.secho("note: --encoder tiny is an UNTRAINED random tower, for smoke runs only; its embeddings carry no meaning.",
                    fg="yellow", err=True)
    try:
        manifest = run_build(config)
    except (RecordError, BuildError, ValueError) as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _fail(f"interrupted; the finished shards in {out} are kept: re-run the same command to resume")
    except Exception as error:
        if not type(error).__module__.startswith("ray."):
            raise
        last = ([line for line in str(error).splitlines() if line.strip()] or [type(error).__name__])[-1].strip()
        _fail(f"the Ray job stopped ({last}); the finished shards in {out} are kept: re-run the same command to resume")
    run = manifest["run"]
    for damaged in run["reencoded_damaged"]:
        typer.secho(f"note: re-encoded {damaged}", fg="yellow", err=True)
    typer.echo(build_summary(manifest, out, out / STATS))


def _count(number: int, word: str) -> str:
    return f"{number} {word}{'' if number == 1 else 's'}"


def _encoder_words(encoder: dict) -> str:
    """Which tower made the embeddings, in words: a user must see whether they mean anything."""
    if encoder["untrained"]:
        kind = "UNTRAINED random tower, for smoke runs only"
    elif encoder["name"] == registry.ANCHOR:
        kind = f"the shipped pretrained anchor VLM's tower, {registry.SHIPPED[registry.ANCHOR]}"
    else:
        kind = "pretrained"
    return f"{encoder['name']} ({encoder['model_type']}, {kind}; weights sha256 {encoder['weights_sha256'][:12]})"


def build_summary(manifest: dict, out: Path, stats: Path) -> str:
    """The lines `rot-render build` ends with (benchmarks/gpu_bench.py parses the rates of the last)."""
    run = manifest["run"]
    if run["encoded_rows"]:
        rate = run["encoded_rows"] / run["encode_seconds"] if run["encode_seconds"] else 0.0
        steady = (f"{run['steady_images_per_s']:.1f} images/s once the encoders were up" if run["steady_images_per_s"]
                  else "too few blocks to time the encoders alone")  # a rate of 0 would read as a stalled encoder
        this_run = (f"encoded {_count(run['encoded_rows'], 'row')} this run ({_count(run['resumed_shards'], 'shard')} kept "
                    f"from before) at {rate:.1f} images/s ({steady}) "
                    f"on {_count(run['encoders'], 'encoder')}, {_count(run['gpus'], 'GPU')}")
    else:  # a rate of 0 rows would read as a stalled encoder
        this_run = f"nothing to encode: {_count(run['resumed_shards'], 'shard')} kept from before, checksums checked"
    return (
        f"done: {_count(manifest['rows'], 'row')}, {_count(manifest['tokens'], 'visual token')} (dim {manifest['embedding']['dim']}, "
        f"{manifest['embedding']['dtype']}), {_count(len(manifest['shards']), 'shard')}, "
        f"{_human_bytes(sum(s['bytes'] for s in manifest['shards']))} in {out}\n"
        f"      encoder: {_encoder_words(manifest['encoder'])}\n"
        f"      {this_run}; skipped rows: {manifest['skipped_rows']}; cut to --max-tokens {manifest['render']['max_tokens']}: "
        f"{manifest['truncated_rows']}; total {run['seconds']:.1f} s{_startup_words(run)} (time per stage: {stats})"
    )


def _startup_words(run: dict) -> str:
    """Where the start-up went (builds that encoded something): the part of the wall time that is not encoding."""
    startup = run.get("startup")
    if not startup or not run["encoded_rows"]:
        return ""
    return (f", of which start-up {startup['rows_and_ray_s']:.1f} s reading and checking rows ({startup['rows_s']:.1f} s) "
            f"while Ray started ({startup['ray_s']:.1f} s), {startup['first_rows_s']:.1f} s until the first encoded rows")


@app.command()
def show(
    text: str = typer.Argument(..., help="the text to render"),
    output: Path = typer.Option(Path("line.png"), "-o", "--output"),
    token_px: int = typer.Option(32, help="encoder token size in px (32 for Qwen3-VL, 28 for Qwen2/2.5-VL)"),
    height: Optional[int] = typer.Option(RENDER.height),
    font_size: int = typer.Option(RENDER.font_size),
    padding: int = typer.Option(RENDER.padding),
    font: Optional[str] = typer.Option(RENDER.font_path),
    thought_tags: bool = typer.Option(RENDER.thought_tags),
    grid: bool = typer.Option(False, help="draw the token boundaries in red"),
) -> None:
    """Write one rendered line as a PNG, for a person to look at."""
    import numpy as np
    from PIL import Image

    from rot_vision.render import render_line

    try:
        pixels = render_line(text, _render_settings(height, font_size, padding, font, thought_tags), token_px)
    except ValueError as error:
        _fail(str(error))
    image = Image.fromarray(pixels).convert("RGB")
    if grid:
        rgb = np.array(image)
        rgb[:, ::token_px] = (255, 0, 0)
        image = Image.fromarray(rgb)
    image.save(output)
    typer.echo(f"wrote {output}: {pixels.shape[1]}x{pixels.shape[0]} px = {_count(pixels.shape[1] // token_px, 'token')} of {token_px} px")


@app.command()
def read(
    images: list[Path] = typer.Argument(None, help="PNG files of rendered lines (any height is scaled to one 32 px token row)"),
    text: Optional[str] = typer.Option(None, help="render this text with the build's settings and read it back"),
    model: str = typer.Option(registry.ANCHOR, help="a Qwen3-VL checkpoint (folder or hub id); 'anchor' = the shipped pretrained one"),
) -> None:
    """Transcribe rendered lines with the VLM's tower and language model (no text is given to it)."""
    import numpy as np
    from PIL import Image

    from rot_vision import read as reader
    from rot_vision.render import render_line

    if not images and text is None:
        _fail("give PNG files to read, or --text to render and read back")
    lines, names = [], []
    for path in images or []:
        if not path.exists():
            _fail(f"{path} does not exist")
        grey = Image.open(path).convert("L")
        width = max(32, round(grey.width * 32 / grey.height / 32) * 32)  # one token row, whole tokens
        lines.append(np.asarray(grey.resize((width, 32), Image.BILINEAR), dtype=np.uint8))
        names.append(str(path))
    if text is not None:
        lines.append(render_line(text, RENDER, 32))
        names.append("--text")
    try:
        vlm, tokenizer = reader.load(model)
    except (FileNotFoundError, OSError) as error:
        _fail(str(error))
    reader.prepare_tower(vlm)
    import torch

    with torch.no_grad():
        transcripts = reader.transcribe(vlm, tokenizer, reader.embed_images(vlm, lines))
    for name, transcript in zip(names, transcripts):
        typer.echo(f"{name}: {' '.join(transcript.splitlines())}")  # one line per image, whatever the model wrote


@app.command()
def inspect(
    folder: Path = typer.Argument(..., help="a shard folder written by rot-render build"),
    read: Optional[int] = typer.Option(None, "--read", help="also transcribe this many random rows' stored embeddings and score them against their CoT"),
    reader: Optional[str] = typer.Option(None, help="the VLM that reads them (default: the encoder that built the set, e.g. anchor)"),
    seed: int = typer.Option(0, help="which rows --read draws"),
) -> None:
    """Verify every shard's checksum against the manifest and print the summary (--read N: and read N rows back)."""
    problems = shards.verify(folder)
    if problems:
        for problem in problems:
            typer.secho(f"error: {problem}", fg="red", err=True)
        raise typer.Exit(1)
    if read is not None and read < 1:
        _fail(f"--read {read}: give the number of rows to read back, at least 1")
    manifest = shards.read_manifest(folder)
    try:
        typer.echo(_inspect_summary(folder, manifest))
    except (KeyError, TypeError, ValueError) as error:
        _fail(f"{folder / shards.MANIFEST} lacks or garbles the field {error}; re-run the rot-render build command with --overwrite")
    if read is not None:
        from rot_render.readcheck import read_shards

        try:
            scores = read_shards(folder, read, reader, seed)
        except (ValueError, OSError) as error:
            _fail(str(error).splitlines()[0])
        for example in scores["examples"]:
            typer.echo(f"  {example['id']}\n    drawn: {example['truth'][:160]}\n    read:  {example['read'][:160]}")
        typer.echo(f"  read back {_count(scores['rows'], 'row')} with {scores['reader']}: "
                   f"{100 * scores['char_accuracy']:.2f}% of {scores['characters']} characters, "
                   f"{100 * scores['line_accuracy']:.1f}% of lines exact")


def _inspect_summary(folder: Path, manifest: dict) -> str:
    encoder = manifest["encoder"]
    lengths = [s["tokens"] / max(1, s["rows"]) for s in manifest["shards"]]
    return (
        f"{folder}: OK, {_count(len(manifest['shards']), 'shard')} verified\n"
        f"  dataset   {manifest['dataset']['source']} [{manifest['dataset']['split']}]: {_count(manifest['rows'], 'row')}, "
        f"{manifest['skipped_rows']} skipped, {manifest.get('truncated_rows', 0)} cut to --max-tokens\n"
        f"  tokens    {manifest['tokens']} ({manifest['tokens'] / max(1, manifest['rows']):.1f} per row; "
        f"per-shard mean {min(lengths):.1f}-{max(lengths):.1f})\n"
        f"  embedding dim {manifest['embedding']['dim']}, stored {manifest['embedding']['dtype']}\n"
        f"  encoder   {encoder['name']} ({encoder['model_type']}{', UNTRAINED' if encoder['untrained'] else ''}), "
        f"weights {encoder['weights_sha256'][:12]}, {encoder['attn_implementation']}, {encoder['compute_dtype']}\n"
        f"  render    {manifest['render']}\n"
        f"  size      {_human_bytes(sum(s['bytes'] for s in manifest['shards']))}"
    )


@app.command()
def multiplication(
    n: int = typer.Option(..., help="operand digits: 4 for 4x4"),
    count: int = typer.Option(..., help="distinct questions to write"),
    out: Path = typer.Option(..., help="a .txt file in the implicit-CoT format (question||cot #### answer), for build --dataset"),
    exclude: list[Path] = typer.Option([], help="implicit-CoT files whose questions must not appear (the valid and test sets)"),
    seed: int = typer.Option(0),
) -> None:
    """Write a training file of n x n multiplications (long-multiplication CoT), none of them an excluded question."""
    from rot_data.multiplication import excluded_questions, generate

    missing = [str(p) for p in exclude if not p.exists()]
    if missing:
        _fail(f"--exclude {missing[0]} does not exist")
    excluded = excluded_questions(exclude)
    try:
        lines = generate(n, count, seed, excluded)
    except ValueError as error:
        _fail(str(error))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    typer.echo(f"wrote {out}: {count} {n}x{n} lines (seed {seed}), none of the {len(excluded)} excluded questions")


if __name__ == "__main__":
    app()

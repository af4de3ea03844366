"""Evaluate an export on a benchmark: per-example predictions (JSONL) and a summary (JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from rot_data.records import load_records
from rot_eval import MAX_ANSWER_TOKENS
from rot_eval.answers import final_segment, is_correct
from rot_model.export import latent_budget, latent_merge
from rot_eval.generate import generate_rot, generate_text, load_for_inference, timed


def check_positions(model, tokenizer, questions: list[str], new_positions: int, what: str) -> None:
    """Refuse, before decoding, a budget the backbone has no positions for (it would run on for minutes, then fail)."""
    lm = model.lm if hasattr(model, "lm") else model
    config = getattr(lm.config, "text_config", lm.config)
    limit = getattr(config, "max_position_embeddings", None)
    longest = max(len(tokenizer(question, add_special_tokens=False)["input_ids"]) for question in questions) + 16  # chat turn
    if limit and longest + new_positions > limit:
        raise ValueError(f"{what} asks for {new_positions} positions after the longest question's {longest}, more than the "
                         f"backbone's max_position_embeddings {limit}: keep them within {limit - longest} in all")


def evaluate(checkpoint: str, dataset: str, out: Path, split: str = "test", data_dir: Path | None = None,
             latents: int | None = None, dynamic_threshold: float | None = None, batch_size: int = 64,
             max_answer_tokens: int = MAX_ANSWER_TOKENS, max_cot_tokens: int = 256, limit: int | None = None,
             device: str | None = None, control: str | None = None, truth_shards: Path | None = None,
             learned_stop: bool = False, oracle_latents: bool = False) -> dict:
    """``control``: replace the latents by ``zeros``, by another question's (``shuffled``: the batch's latents
    rolled by one row) or by the ``truth`` (the visual embeddings of the question's rendered CoT, read from
    ``truth_shards``, a shard set of the evaluated split built with the training encoder)."""
    for flag, value in (("--limit", limit), ("--batch-size", batch_size), ("--max-answer-tokens", max_answer_tokens),
                        ("--max-cot-tokens", max_cot_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: use at least 1" + (" (leave it out for every row)" if flag == "--limit" else ""))
    if dynamic_threshold is not None and learned_stop:
        raise ValueError("--dynamic-threshold and --learned-stop are two ways to end the latents: pass one of them")
    if control not in CONTROLS:
        raise ValueError(f"--control {control}: use one of {', '.join(c for c in CONTROLS if c)}")
    if oracle_latents and (truth_shards is None or control or dynamic_threshold is not None or learned_stop):
        raise ValueError("--oracle-latents gives each question its own CoT's visual-token count as its budget: it needs "
                         "--truth-shards (a shard set of the evaluated split) and no --control, --dynamic-threshold or --learned-stop")
    if control == "truth" and truth_shards is None:
        raise ValueError("--control truth needs --truth-shards: a shard set of the evaluated split (rot-render build --split ...)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tokenizer, config = load_for_inference(checkpoint, device=device, dtype=dtype)
    latents = latent_budget(config, latents)
    records, _ = load_records(dataset, split, data_dir=data_dir, require_cot=False)
    records = records[:limit] if limit is not None else records
    mode = config.get("mode", "rot")
    thinking = {"rot": (latents, "--latents"), "sft-cot": (max_cot_tokens, "--max-cot-tokens")}.get(mode, (0, ""))
    check_positions(model, tokenizer, [r.question for r in records], thinking[0] + max_answer_tokens + 2, f"{thinking[1]} + answer tokens".strip(" +"))
    if control and mode != "rot":
        raise ValueError(f"--control applies to RoT exports; {checkpoint} is an {mode} baseline")
    truth = truth_embeddings(truth_shards, latent_merge(config)) if control == "truth" or oracle_latents else None
    if oracle_latents and truth:
        check_positions(model, tokenizer, [r.question for r in records], max(map(len, truth.values())) + max_answer_tokens + 2,
                        "--oracle-latents + answer tokens")
    out.mkdir(parents=True, exist_ok=True)
    correct, reasoning_tokens, seconds, by_position = 0, 0, 0.0, []
    with open(out / "predictions.jsonl", "w") as predictions:
        for start in tqdm(range(0, len(records), batch_size), desc=f"eval {dataset}", unit="batch"):
            batch = records[start:start + batch_size]
            questions = [r.question for r in batch]
            if mode == "rot":
                given = _control_latents(control, model, tokenizer, questions, latents, truth) if control else None
                budget = oracle_budgets(questions, truth) if oracle_latents else latents
                results, elapsed = timed(generate_rot, model, tokenizer, questions, latents=budget,
                                         dynamic_threshold=dynamic_threshold, max_answer_tokens=max_answer_tokens,
                                         given_latents=given, learned_stop=learned_stop)
            else:
                results, elapsed = timed(generate_text, model, tokenizer, questions, max_new_tokens=max_cot_tokens)
            seconds += elapsed
            for record, result in zip(batch, results):
                ok, extracted = is_correct(result.text, record.answer), final_segment(result.text)
                n_reasoning = len(result.latents) if mode == "rot" else _cot_tokens(tokenizer, result.text, mode)
                correct += ok
                for position, (want, got) in enumerate(_aligned(record.answer, extracted)):
                    if position == len(by_position):
                        by_position.append([0, 0])
                    by_position[position][0] += want == got
                    by_position[position][1] += 1
                reasoning_tokens += n_reasoning
                predictions.write(json.dumps({
                    "id": record.id, "question": record.question, "gold": record.answer, "prediction": result.text,
                    "extracted": extracted, "correct": ok,
                    ("latents" if mode == "rot" else "cot_tokens"): n_reasoning, "seconds": elapsed / len(batch),
                }) + "\n")
    summary = {
        "checkpoint": str(checkpoint), "method": {"rot": "RoT", "sft-cot": "SFT with CoT", "sft-nocot": "SFT without CoT"}[mode],
        "dataset": dataset, "split": split, "examples": len(records), "accuracy": correct / len(records),
        "accuracy_95ci": wilson_interval(correct, len(records)),
        # per answer token (multiplication: digits, least significant first): where a wrong answer goes wrong
        "per_answer_token": [ok / total for ok, total in by_position],
        "mean_reasoning_tokens": reasoning_tokens / len(records), "seconds_per_sample": seconds / len(records),
        "samples_per_s": len(records) / seconds if seconds else 0.0, "batch_size": batch_size, "device": device,
        "latents": latents if mode == "rot" else None, "dynamic_threshold": dynamic_threshold,
        "learned_stop": learned_stop, "oracle_latents": oracle_latents, "control": control,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


CONTROLS = (None, "zeros", "shuffled", "truth")


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of an accuracy (sound at 0% and 100%, unlike p +- 1.96 sd)."""
    if trials == 0:
        return [0.0, 1.0]
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * ((p * (1 - p) / trials + z * z / (4 * trials * trials)) ** 0.5) / (1 + z * z / trials)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _aligned(gold: str, predicted: str) -> list[tuple[str, str | None]]:
    """Gold and predicted answer tokens (split on spaces) side by side; a missing predicted token is None."""
    got = predicted.split()
    return [(want, got[i] if i < len(got) else None) for i, want in enumerate(gold.split())]


def truth_embeddings(folder: Path, merge: int) -> dict[str, torch.Tensor]:
    """question -> the latents its rendered CoT's stored visual embeddings stand for (merged as the export trained)."""
    from rot_model.batches import merged
    from rot_model.shard_stream import ShardSet

    shard_set = ShardSet.open(folder)
    return {row["question"]: merged(shard_set.embedding(row), merge) for shard in range(len(shard_set.manifest["shards"]))
            for row in shard_set.read_rows(shard)}


def _control_latents(control, model, tokenizer, questions, latents, truth) -> torch.Tensor:
    device = next(model.parameters()).device
    if control == "zeros":
        return torch.zeros(len(questions), latents, model.head.fc_out.out_features, device=device)
    if control == "shuffled":
        own = generate_rot(model, tokenizer, questions, latents=latents, max_answer_tokens=1)
        return torch.stack([g.latents for g in own]).roll(1, dims=0).to(device)
    true = _truth_of(questions, truth)  # (``latents`` above is the budget, a number)
    lengths = {len(t) for t in true}
    if len(lengths) > 1:
        raise ValueError(f"--control truth needs CoTs of one length per batch (got {sorted(lengths)} visual tokens); use --batch-size 1")
    return torch.stack(true).to(device)


def oracle_budgets(questions, truth) -> torch.Tensor:
    """Each question's own CoT length in latents (the oracle's budget; ``rot-eval stops --truth-shards``'s lengths)."""
    return torch.tensor([len(t) for t in _truth_of(questions, truth)])


def _truth_of(questions, truth) -> list[torch.Tensor]:
    """Each question's true latents from --truth-shards (a one-line error for a question they do not hold)."""
    missing = [q for q in questions if q not in truth]
    if missing:
        raise ValueError(f"--truth-shards has no row for the question {missing[0]!r}; build it from the evaluated split")
    return [truth[q] for q in questions]


def _cot_tokens(tokenizer, text: str, mode: str) -> int:
    """#L of the SFT baselines: tokens generated before the final answer marker."""
    if mode != "sft-cot":
        return 0
    return len(tokenizer(text.rsplit("####", 1)[0], add_special_tokens=False)["input_ids"])

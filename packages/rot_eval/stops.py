"""Where a stop would end each thought: the two signals a stop reads, at every latent step.

At step k (k latents written) ``generate_rot`` ends the thought when
- the paper's dynamic termination: the next latent it would write lies within ``--dynamic-threshold`` (mean squared
  distance) of ``<img_end>``'s embedding;
- the learned stop: the LM head gives ``<img_end>`` a probability above one half (a model trained with
  ``--stop-weight``).
Both are read here for a fixed number of steps, past the trained length, so a threshold can be chosen by looking: a
threshold stops every question at its length L exactly when it lies between the largest distance at its step L and
the smallest distance before it (the separating window). L is the export's budget (a fixed-length model), or each
question's own visual-token count (a mixed-length model: ``rot-eval stops --truth-shards``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rot_data.tokens import user_turn_ids
from rot_eval.generate import generate_rot


@torch.no_grad()
def stop_signals(model, tokenizer, questions: list[str], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[questions, steps] each: the distance of the latent step k would write to ``<img_end>``, and p(<img_end>) from
    the hidden state step k reads (the state after the question and k latents), with no stop in between."""
    generations = generate_rot(model, tokenizer, questions, latents=steps, max_answer_tokens=1)
    end = model.embed(torch.tensor([model.img_end_id]))[0].float()
    distances, end_probabilities = [], []
    for question, generation in zip(questions, generations):
        inputs = model.latent_inputs(generation.latents)  # [steps, d]: what each step feeds the LLM
        distances.append((inputs.float() - end).pow(2).mean(-1))
        prefix = model.embed(torch.tensor(user_turn_ids(tokenizer, question) + [model.img_begin_id]))
        sequence = torch.cat([prefix, inputs[:-1].to(prefix)])[None]  # one row, unpadded: positions 0..n-1
        hidden = model.decoder(inputs_embeds=sequence, use_cache=False).last_hidden_state[0, -steps:]
        end_probabilities.append(model.output_layer(hidden).float().softmax(-1)[:, model.img_end_id])
    return torch.stack(distances), torch.stack(end_probabilities)


def separating_window(distances: torch.Tensor, lengths: torch.Tensor) -> tuple[float, float]:
    """(low, high): every threshold in low < t <= high ends each question q after exactly ``lengths[q]`` latents
    (empty when low >= high: no single threshold does)."""
    at_length = distances.gather(1, lengths[:, None])
    before = torch.arange(distances.shape[1])[None] < lengths[:, None]
    return float(at_length.max()), float(distances[before].min())


def summarize(distances: torch.Tensor, end_probabilities: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Per step: the median and the 5th / 95th percentiles over the questions; the separating window at each
    question's length (``lengths``: the export's budget, or each question's own visual-token count)."""
    def bands(values):
        quantiles = torch.quantile(values, torch.tensor([0.05, 0.5, 0.95]), dim=0)
        return {name: [round(float(v), 6) for v in row] for name, row in zip(("p5", "median", "p95"), quantiles)}

    low, high = separating_window(distances, lengths)
    learned = (end_probabilities > 0.5).float()
    first = torch.where(learned.any(1), learned.argmax(1), torch.full((len(learned),), -1))
    return {"questions": len(distances), "steps": distances.shape[1], "lengths": sorted(set(lengths.tolist())),
            "distance_to_img_end": bands(distances), "p_img_end": bands(end_probabilities),
            "dynamic_window": {"low": round(low, 6), "high": round(high, 6), "separates": low < high},
            "learned_stop_at_length": round(float((first == lengths).float().mean()), 4)}


def draw(summary: dict, path: Path, title: str) -> Path:
    """Two panels over the latent steps: the distance to ``<img_end>`` (the dynamic threshold's signal, log scale)
    and p(<img_end>) (the learned stop's), each a median line in its 5-95% band, the questions' lengths marked."""
    from rot_eval.viz import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    steps = range(summary["steps"])
    for axis, key, label in zip(axes, ("distance_to_img_end", "p_img_end"),
                                ("mean squared distance to <img_end>", "p(<img_end>) from the LM head")):
        band = summary[key]
        axis.fill_between(steps, band["p5"], band["p95"], alpha=0.3, label="5-95% of questions")
        axis.plot(steps, band["median"], marker="o", markersize=2, label="median")
        for index, length in enumerate(summary["lengths"]):
            axis.axvline(length, color="black", linestyle="--", linewidth=1, label=None if index else "CoT length")
        axis.set(xlabel="latents written (k)", ylabel=label)
        axis.legend(fontsize=7)
    axes[0].set_yscale("log")
    window = summary["dynamic_window"]
    if window["separates"]:
        axes[0].axhspan(window["low"], window["high"], color="green", alpha=0.15)
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(figure, path, plt)


def write(summary: dict, out: Path, title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "stops.json").write_text(json.dumps(summary, indent=1))
    return [out / "stops.json", draw(summary, out / "stops.png", title)]

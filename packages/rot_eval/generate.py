"""Inference: batched latent reasoning then greedy answer decoding, one KV cache for both.

Every row of the batch moves one position per step and feeds one input embedding:
- latent phase: ``adapter(head(h))``, until the budget is reached, or earlier where a stop says so (at most
  ``latents`` of them): the paper's dynamic termination (``dynamic_threshold``: the predicted latent is within that
  mean squared distance of ``<img_end>``'s embedding) or the learned stop (``learned_stop``: the LM head gives
  ``<img_end>`` a probability above one half, as a model trained with ``--stop-weight`` learned to);
- then ``<img_end>``;
- then the greedy token from the previous step's logits, until end-of-turn or ``max_answer_tokens``.
Rows may switch phase at different steps (dynamic termination); left padding and position ids
keep each row identical to decoding it alone. Decoding runs on the model's static-cache engines (``rot_model.decoding``), the
text baselines too; the host asks the device whether every row has finished only every ``CHECK_EVERY`` steps
(steps run after a row finished change nothing it returns). ``use_cache=False`` re-runs the whole sequence at
every step, as the official code does; it is kept as the reference the tests compare against.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from rot_eval import MAX_ANSWER_TOKENS
from rot_model.decoding import bucketed
from rot_data.tokens import user_turn_ids
from rot_model.batches import pad, pad_token_id
from rot_model.export import DEFAULT_INFERENCE_LATENTS, load_export
from rot_model.fused import FUSED_MODEL_TYPES, fuse_projections

CHECK_EVERY = 8  # decode steps between the host's checks for finished rows (each check waits for the device)


@dataclass
class Generation:
    text: str
    latents: torch.Tensor  # [n_latents, latent_dim] as predicted (before the adapter)
    token_ids: list[int]  # generated answer (or CoT + answer) tokens, end-of-turn included

    @property
    def answer_tokens(self) -> int:
        return len(self.token_ids)


def load_for_inference(checkpoint, device="cpu", dtype=torch.float32):
    """``load_export`` with a LoRA adapter merged into the weights (each decode step then reads every weight once, with
    no adapter matmuls beside the base ones; the same outputs up to rounding), and each layer's q/k/v and gate/up
    projections fused into one product each where the backbone is one ``rot_model.fused`` knows (the same numbers, a
    faster batch-1 step)."""
    model, tokenizer, config = load_export(checkpoint, device=device, dtype=dtype)
    if hasattr(model.lm, "merge_and_unload"):
        model.lm = model.lm.merge_and_unload()
    if model.lm.config.model_type in FUSED_MODEL_TYPES:
        fuse_projections(model.decoder)  # new weights: an engine made before would not be reused (its key)
    return model, tokenizer, config


@torch.no_grad()
def generate_rot(model, tokenizer, questions: list[str], latents: int | torch.Tensor = DEFAULT_INFERENCE_LATENTS, dynamic_threshold: float | None = None,
                 max_answer_tokens: int = MAX_ANSWER_TOKENS, use_cache: bool = True, stop_at_eos: bool = True,
                 given_latents: torch.Tensor | None = None, learned_stop: bool = False) -> list[Generation]:
    """``given_latents`` [B, n, latent_dim]: feed these instead of the model's own (the controls: zeros, another
    question's latents, the true visual embeddings); the budget is then ``n``. ``learned_stop``: end each row's
    latents where the LM head gives <img_end> a probability above one half (at most ``latents``). ``latents`` may be a
    tensor of one budget per question (the oracle of a stop: each question's own visual-token count)."""
    model.eval()
    if dynamic_threshold is not None and learned_stop:
        raise ValueError("--dynamic-threshold and --learned-stop are two ways to end the latents: pass one of them")
    if given_latents is not None:
        latents, dynamic_threshold, learned_stop = given_latents.shape[1], None, False
    device = next(model.parameters()).device
    budget = latents  # one budget for every row, or one per row (the oracle: each question's own visual-token count)
    if torch.is_tensor(latents):
        budget, latents = latents.to(device), int(latents.max())
    pad_id = pad_token_id(tokenizer)
    prefix_ids, mask = pad([user_turn_ids(tokenizer, q) + [model.img_begin_id] for q in questions], pad_id, left=True)
    prefix_ids, mask = bucketed(prefix_ids.to(device), mask.to(device), pad_id)
    rows = len(questions)
    embed_end = model.embed(torch.tensor([model.img_end_id], device=device))  # [1, d]
    last_step = latents + max_answer_tokens
    inputs = model.embed(prefix_ids)
    if use_cache:
        engine = model.engines.get(model.decoder, rows, prefix_ids.shape[1] + last_step + 1)
        hidden = engine.prefill(inputs, mask)
    else:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions,
                               use_cache=False).last_hidden_state[:, -1]
        position = positions[:, -1]

    in_latent = torch.ones(rows, dtype=torch.bool, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    latent_count = torch.zeros(rows, dtype=torch.long, device=device)
    answer_count = torch.zeros(rows, dtype=torch.long, device=device)
    # per step, kept on the device and read once at the end (no host sync per row per step)
    step_latents, step_emitted, step_tokens, step_answered = [], [], [], []
    # with a fixed budget every row reasons for exactly `latents` steps, so the host knows each step's phase
    # without asking the device; with dynamic termination it learns every CHECK_EVERY steps whether any row still
    # reasons (until then the head runs for every row; rows past their latents ignore it)
    phases_known = dynamic_threshold is None and not learned_stop and not torch.is_tensor(budget)
    maybe_latent = True
    for step in range(last_step + 1):
        # only compute what some row needs: the head in the latent phase, the vocabulary logits after it
        some_latent = step <= latents if phases_known else maybe_latent
        predicted = model.head(hidden) if some_latent else None
        if predicted is not None and given_latents is not None and step < latents:
            predicted = given_latents[:, step].to(predicted)
        latent_input = model.latent_inputs(predicted) if predicted is not None else None
        close = torch.zeros_like(in_latent)
        if dynamic_threshold is not None and latent_input is not None:
            close = (latent_input.float() - embed_end.float()).pow(2).mean(-1) < dynamic_threshold
        some_answering = step > latents if phases_known else step > 0
        logits = model.output_layer(hidden) if some_answering or (learned_stop and some_latent) else None  # once a step
        if learned_stop and some_latent:  # p(<img_end>) > 1/2 from the hidden state that would predict the next latent
            close = logits.float().log_softmax(-1)[:, model.img_end_id] > math.log(0.5)
        end_now = in_latent & ((latent_count >= budget) | close)
        emit_latent = in_latent & ~end_now
        answering = ~in_latent & ~finished
        token = logits.argmax(-1) if some_answering else torch.zeros_like(latent_count)
        step_inputs = model.embed(torch.where(answering, token, torch.full_like(token, model.img_end_id)))
        if latent_input is not None:
            step_inputs = torch.where(emit_latent[:, None], latent_input, step_inputs)
        if predicted is not None:
            step_latents.append(predicted)
            step_emitted.append(emit_latent)
        step_tokens.append(token)
        step_answered.append(answering)
        answer_count += answering.long()
        if stop_at_eos:
            finished |= answering & (token == tokenizer.eos_token_id)
        finished |= answering & (answer_count >= max_answer_tokens)
        latent_count += emit_latent.long()
        in_latent &= ~end_now
        if step == last_step:
            break
        if step % CHECK_EVERY == CHECK_EVERY - 1:
            if not phases_known:
                maybe_latent = bool(in_latent.any())
            if (stop_at_eos or not phases_known) and bool(finished.all()):
                break
        if use_cache:
            hidden = engine.step(step_inputs)
        else:
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            position = position + 1
            inputs = torch.cat([inputs, step_inputs[:, None]], dim=1)
            positions = torch.cat([positions, position[:, None]], dim=1)
            hidden = model.decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions,
                                   use_cache=False).last_hidden_state[:, -1]
    latent_dim = model.head.fc_out.out_features
    latents_by_step = torch.stack(step_latents).float().cpu() if step_latents else torch.zeros(0, rows, latent_dim)
    emitted = torch.stack(step_emitted).cpu() if step_emitted else torch.zeros(0, rows, dtype=torch.bool)
    tokens, answered = torch.stack(step_tokens).cpu(), torch.stack(step_answered).cpu()
    # per row: a view of its steps and a mask over them (one [steps, rows, d] gather per row costs milliseconds each,
    # most of a large evaluation batch's time on a many-core host)
    latents_by_row, emitted_by_row = latents_by_step.transpose(0, 1), emitted.T
    results = []
    for i, (row_tokens, row_answered) in enumerate(zip(tokens.T.tolist(), answered.T.tolist())):
        answer_ids = [t for t, a in zip(row_tokens, row_answered) if a]
        text = tokenizer.decode([t for t in answer_ids if t != tokenizer.eos_token_id], skip_special_tokens=True).strip()
        results.append(Generation(text, latents_by_row[i][emitted_by_row[i]], answer_ids))
    return results


@torch.no_grad()
def generate_text(model, tokenizer, questions: list[str], max_new_tokens: int = 256, stop_at_eos: bool = True) -> list[Generation]:
    """Greedy text decoding for the SFT baselines (CoT or no CoT) on the same engine as RoT's latents
    (``stop_at_eos=False``: always ``max_new_tokens`` steps, for benchmarks)."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    ids, mask = pad([user_turn_ids(tokenizer, q) for q in questions], pad_id, left=True)
    ids, mask = bucketed(ids.to(device), mask.to(device), pad_id)
    engine = model.engines.get(model.decoder, len(questions), ids.shape[1] + max_new_tokens)
    hidden = engine.prefill(model.embed(ids), mask)
    finished = torch.zeros(len(questions), dtype=torch.bool, device=device)
    step_tokens = []
    for step in range(max_new_tokens):
        token = model.output_layer(hidden).argmax(-1)
        step_tokens.append(token)
        finished |= token == tokenizer.eos_token_id
        if step == max_new_tokens - 1 or (stop_at_eos and step % CHECK_EVERY == CHECK_EVERY - 1 and bool(finished.all())):
            break
        hidden = engine.step(model.embed(token))
    results = []
    for row in torch.stack(step_tokens, 1).tolist():
        if stop_at_eos and tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id) + 1]
        text = tokenizer.decode([t for t in row if t != tokenizer.eos_token_id], skip_special_tokens=True)
        results.append(Generation(text.strip(), torch.zeros(0), row))
    return results


def timed(function, *args, **kwargs):
    """(result, seconds), synchronising the GPU so the time covers the work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = function(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started

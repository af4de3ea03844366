"""Greedy generation from a VLM whose prompt may hold visual tokens: images, or any [n, d] rows put in their place.

The layout is the one RoT uses: visual rows sit where ``<|image_pad|>`` placeholders are, and every
position (text or visual) takes the next 1-D position, as in the RoT trainer and at RoT inference.
So the same function transcribes a rendered line (``rot-render read``), answers from the true CoT
image (the anchor's upper-bound figure) and reads a RoT model's generated latents back as text.
"""

from __future__ import annotations

import numpy as np
import torch

from rot_data import registry
from rot_data.tokens import IMAGE_PAD, IMG_BEGIN, IMG_END, user_turn_ids
from rot_data.transformers_compat import cache_arg, merged_visual_tokens, output_cache


def load(name: str = registry.ANCHOR, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(Qwen3-VL model, tokenizer) of a checkpoint name or folder ('anchor' is the shipped one)."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
    from transformers.utils import logging

    from rot_data.hub import MODEL_FILES, snapshot

    logging.disable_progress_bar()  # a bar for loading 11 M parameters is noise
    folder = snapshot(registry.resolve(name), "the VLM", MODEL_FILES)
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def prepare_tower(model) -> None:
    """The build's tower settings: packed attention over the whole pack, the patch embedding as a GEMM."""
    from rot_vision.tower import use_linear_patch_embedding
    from rot_vision.packed_attention import NAME, register

    register()
    model.model.visual.config._attn_implementation_internal = NAME
    use_linear_patch_embedding(model.model.visual.patch_embed)


def embed_lines(model, patches: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """uint8 patches of packed one-line images [sum n_i*4, p*p] -> visual tokens [sum n_i, d] (post-merger)."""
    from rot_vision.tower import QWEN3_VL_PATCHIFIER, grid_thw_for

    tower = model.model.visual
    device = next(tower.parameters()).device
    pixels = QWEN3_VL_PATCHIFIER.normalise(patches.to(device)).to(next(tower.parameters()).dtype)
    output = tower(pixels, grid_thw=grid_thw_for(tower, grids, device))
    return merged_visual_tokens(output)


def embed_images(model, images: list[np.ndarray]) -> list[torch.Tensor]:
    """Rendered grey lines [32, W] -> one [W/32, d] tensor of visual tokens each, in one packed tower call."""
    from rot_vision.tower import QWEN3_VL_PATCHIFIER

    patches, grids = zip(*(QWEN3_VL_PATCHIFIER.grey_patches(image) for image in images))
    merged = embed_lines(model, torch.from_numpy(np.concatenate(patches)), torch.tensor(grids))
    return list(merged.split([h * w // 4 for _, h, w in grids]))


def _parts(model):
    """(token embedding, decoder returning hidden states, output layer) of a Qwen3-VL or a causal LM."""
    inner = model.model
    decoder = inner.language_model if hasattr(inner, "language_model") else inner
    return decoder.get_input_embeddings(), decoder, model.get_output_embeddings()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], visual: list[torch.Tensor | None], max_new_tokens: int,
             batch_size: int = 256) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids, ``<|image_pad|>`` marking the rows of ``visual``)."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        texts += _generate(model, tokenizer, prompts[start:start + batch_size], visual[start:start + batch_size], max_new_tokens)
    return texts


def _generate(model, tokenizer, prompts, visual, max_new_tokens):
    embed, decoder, head = _parts(model)
    device, pad_token = embed.weight.device, tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    rows = []
    for ids, rows_of_image in zip(prompts, visual):
        ids = torch.tensor(ids, device=device)
        row = embed(ids)
        if rows_of_image is not None:
            row = row.clone()
            row[ids == pad_token] = rows_of_image.to(device, row.dtype)
        rows.append(row)
    width = max(len(r) for r in rows)
    inputs = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, row in enumerate(rows):  # left padding: every row's newest position is the last column
        inputs[i, width - len(row):], mask[i, width - len(row):] = row, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output = decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, position = output_cache(output), positions[:, -1]
    token = head(output.last_hidden_state[:, -1]).argmax(-1)
    tokens, finished = [token], token == tokenizer.eos_token_id
    for _ in range(max_new_tokens - 1):
        if bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        position = position + 1
        output = decoder(inputs_embeds=embed(token)[:, None], attention_mask=mask, position_ids=position[:, None],
                         use_cache=True, **cache_arg(decoder, cache))
        cache = output_cache(output)
        token = head(output.last_hidden_state[:, -1]).argmax(-1)
        tokens.append(token)
        finished |= token == tokenizer.eos_token_id
    texts = []
    for row in torch.stack(tokens, 1).tolist():
        row = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def reading_prompt(tokenizer, n_visual: int) -> list[int]:
    """The OCR turn: ``<img_begin>`` n placeholders ``<img_end>`` as the user's message, then the assistant prompt."""
    return user_turn_ids(tokenizer, IMG_BEGIN + IMAGE_PAD * n_visual + IMG_END)


def transcribe(model, tokenizer, visual: list[torch.Tensor], max_new_tokens: int = 400, batch_size: int = 256) -> list[str]:
    """The text the model reads in each sequence of visual tokens (an image's, or a RoT model's latents)."""
    prompts = [reading_prompt(tokenizer, len(v)) for v in visual]
    return generate(model, tokenizer, prompts, visual, max_new_tokens, batch_size)


def answer_prompt(tokenizer, question: str, n_visual: int) -> list[int]:
    """RoT's layout with visual rows in the latents' place: question, ``<img_begin>`` rows ``<img_end>``."""
    return user_turn_ids(tokenizer, question) + tokenizer.convert_tokens_to_ids([IMG_BEGIN] + [IMAGE_PAD] * n_visual + [IMG_END])

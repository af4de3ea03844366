"""Where transformers versions differ, in one place: the code must run on 5.17 (the GPU image) and on the newer one
installed here. Each function names the versions it bridges, so it can go when the older one does."""

from __future__ import annotations

import functools
import inspect


def cache_arg(decoder, cache) -> dict:
    """``{keyword: cache}`` for a decoder's forward: transformers renamed ``past_key_values`` to ``cache`` (5.24
    warns on the old name, which goes in 5.40; 5.17 knows only the old one)."""
    return {_cache_keyword(type(decoder)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(decoder_class) -> str:
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a decoder returned with ``use_cache=True`` (``cache`` from 5.24, ``past_key_values`` before)."""
    cache = output.get("cache")
    return cache if cache is not None else output.past_key_values


def checkpoint_activations(model) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant): newer transformers call it
    activation checkpointing and warn at the older name, which 5.17 (the GPU image's) still needs."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def stop_checkpointing_activations(model) -> None:
    """Undo ``checkpoint_activations`` (the same two names)."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


def merged_visual_tokens(output):
    """The post-merger visual tokens [n, d] of a Qwen-VL tower's forward: ``pooler_output`` of the output object newer
    transformers return; older ones return the tensor itself or a tuple (merged, deepstack features)."""
    merged = output.pooler_output if hasattr(output, "pooler_output") else output
    return merged[0] if isinstance(merged, (tuple, list)) else merged


def tower_reads_grid_on_host(tower) -> bool:
    """Whether the tower reads ``grid_thw`` element by element in Python (5.17: on a CUDA tensor every read is a GPU
    sync, so it should get a CPU tensor); newer ones (5.24) build device tensors from it."""
    return hasattr(tower, "rot_pos_emb")

"""The decoding engine: one static KV cache sized for the whole answer, updated in place.

A Hugging Face dynamic cache grows by one position per step, and the attention mask with it, so every decode step
has new shapes and allocates. Here the cache (``transformers.StaticCache``), the attention mask, the positions and
the write index are allocated once for prefix + latents + answer and changed in place: every step after the prefill
runs the same kernels on the same buffers, so on a GPU the step is captured once as a CUDA graph and replayed: one
launch per step instead of hundreds of small kernels launched from Python (as the trainer's rollout does,
``rot_train.model.RolloutGraphs``). The step's attention mask is passed as a 4-D tensor, which Hugging Face models
take as it is, so nothing reads a device value on the host during capture. RoT's latents and the text baselines' tokens go through the same ``step``, so their
speeds compare latents with tokens, not one engine with another. Prompts are left-padded up to a multiple of
``PREFILL_BUCKET`` so that a few prefill shapes serve every batch.
"""

from __future__ import annotations

import warnings

import torch

from rot_anchor.model import cache_arg

PREFILL_BUCKET = 16  # prompts are left-padded to a multiple of this: few distinct prefill shapes
KEEP_ENGINES = 2  # engines (each a KV cache and, on a GPU, a captured graph) kept for reuse by later batches
_engines: dict = {}


def bucketed(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad (ids, mask) to the next multiple of PREFILL_BUCKET columns (padding is masked: outputs unchanged)."""
    extra = -ids.shape[1] % PREFILL_BUCKET
    if not extra:
        return ids, mask
    return (torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1),
            torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1))


def engine_for(decoder, rows: int, max_len: int) -> "StaticDecoder":
    """A StaticDecoder of this shape, reused by later calls of the same shape (an evaluation's batches, a benchmark's
    repeats), so its cache is allocated and its step captured once. The key holds the weights' address: a model
    loaded or moved elsewhere gets a new engine."""
    key = (id(decoder), rows, max_len, next(decoder.parameters()).data_ptr())
    if key not in _engines:
        _engines[key] = StaticDecoder(decoder, rows, max_len)
        while len(_engines) > KEEP_ENGINES:
            _engines.pop(next(iter(_engines)))
    return _engines[key]


class StaticDecoder:
    """Decode ``rows`` sequences of at most ``max_len`` positions with one static KV cache.

    ``prefill(inputs, mask)`` runs the left-padded prompt and returns each row's last hidden state; each
    ``step(inputs)`` appends one input embedding per row and returns the new hidden states [rows, d].
    """

    def __init__(self, decoder, rows: int, max_len: int):
        from transformers import StaticCache

        weight = next(decoder.parameters())
        self.decoder, self.max_len = decoder, max_len
        self.cache = StaticCache(config=decoder.config, max_cache_len=max_len)
        self.mask = torch.zeros(rows, max_len, dtype=torch.long, device=weight.device)
        self.position = torch.zeros(rows, dtype=torch.long, device=weight.device)  # each row's last position id
        self.write_at = torch.zeros(1, dtype=torch.long, device=weight.device)  # the cache slot the next step fills
        self.graphs = weight.is_cuda  # capture the step as a CUDA graph (GPU only)
        self.graph, self.graph_inputs, self.graph_hidden = None, None, None

    def prefill(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = inputs.shape[1]
        if length >= self.max_len:
            raise ValueError(f"a prompt of {length} positions does not fit a cache of {self.max_len}")
        self.cache.reset()  # a reused engine: the cache counts its own write position from zero again
        self.mask.zero_()
        self.mask[:, :length] = mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        output = self.decoder(inputs_embeds=inputs, attention_mask=self.mask, position_ids=positions,
                              cache_position=torch.arange(length, device=inputs.device), **cache_arg(self.decoder, self.cache),
                              use_cache=True)
        self.position.copy_(positions[:, -1])
        self.write_at.fill_(length)
        return output.last_hidden_state[:, -1]

    def step(self, inputs: torch.Tensor) -> torch.Tensor:
        """One position for every row: ``inputs`` [rows, d] -> hidden states [rows, d] (on the device; no host sync)."""
        if self.graph is not None:
            self.graph_inputs.copy_(inputs)
            self.graph.replay()
            return self.graph_hidden.clone()
        if not self.graphs:
            return self._step(inputs)
        side = torch.cuda.Stream()  # the first step runs eagerly on a side stream: the warm-up capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            hidden = self._step(inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._capture(inputs)
        return hidden

    def _step(self, inputs: torch.Tensor) -> torch.Tensor:
        self.mask.index_fill_(1, self.write_at, 1)
        self.position.add_(1)
        visible = self.mask.bool()[:, None, None, :]  # [rows, 1, query 1, max_len]: the slots written so far
        output = self.decoder(inputs_embeds=inputs[:, None], attention_mask=visible, position_ids=self.position[:, None],
                              cache_position=self.write_at, use_cache=True, **cache_arg(self.decoder, self.cache))
        self.write_at.add_(1)
        return output.last_hidden_state[:, -1]

    def _capture(self, inputs: torch.Tensor) -> None:
        """Record ``_step`` as a CUDA graph for the later steps (recording runs nothing: the state is untouched)."""
        self.graph_inputs = inputs.clone()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.graph_hidden = self._step(self.graph_inputs)
            self.graph = graph
        except Exception as error:  # capture is best effort: the eager step gives the same numbers
            warnings.warn(f"decode step not captured as a CUDA graph ({type(error).__name__}: {error}); running it eagerly")
            self.graphs, self.graph = False, None
            torch.cuda.synchronize()

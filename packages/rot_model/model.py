"""The RoT model: a causal LM, a projection head that turns its hidden state into the next visual
latent, and (when shard and LLM sizes differ) an adapter that maps latents back to the LLM's input size.

Sequence: ``[question] <img_begin> v_1 ... v_N <img_end> [answer]`` with
``v_i = head(h_{i-1})``, ``h`` the LLM's last hidden state, fed back (detached) as the next input.

Training is batched:
1. ``rollout_hidden``: under ``no_grad``, prefill the questions and roll out the latents on the decoding engine
   (``rot_model.decoding``: a static KV cache), the whole batch at once. No autograd graph is built here. With
   graphs on (``engines.graphs``: the trainer's ``--rollout graphs``, its default on a GPU under ZeRO-2) each step is replayed
   from a CUDA graph: a small model's rollout is otherwise bound by launching some 1 800 kernels per latent from Python.
2. one teacher-forced pass over the whole sequence with the rolled-out latents in place, for the
   LM loss on ``<img_end>`` + answer (and, in Stage II, an optional vision loss).
In Stage I the vision loss is ``head(h)`` against the target embeddings with ``h`` from pass 1,
and the LM loss reaches the head through the latents placed in pass 2.

Stage II, ``latent_gradient="official"`` (the default): the official forward rolls out with gradients
(only the latent fed back as the next input is detached) and places the *undetached* latents in the
answer pass, so the answer loss also trains the LLM through the latents it predicted. Here that
gradient comes from one more teacher-forced pass with gradients over ``[question][detached rolled-out
latents]``: causal attention makes its hidden states equal to the rollout's, so ``head`` of them are the
same latents, now with the official graph behind them (a test compares the gradients with a
sample-by-sample reference of the official forward). ``"detached"`` feeds ``latents.detach()``.

Stage II's optional reader loss (``reader_weight``): MSE to the visual embeddings rewards the mean glyph where the
model is unsure (measured on 4x4 multiplication: computed digits came out as blurred 8s and 3s). A frozen copy of the
backbone VLM, which reads its own tower's tokens as text, reads the predicted latents in its OCR prompt, and its
cross-entropy on the drawn CoT is the loss: a latent is right when it reads as the right characters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rot_model import attention
from rot_model.decoding import Engines, bucketed


class SwiGLU(nn.Module):
    """W3(silu(W1 x) * W2 x), as in the official projection head."""

    def __init__(self, width: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class ProjectionHead(nn.Module):
    """LayerNorm(d_llm) -> Linear(d_llm, width) -> SwiGLU(width) -> Linear(width, d_latent)."""

    def __init__(self, llm_dim: int, latent_dim: int, width: int = 2048):
        super().__init__()
        self.norm = nn.LayerNorm(llm_dim)
        self.fc_in = nn.Linear(llm_dim, width)
        self.swiglu = SwiGLU(width)
        self.fc_out = nn.Linear(width, latent_dim)

    def forward(self, hidden):
        return self.fc_out(self.swiglu(self.fc_in(self.norm(hidden))))


LATENT_GRADIENTS = ("official", "detached")
ROLLOUT_CACHE_BUCKET = 128  # the rollout engine's cache length is a multiple of this: few engine shapes per run


class RoTModel(nn.Module):
    def __init__(self, lm, latent_dim: int, img_begin_id: int, img_end_id: int, head_width: int = 2048,
                 latent_gradient: str = "official", packing: bool = False):
        super().__init__()
        if latent_gradient not in LATENT_GRADIENTS:
            raise ValueError(f"--latent-gradient {latent_gradient}: use one of {', '.join(LATENT_GRADIENTS)}")
        self.latent_gradient = latent_gradient
        self.packing = packing  # the teacher-forced passes run only the rows' real tokens (``decode``)
        llm_dim = lm.config.hidden_size
        self.lm = lm
        self.head = ProjectionHead(llm_dim, latent_dim, head_width)
        # shards from another VLM family: map latents back to the LLM's input size before feeding them in
        self.adapter = nn.Linear(latent_dim, llm_dim) if latent_dim != llm_dim else nn.Identity()
        self.img_begin_id, self.img_end_id = img_begin_id, img_end_id
        # the decoding engines this model keeps (rollouts in training, decoding in rot_eval); graphs wherever the
        # weights are on a GPU, unless the trainer says otherwise (``--rollout eager``; ZeRO-3 moves the weights)
        self.engines = Engines()
        self.reader = None  # Stage II's reader loss: a frozen causal LM that reads latents as text (``set_reader``)

    def set_reader(self, reader) -> None:
        """Hold the reader outside the module tree: DeepSpeed then never partitions, trains or checkpoints it (a
        registered frozen copy still left its tied output weight in every checkpoint)."""
        object.__setattr__(self, "reader", reader.requires_grad_(False).eval())

    @property
    def decoder(self):
        """The transformer stack (returns hidden states, not logits); LoRA layers live inside it."""
        lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return lm.get_decoder()

    @property
    def output_layer(self):
        lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return lm.get_output_embeddings()

    def embed(self, token_ids):
        return self.lm.get_input_embeddings()(token_ids)

    def latent_inputs(self, latents):
        return self.adapter(latents).to(self.embed_dtype)

    @property
    def embed_dtype(self):
        return self.lm.get_input_embeddings().weight.dtype

    @torch.no_grad()
    def rollout_hidden(self, prefix_ids, prefix_mask, n_steps: int) -> torch.Tensor:
        """Hidden states h_0 ... h_{n-1} that predict latents v_1 ... v_n, batched, on the decoding engine.

        ``prefix_ids`` are left-padded (question + <img_begin>), so the last column is every row's latest position.
        The prefix is left-padded further to the engine's prompt bucket and the cache length rounded up to
        ``ROLLOUT_CACHE_BUCKET``, so batches of nearby lengths share one engine (and its captured graphs). Returns
        [B, n_steps, d_llm]. Runs in eval mode: no dropout in the latents fed back, and gradient checkpointing (train
        mode only) would otherwise switch the cache off. A test compares it with a sample-by-sample rollout that
        re-runs the whole sequence for every latent.
        """
        was_training = self.training
        self.eval()
        try:
            ids, mask = bucketed(prefix_ids, prefix_mask, pad_id=0)  # padding is masked: its token does not matter
            max_len = -(-(ids.shape[1] + n_steps) // ROLLOUT_CACHE_BUCKET) * ROLLOUT_CACHE_BUCKET
            engine = self.engines.get(self.decoder, ids.shape[0], max_len)
            hidden = engine.prefill(self.embed(ids), mask)
            states = [hidden]
            for _ in range(n_steps - 1):
                hidden = engine.step(self.latent_inputs(self.head(hidden)))
                states.append(hidden)
            return torch.stack(states, dim=1)
        finally:
            self.train(was_training)

    def decode(self, decoder, inputs, mask):
        """Hidden states [B, L, d] of a masked pass over ``inputs`` [B, L, d]; ``mask`` [B, L] marks each row's real
        positions, which get consecutive positions 0..n-1 (padding and latent holes are skipped, as at inference).

        Packing off: one padded call, holes masked. On: the real positions only, row by row as one sequence [1, T]
        with each row's bounds (``cu_seq_lens``) for the attention (``rot_model.attention.packed``), scattered back;
        the holes' hidden states are zeros, and no loss reads them (the losses mask them or multiply them by 0)."""
        positions = mask.long().cumsum(-1) - 1
        if not self.packing:
            return decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions.clamp(min=0),
                           use_cache=False).last_hidden_state
        if reason := attention.cannot_pack(decoder.config):
            raise ValueError(f"--packing: this backbone cannot pack ({reason}); use --no-packing")
        real = mask.bool()
        lengths = real.sum(1)
        cu_seq_lens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(lengths.max())
        hidden = decoder(inputs_embeds=inputs[real][None], attention_mask=attention.no_mask(decoder.config),
                         position_ids=positions[real][None], use_cache=False, cu_seq_lens_q=cu_seq_lens,
                         cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest).last_hidden_state
        unpacked = hidden.new_zeros(*mask.shape, hidden.shape[-1])
        unpacked[real] = hidden[0]
        return unpacked

    def teacher_forced(self, batch, latents):
        """One pass over [prefix][latent slots][suffix]; slots past a row's own count are masked holes.

        Returns (hidden states [B, L, d], attention mask [B, L]). Positions skip the holes, so each row
        sees exactly ``prefix v_1..v_n suffix`` with consecutive positions, as at inference.
        """
        n_slots = latents.shape[1]
        slot_mask = (torch.arange(n_slots, device=latents.device)[None] < batch["n_latents"][:, None]).to(batch["prefix_mask"])
        inputs = torch.cat([self.embed(batch["prefix_ids"]), self.latent_inputs(latents), self.embed(batch["suffix_ids"])], 1)
        mask = torch.cat([batch["prefix_mask"], slot_mask, batch["suffix_mask"]], 1)
        return self.decode(self.decoder, inputs, mask), mask

    def latent_hidden(self, batch, latents):
        """Hidden states that predict each latent, recomputed with gradients from ``[prefix][latents]``
        (``latents`` detached: the official rollout feeds its predictions back detached)."""
        n_slots = latents.shape[1]
        slot_mask = (torch.arange(n_slots, device=latents.device)[None] < batch["n_latents"][:, None]).to(batch["prefix_mask"])
        inputs = torch.cat([self.embed(batch["prefix_ids"]), self.latent_inputs(latents)], 1)
        mask = torch.cat([batch["prefix_mask"], slot_mask], 1)
        hidden = self.decode(self.decoder, inputs, mask)
        start = batch["prefix_ids"].shape[1] - 1  # <img_begin>, the last prefix column (left padding)
        return hidden[:, start:start + n_slots]

    def lm_loss(self, batch, hidden, mask):
        """Cross-entropy on <img_end> + answer: each real position predicts the next real position's token.
        Averaged per sample, then over samples (so a 2-GPU run logs the same loss as a 1-GPU run)."""
        length = hidden.shape[1]
        suffix_start = length - batch["suffix_ids"].shape[1]
        index = torch.arange(length, device=hidden.device).expand_as(mask)
        real_index = torch.where(mask.bool(), index, torch.full_like(index, length))
        # the next real position after each position: a reversed running minimum, shifted by one
        following = torch.cat([real_index[:, 1:].flip(1).cummin(1).values.flip(1), torch.full_like(real_index[:, :1], length)], 1)
        rows, sources = (mask.bool() & (following < length) & (following >= suffix_start)).nonzero(as_tuple=True)
        labels = batch["suffix_ids"][rows, following[rows, sources] - suffix_start]
        logits = self.output_layer(hidden[rows, sources]).float()
        per_token = F.cross_entropy(logits, labels, reduction="none")
        # mean per sample, then over samples: every sample counts once however the batch is split over ranks
        per_sample = per_token.new_zeros(hidden.shape[0]).index_add_(0, rows, per_token)
        per_sample = per_sample / torch.bincount(rows, minlength=hidden.shape[0]).clamp(min=1)
        return (per_sample * batch["weights"]).sum() / batch["weights"].sum().clamp(min=1e-8)

    def stop_loss(self, batch, hidden):
        """The learned stop: at every decision point of the latent phase (the position of <img_begin> and of each latent),
        the LM head's probability of <img_end> is trained to be 1 after a row's own last latent and 0 before it
        (binary cross-entropy, mean per sample, then over samples). At inference the thought ends where that
        probability passes one half (``rot_eval.generate``: ``stop="learned"``), so the model chooses its thinking length.
        ``hidden``: the teacher-forced pass's hidden states, whose column ``prefix_len - 1 + k`` has seen k latents."""
        prefix_len, n_slots = batch["prefix_ids"].shape[1], batch["targets"].shape[1]
        points = hidden[:, prefix_len - 1: prefix_len + n_slots]  # k = 0..n_slots latents seen
        logits = self.output_layer(points).float()
        every = logits.logsumexp(-1)
        log_p = logits[..., self.img_end_id] - every  # log p(<img_end>)
        log_not = logits.index_fill(-1, torch.tensor([self.img_end_id], device=logits.device), float("-inf")).logsumexp(-1) - every
        seen = torch.arange(n_slots + 1, device=hidden.device)[None]
        stop, valid = seen == batch["n_latents"][:, None], seen <= batch["n_latents"][:, None]
        per_point = -torch.where(stop, log_p, log_not)
        per_sample = (per_point * valid).sum(1) / valid.sum(1)
        return (per_sample * batch["weights"]).sum() / batch["weights"].sum().clamp(min=1e-8)

    @staticmethod
    def vision_loss(batch, predicted):
        """Mean squared error to the target embeddings over each row's own latent positions, then over rows."""
        targets, target_mask = batch["targets"], batch["target_mask"]
        per_slot = (predicted.float() - targets).pow(2).mean(-1)
        per_sample = (per_slot * target_mask).sum(1) / target_mask.sum(1).clamp(min=1)
        return (per_sample * batch["weights"]).sum() / batch["weights"].sum().clamp(min=1e-8)

    def reader_loss(self, batch, predicted):
        """Cross-entropy of the frozen reader transcribing ``predicted`` (the latents' slots, holes masked) in its OCR
        turn ``read_prefix [latents] read_suffix`` as the drawn CoT; per sample, then over samples, like ``lm_loss``."""
        embed = self.reader.get_input_embeddings()
        n_slots = predicted.shape[1]
        slot_mask = (torch.arange(n_slots, device=predicted.device)[None] < batch["n_latents"][:, None]).to(batch["read_suffix_mask"])
        inputs = torch.cat([embed(batch["read_prefix_ids"]), predicted.to(embed.weight.dtype), embed(batch["read_suffix_ids"])], 1)
        mask = torch.cat([torch.ones_like(batch["read_prefix_ids"]), slot_mask, batch["read_suffix_mask"]], 1)
        hidden = self.decode(self.reader.get_decoder(), inputs, mask)
        # the suffix is contiguous: its position j is predicted by the one before it; the text starts at read_from
        first = hidden.shape[1] - batch["read_suffix_ids"].shape[1] + batch["read_from"]
        logits = self.reader.get_output_embeddings()(hidden[:, first - 1:-1]).float()
        labels, label_mask = batch["read_suffix_ids"][:, batch["read_from"]:], batch["read_suffix_mask"][:, batch["read_from"]:]
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none") * label_mask
        per_sample = per_token.sum(1) / label_mask.sum(1).clamp(min=1)
        return (per_sample * batch["weights"]).sum() / batch["weights"].sum().clamp(min=1e-8)

    def forward(self, batch, stage: int, vision_weight: float, lm_weight: float, hidden_roll=None,
                rolled_out: int | None = None, reader_weight: float = 0.0, stop_weight: float = 0.0):
        """Losses of one micro-batch; ``hidden_roll`` lets a caller supply the rollout (the benchmark's official loop).

        ``rolled_out`` (Stage II's curriculum): only the first ``rolled_out`` latents are the model's own rollout;
        the later slots hold the true visual embeddings (teacher forcing), as the CoT stays text after Coconut's
        first latents. None: every latent is rolled out (the official forward). ``reader_weight`` (Stage II): weight of
        the frozen reader's cross-entropy on the drawn CoT, read from the latents the model predicts in every slot.
        ``stop_weight`` (Stage II): weight of the learned stop (``stop_loss``; 0: off, the official loss)."""
        n_slots = batch["targets"].shape[1]
        if n_slots == 0:  # the SFT baselines: question -> text, no latents
            hidden, mask = self.teacher_forced(batch, batch["targets"].to(self.embed_dtype))
            loss = self.lm_loss(batch, hidden, mask)
            return {"loss": loss, "lm": loss.detach()}
        n_rolled = n_slots if rolled_out is None else max(0, min(rolled_out, n_slots))
        if n_rolled < n_slots and stage != 2:
            raise ValueError("the latent curriculum is a Stage II option: Stage I trains the head on the full rollout")
        truth = batch["targets"][:, n_rolled:].to(self.embed_dtype)
        if hidden_roll is None and n_rolled:
            hidden_roll = self.rollout_hidden(batch["prefix_ids"], batch["prefix_mask"], n_rolled)
        # Stage I: grad flows into the head; Stage II: the head is frozen
        latents = self.head(hidden_roll) if n_rolled else truth[:, :0]
        losses = {"latent_norm": latents.detach().float().norm(dim=-1).mean() if n_rolled else latents.new_zeros(()).float()}
        total = latents.new_zeros((), dtype=torch.float32)
        if stage == 1:
            losses["mse"] = self.vision_loss(batch, latents)
            total = total + vision_weight * losses["mse"]
        if lm_weight > 0 or stage == 2:
            if stage == 1:
                answer_latents = latents
            elif self.latent_gradient == "official" and n_rolled:
                inputs = torch.cat([latents.detach(), truth], 1)  # what the rollout fed back, then the teacher-forced rest
                answer_latents = torch.cat([self.head(self.latent_hidden(batch, inputs))[:, :n_rolled], truth], 1)
            else:
                answer_latents = torch.cat([latents.detach(), truth], 1)
            hidden, mask = self.teacher_forced(batch, answer_latents)
            losses["lm"] = self.lm_loss(batch, hidden, mask)
            total = total + lm_weight * losses["lm"]
            if stage == 2 and stop_weight > 0:
                losses["stop"] = self.stop_loss(batch, hidden)
                total = total + stop_weight * losses["stop"]
            if stage == 2 and (vision_weight > 0 or reader_weight > 0):
                # each slot's prediction of the next latent, from the latents before it (rolled out or true)
                prefix_len = batch["prefix_ids"].shape[1]
                predicted = self.head(hidden[:, prefix_len - 1: prefix_len - 1 + n_slots])
                if vision_weight > 0:
                    losses["mse"] = self.vision_loss(batch, predicted)
                    total = total + vision_weight * losses["mse"]
                if reader_weight > 0:
                    losses["read"] = self.reader_loss(batch, predicted)
                    total = total + reader_weight * losses["read"]
        losses["loss"] = total
        return losses

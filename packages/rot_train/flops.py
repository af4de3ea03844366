"""Model FLOPs of training, counted from each micro-batch's real tokens, and the MFU they give on the card.

What is counted (2 FLOPs per multiply-add; ``N`` = the weights of the decoder's linear layers, LoRA's excepted):
- a forward pass over t tokens: ``2 N t`` plus causal attention ``2 L (heads x head_dim) t^2``;
- the rollout: one forward over the question and the rolled-out latents (prefill, then one token per latent; the
  KV cache makes it the cost of one pass over ``q + k - 1`` tokens), and the head on every latent;
- each pass with gradients: its forward, the input gradients (another forward's worth) and, for trained weights
  (full fine-tuning; LoRA's own are negligible), the weight gradients (one more): 2x or 3x the forward;
- the output layer on the answer tokens only (where the loss reads logits), and the head.
Not counted: padding, filler rows, activation recomputation (gradient checkpointing), the reader loss's frozen VLM,
the optimizer. So MFU is what the model needs over what the card could do: padding and recomputation show as loss.
"""

from __future__ import annotations

import torch

# dense bf16 peaks (TFLOP/s, without sparsity) of the cards the project has run on, by a word of the device's name
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "B200": 2250.0}


def peak_tflops(device: torch.device) -> tuple[str | None, float | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for word, peak in PEAK_BF16_TFLOPS.items() if word in name), None)


class Counter:
    """FLOPs of one micro-batch of this run (its stage, mode and which weights train)."""

    def __init__(self, model, cfg):
        config = model.lm.config
        decoder = model.decoder
        self.linear = sum(m.weight.numel() for n, m in decoder.named_modules()
                          if isinstance(m, torch.nn.Linear) and "lora_" not in n)
        self.attention = config.num_hidden_layers * config.num_attention_heads * getattr(
            config, "head_dim", config.hidden_size // config.num_attention_heads)
        self.output = config.hidden_size * config.vocab_size
        self.head = sum(m.weight.numel() for m in (*model.head.modules(), model.adapter) if isinstance(m, torch.nn.Linear))
        self.cfg = cfg
        trained_llm = cfg.stage == 2 and cfg.full_finetune
        self.backward = 2.0 if trained_llm else 1.0  # forwards' worth of backward: input gradients (+ weight gradients)

    def of_batch(self, batch: dict, rolled_out: int | None, with_attention: bool = True) -> float:
        """``with_attention=False``: the matrix products of the weights alone (what torch's FLOP counter sees of a
        step whose attention runs in a fused kernel)."""
        attention = 2 * self.attention if with_attention else 0

        def forward(tokens: torch.Tensor) -> torch.Tensor:  # one pass over ``tokens`` tokens
            return 2 * self.linear * tokens + attention * tokens.pow(2)

        real = batch["weights"] > 0
        question, answer = batch["prefix_mask"].sum(1).double(), batch["suffix_mask"].sum(1).double()
        latents = batch["n_latents"].double()
        rolled = latents if rolled_out is None else latents.clamp(max=rolled_out)
        with_grad = 1 + self.backward
        total = forward(question + latents + answer) * with_grad + 2 * self.output * answer * with_grad
        if self.cfg.mode == "rot":
            total = total + torch.where(rolled > 0, forward(question + rolled - 1), torch.zeros_like(rolled))
            total = total + 2 * self.head * rolled * 3  # the head on the rolled-out latents, forward and backward
            if self.cfg.stage == 2 and self.cfg.latent_gradient == "official":  # the pass that gives them their graph
                total = total + torch.where(rolled > 0, forward(question + latents) * with_grad, torch.zeros_like(rolled))
            if self.cfg.stage == 2 and self.cfg.vision_weight:
                total = total + 2 * self.head * latents * 3
        return float(total[real].sum())


def utilisation(model_flops: float, samples: int, seconds: float, world_size: int, device: torch.device) -> dict:
    """The summary's FLOP figures: per sample, per second over all ranks, and MFU against the cards' dense bf16 peak."""
    name, peak = peak_tflops(device)
    rate = model_flops / max(seconds, 1e-9) / 1e12
    return {"model_tflop_per_sample": model_flops / max(samples, 1) / 1e12, "model_tflops_per_s": rate,
            "gpu": name, "peak_bf16_tflops_per_gpu": peak, "mfu": rate / (peak * world_size) if peak else None}


def describe(summary: dict) -> str:
    if summary.get("mfu") is None:
        return f", {summary['model_tflops_per_s']:.3g} model TFLOP/s"
    return (f", {summary['model_tflops_per_s']:.1f} model TFLOP/s = {100 * summary['mfu']:.1f}% MFU of the "
            f"{summary['gpu']}'s {summary['peak_bf16_tflops_per_gpu']:g} dense bf16")

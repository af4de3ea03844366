"""Do fused projections (``rot_model.fused``) change what the decoder computes on a GPU? At the 4B shape: hidden states
of a prefill and 8 decode steps on the engine (inputs fixed, not fed back, so a difference cannot compound), fused
against separate, in bf16 and in fp32 (TF32 off), beside bf16's own rounding (bf16 against the same weights in fp32).

    python benchmarks/fused_check.py --size 4b --out fused.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import AutoModelForCausalLM

from gpu_bench import qwen3_vl_4b_config
from rot_fixtures.tiny import tiny_vlm_config
from rot_model.backbone import text_config_of
from rot_model.decoding import StaticDecoder
from rot_model.fused import fuse_projections


def hidden_states(decoder, ids: torch.Tensor, prompt: int = 40) -> torch.Tensor:
    """[1 + steps, rows, d]: the prefill's last hidden state, then each step's."""
    inputs = decoder.embed_tokens(ids)
    engine = StaticDecoder(decoder, ids.shape[0], ids.shape[1] + 16)
    with torch.no_grad():
        hidden = [engine.prefill(inputs[:, :prompt], torch.ones_like(ids[:, :prompt]))]
        hidden += [engine.step(inputs[:, k]) for k in range(prompt, ids.shape[1])]
    return torch.stack(hidden).float()


def relative(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per position: the largest difference relative to the largest value of ``b``."""
    return [round(float((x - y).abs().max() / y.abs().max()), 6) for x, y in zip(a, b)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["4b", "tiny"], default="4b")
    parser.add_argument("--out", default="fused.json")
    args = parser.parse_args()
    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    config = qwen3_vl_4b_config() if args.size == "4b" else tiny_vlm_config("qwen3_vl", hidden_size=64, vocab_size=8192)
    torch.manual_seed(0)
    with torch.device(device):
        fp32 = AutoModelForCausalLM.from_config(text_config_of(config), dtype=torch.float32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = torch.randint(100, 5000, (1, 48), device=device)
    separate32, separate16 = hidden_states(fp32.model, ids), hidden_states(bf16.model, ids)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "size": args.size,
              "bf16_vs_fp32": relative(separate16, separate32)}
    result["fused_layers"] = fuse_projections(bf16.model)
    result["bf16_fused_vs_separate"] = relative(hidden_states(bf16.model, ids), separate16)
    fuse_projections(fp32.model)
    result["fp32_fused_vs_separate"] = relative(hidden_states(fp32.model, ids), separate32)
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as out:
        json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()

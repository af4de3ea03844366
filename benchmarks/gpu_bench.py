"""GPU benchmark at the paper's model size: encode, train and infer, each against the official approach.

    python benchmarks/gpu_bench.py --size 4b --out bench.json      # on one GPU
    python benchmarks/gpu_bench.py --size tiny                      # a quick CPU check of the script

Speed does not depend on weight values, so the models have the published Qwen3-VL-4B-Instruct
configuration (text: hidden 2560, 36 layers, 32 heads, 8 KV heads; vision: 24 blocks, hidden 1024,
2560-dim merger output, patch 16, 2x2 merge) with random weights. Every figure is measured in the same
run as its comparison: warm-up first, CUDA-synchronised timing, median of repeats. The table prints last.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rot_data.records import load_records
from rot_vision.tower import PACKED, VisionEncoder
from rot_vision.render import RenderSettings, render_line
from rot_data.tokens import IMG_BEGIN, IMG_END
from rot_data.transformers_compat import checkpoint_activations
from rot_model.backbone import add_latent_tokens, text_config_of
from rot_data.tokens import user_turn_ids
from rot_model.batches import RoTCollator, pad
from rot_eval.generate import generate_rot, generate_text
from rot_model.fused import fuse_projections
from rot_model.model import RoTModel
from rot_fixtures.tiny import bpe_tokenizer, tiny_vlm_config

ROOT = Path(__file__).resolve().parents[1]  # the project is installed (pip install -e .) or on PYTHONPATH


def qwen3_vl_4b_config():
    from transformers import Qwen3VLConfig

    text = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
    vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh")
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``function()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_memory(function) -> float:
    """Peak GPU memory (GiB) allocated while ``function`` runs, on top of nothing freed before it."""
    if not torch.cuda.is_available():
        return 0.0
    sync()
    torch.cuda.reset_peak_memory_stats()
    function()
    sync()
    return torch.cuda.max_memory_allocated() / 2**30


def save_vision_checkpoint(config, folder: Path) -> Path:
    """A checkpoint folder with the VLM config and only the tower's tensors (random, seeded)."""
    from safetensors.torch import save_file
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    torch.manual_seed(0)
    tower = Qwen3VLVisionModel._from_config(config.vision_config).to(torch.bfloat16)
    save_file({f"model.visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}, folder / "model.safetensors")
    config.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- 1. encode
def stock(encoder: VisionEncoder) -> VisionEncoder:
    """Put back the Conv3d patch embedding that transformers ships (ours runs it as a GEMM)."""
    del encoder.tower.patch_embed.forward
    return encoder


def encode_one_per_call(encoder: VisionEncoder, image) -> torch.Tensor:
    """The official path: float pixel values made on the host (as the HF processor does), one image per forward call."""
    patches, grid = encoder.patchify(image)
    return encoder.tower(patches.to(encoder.device, encoder.dtype), grid_thw=torch.tensor([grid], device=encoder.device))


def device_kernels(events):
    """The GPU kernels of a profile (not the aten ops that launched them, which carry the same device time again)."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]


def build_rates(stdout: str) -> tuple[float, float] | None:
    """(images/s of the whole encode, steady images/s) from `rot-render build`'s summary line."""
    lines = [l for l in stdout.splitlines() if "images/s once the encoders" in l]
    if not lines:
        return None
    return (float(lines[0].split(" images/s (")[0].rsplit(" at ", 1)[1]),
            float(lines[0].split(" images/s once")[0].rsplit("(", 1)[1]))


def operator_stats(stats_text: str) -> dict:
    """Per Ray Data operator of a build (its build-stats.txt): tasks, span, mean task time and how many of its tasks
    ran at once (their summed time / the span): the figure that showed the render tasks held to ~20 of 64 cores."""
    seconds = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    operators = {}
    pattern = (r"Operator \d+ (\S+): (\d+) tasks executed, \d+ blocks produced in ([\d.]+)s\n"
               r"\* Remote wall time: \S+ min, \S+ max, ([\d.]+)(us|ms|s) mean, ([\d.]+)(us|ms|s) total")
    for name, tasks, span, mean, mean_unit, total, total_unit in re.findall(pattern, stats_text):
        name = name.replace("MapBatches(", "").replace(")", "")  # "render_batch", "EncodeBatch", "render_batch->EncodeBatch"
        operators[name] = {"tasks": int(tasks), "span_s": float(span), "task_ms_mean": round(float(mean) * seconds[mean_unit] * 1e3, 1),
                           "tasks_at_once": round(float(total) * seconds[total_unit] / max(float(span), 1e-9), 1)}
    return operators


def profile_encode(encoder: VisionEncoder, images) -> dict:
    """One packed call under torch.profiler: how busy the GPU is, and where its time goes."""
    from torch.profiler import ProfilerActivity, profile

    encoder.encode(images)
    sync()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        encoder.encode(images)
        sync()
    wall = time.perf_counter() - started
    events = prof.key_averages()
    kernels = sorted(device_kernels(events), key=lambda e: -e.self_device_time_total)
    busy_us = sum(e.self_device_time_total for e in kernels)
    return {"wall_ms_under_profiler": wall * 1e3, "gpu_busy_fraction": busy_us / 1e6 / wall,
            "top_kernels": [{"name": e.key[:90], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in kernels[:8]],
            "host_ms_grey_patches": 1e3 * timed(lambda: [encoder.grey_patches(i) for i in images], repeats=3)}


def bench_encode(checkpoint: Path, records, device, results, single_images: int, ray_job: bool, pack: int = 256):
    settings = RenderSettings()
    started = time.perf_counter()
    sample = [render_line(r.cot, settings, 32) for r in records[:500]]
    results["render_images_per_s_one_cpu_core"] = len(sample) / (time.perf_counter() - started)
    with multiprocessing.Pool() as pool:  # the build job renders on every core too
        images = pool.starmap(render_line, [(r.cot, settings, 32) for r in records], chunksize=64)
    tokens = sum(i.shape[1] // 32 for i in images)
    # ours, then one change taken back at a time (which part buys what), then the official one-image-per-call path
    variants = {"encode_packed_ours": (PACKED, False), "encode_packed_conv3d": (PACKED, True),
                "encode_packed_per_image_sdpa": ("sdpa", False)}
    for key, (attention, conv3d) in variants.items():
        encoder = VisionEncoder.from_pretrained(str(checkpoint), device=device, attn_implementation=attention)
        encoder = stock(encoder) if conv3d else encoder

        def packed_run():
            for start in range(0, len(images), pack):
                encoder.encode(images[start:start + pack])

        encoder.encode(images[:pack])  # warm-up: one pack (kernels chosen, allocator grown)
        seconds = timed(packed_run, repeats=2 if key == "encode_packed_ours" else 1, warmup=0)
        results[key] = {"images_per_s": len(images) / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds,
                        "images": len(images), "images_per_call": pack, "attention": attention,
                        "patch_embedding": "conv3d" if conv3d else "linear"}
        if key == "encode_packed_ours":
            results["encode_profile"] = profile_encode(encoder, images[:pack])
        del encoder
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    official = stock(VisionEncoder.from_pretrained(str(checkpoint), device=device, attn_implementation="sdpa"))
    subset = images[:single_images]
    seconds = timed(lambda: [encode_one_per_call(official, image) for image in subset], repeats=1)
    results["encode_one_per_call"] = {"images_per_s": len(subset) / seconds, "seconds": seconds, "images": len(subset),
                                      "tokens_per_s": sum(i.shape[1] // 32 for i in subset) / seconds,
                                      "attention": "sdpa", "patch_embedding": "conv3d"}
    del official
    results["encode_best"] = "encode_packed_ours"
    if ray_job:
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "rot_render.cli", "build", "--dataset", "gsm8k", "--out", out,
                       "--encoder", str(checkpoint), "--batch-size", str(pack), "--limit", str(len(records))]
            started = time.perf_counter()
            job = subprocess.run(command, capture_output=True, text=True, cwd=ROOT / "packages")
            wall = time.perf_counter() - started
            rates = build_rates(job.stdout)
            if job.returncode or not rates:
                results["ray_job"] = {"error": (job.stderr or job.stdout)[-1500:]}
            else:
                rate, steady = rates
                results["ray_job"] = {"images_per_s_pipeline": rate, "images_per_s_steady": steady, "wall_seconds_with_startup": wall,
                                      "summary": job.stdout[-1500:],  # says where the start-up went
                                      "images_per_s_with_startup": len(records) / wall, "attention": PACKED,
                                      "images_per_call": pack, "ray_data_stats": (Path(out) / "build-stats.txt").read_text()}


# ---------------------------------------------------------------- 2. training
def build_rot_model(config, tokenizer, device):
    from transformers import AutoModelForCausalLM

    text_config = text_config_of(config)
    text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(text_config, dtype=torch.bfloat16)
    ids = add_latent_tokens(lm, tokenizer)
    latent_dim = config.vision_config.out_hidden_size
    model = RoTModel(lm, latent_dim, ids[IMG_BEGIN], ids[IMG_END], head_width=2048).to(device, torch.bfloat16)
    return model, ids


def make_batch(rows, embeddings, collate, device):
    batch = collate(rows, embeddings)
    batch["weights"] = torch.ones(len(rows))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def bench_training(model, ids, tokenizer, records, encoder_checkpoint, device, results, micro_batch: int, stage: int):
    """Ours (batched rollout + one teacher-forced pass, no vision tower) vs the official loop
    (vision tower resident, render + encode inside the step, latents rolled out one sample at a time,
    then the same batched loss). Both with activation checkpointing, as the official config."""
    collate = RoTCollator(tokenizer, ids[IMG_BEGIN], ids[IMG_END], max_latents=32)
    rows = [{"id": r.id, "question": r.question, "answer": r.answer} for r in records[:micro_batch]]
    weights = dict(stage=stage, vision_weight=10.0 if stage == 1 else 0.0, lm_weight=1.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=torch.cuda.is_available())
    encoder = VisionEncoder.from_pretrained(str(encoder_checkpoint), device=device)
    embeddings = encoder.encode([render_line(r.cot, RenderSettings(), 32) for r in records[:micro_batch]])
    embeddings = [e.float().cpu() for e in embeddings]
    del encoder
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    batch = make_batch(rows, embeddings, collate, device)

    def ours():
        model(batch, **weights)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory = peak_memory(ours)  # also the warm-up
    seconds = timed(ours, repeats=3, warmup=0)
    results[f"stage{stage}_ours"] = {"samples_per_s": micro_batch / seconds, "seconds_per_step": seconds,
                                     "peak_gib": memory, "micro_batch": micro_batch}

    encoder = VisionEncoder.from_pretrained(str(encoder_checkpoint), device=device)  # resident, as in the official code

    def official():
        step_embeddings, hidden = [], []
        for record, row in zip(records[:micro_batch], rows):
            (embedding,) = encoder.encode([render_line(record.cot, RenderSettings(), 32)])  # render + encode in the step
            step_embeddings.append(embedding.float().cpu())
            single = make_batch([row], [step_embeddings[-1]], collate, device)
            hidden.append(model.rollout_hidden(single["prefix_ids"], single["prefix_mask"], int(single["n_latents"][0])))
        full = make_batch(rows, step_embeddings, collate, device)
        slots = full["targets"].shape[1]
        hidden_roll = torch.stack([torch.nn.functional.pad(h[0], (0, 0, 0, slots - h.shape[1])) for h in hidden])
        model(full, **weights, hidden_roll=hidden_roll)["loss"].backward()  # the loss itself is batched in both
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory = peak_memory(official)  # also the warm-up (each official step costs tens of seconds at 4B)
    seconds = timed(official, repeats=1, warmup=0)
    tower_gib = sum(p.numel() * p.element_size() for p in encoder.tower.parameters()) / 2**30
    results[f"stage{stage}_official"] = {"samples_per_s": micro_batch / seconds, "seconds_per_step": seconds,
                                         "peak_gib": memory, "vision_tower_gib": tower_gib}
    del encoder
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


# ---------------------------------------------------------------- 3. inference
@torch.no_grad()
def official_decode(model, tokenizer, questions, latents: int, answer_tokens: int):
    """Latents with a KV cache, then every answer token by re-running the whole sequence (the official loop)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    ids, mask = pad([user_turn_ids(tokenizer, q) + [model.img_begin_id] for q in questions], pad_id, left=True)
    ids, mask = ids.to(device), mask.to(device)
    hidden = model.rollout_hidden(ids, mask, latents + 1)  # h_0 .. h_latents
    inputs = torch.cat([model.embed(ids), model.latent_inputs(model.head(hidden[:, :-1])),
                        model.embed(torch.full_like(ids[:, :1], model.img_end_id))], dim=1)
    mask = torch.cat([mask, mask.new_ones(len(questions), latents + 1)], dim=1)
    for _ in range(answer_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        last = model.decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1]
        token = model.output_layer(last).argmax(-1)
        inputs = torch.cat([inputs, model.embed(token)[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(questions), 1)], dim=1)


def explicit_cot(model, tokenizer, questions, new_tokens: int):
    """The explicit-CoT baseline on RoT's own engine: exactly ``new_tokens`` greedy steps."""
    generate_text(model, tokenizer, questions, max_new_tokens=new_tokens, stop_at_eos=False)


@torch.no_grad()
def hf_generate_cot(model, tokenizer, questions, new_tokens: int):
    """The same tokens through Hugging Face `generate` (dynamic cache): the comparison earlier runs made."""
    device = next(model.parameters()).device
    ids, mask = pad([user_turn_ids(tokenizer, q) for q in questions], tokenizer.pad_token_id, left=True)
    model.lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)


def rot_seconds(model, tokenizer, questions, latents: int, answer_tokens: int) -> float:
    return timed(lambda: generate_rot(model, tokenizer, questions, latents=latents, max_answer_tokens=answer_tokens,
                                      stop_at_eos=False), repeats=3)


def bench_inference(model, tokenizer, records, results, batch_sizes, latents=32, answer_tokens=6, cot_tokens=108):
    """RoT (latents + answer) against explicit CoT (CoT + answer tokens), both on the same engine. Two bounds on their
    ratio at batch 1, where a step costs the bytes it reads: the step-count bound (every step reads every weight), and
    the byte-count bound (a latent step reads the decoder and the projection head, not the vocabulary projection)."""
    model.eval()
    rot_steps, cot_steps = latents + 1 + answer_tokens, cot_tokens + answer_tokens  # +1: <img_end>
    size = weight_bytes(model)
    token_bytes, latent_bytes = size["decoder"] + size["vocabulary"], size["decoder"] + size["head"]
    byte_bound = cot_steps * token_bytes / (latents * latent_bytes + (rot_steps - latents) * token_bytes)
    for batch_size in batch_sizes:
        questions = [r.question for r in records[:batch_size]]
        rot = rot_seconds(model, tokenizer, questions, latents, answer_tokens)
        cot = timed(lambda: explicit_cot(model, tokenizer, questions, cot_steps), repeats=3)
        hf_cot = timed(lambda: hf_generate_cot(model, tokenizer, questions, cot_steps), repeats=3)
        official = timed(lambda: official_decode(model, tokenizer, questions, latents, answer_tokens), repeats=3)
        results[f"infer_batch{batch_size}"] = {
            "rot_s_per_question": rot / batch_size, "explicit_cot_s_per_question": cot / batch_size,
            "hf_generate_cot_s_per_question": hf_cot / batch_size,
            "official_rot_decoding_s_per_question": official / batch_size, "questions_per_s": batch_size / rot,
            "cot_questions_per_s": batch_size / cot, "speedup_vs_cot": cot / rot, "speedup_vs_official_decoding": official / rot,
            "step_bound_vs_cot": cot_steps / rot_steps, "byte_bound_vs_cot": byte_bound, "rot_steps": rot_steps,
            "latents": latents, "cot_steps": cot_steps,
        }
        if batch_size == 1:  # what one step of each kind costs, and the prefill (a run with no latent, one answer token)
            latent_step = (rot_seconds(model, tokenizer, questions, 2 * latents, answer_tokens) - rot) / latents
            answer_step = (rot_seconds(model, tokenizer, questions, latents, answer_tokens + 32) - rot) / 32
            cot_step = (cot - timed(lambda: explicit_cot(model, tokenizer, questions, 2), repeats=3)) / (cot_steps - 2)
            prefill = rot_seconds(model, tokenizer, questions, 0, 1) - answer_step
            results["infer_batch1"].update(latent_step_ms=latent_step * 1e3, rot_answer_step_ms=answer_step * 1e3,
                                           cot_step_ms=cot_step * 1e3, prefill_ms=prefill * 1e3)


def bench_eval(model, tokenizer, ids, results, work: Path, batch_size: int = 64, latents: int = 32):
    """The whole GSM8k test through ``rot-eval run``, timed end to end (a fresh process: imports, loading the export,
    every batch, the files): the bench's model written as a RoT export, so the user's command is what is timed."""
    from types import SimpleNamespace

    from rot_model.export import export
    from rot_train.train import TrainConfig

    folder = work / "export-random"
    cfg = TrainConfig(stage=2, shards=str(work), backbone="random weights", out=str(work), full_finetune=True,
                      head_width=model.head.fc_in.out_features, inference_latents=latents)
    shard_set = SimpleNamespace(fingerprint="random", dim=model.head.fc_out.out_features)
    export(model, tokenizer, folder, cfg, shard_set, {IMG_BEGIN: ids[IMG_BEGIN], IMG_END: ids[IMG_END]})
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rot_eval.cli", "run", "--checkpoint", str(folder), "--dataset", "gsm8k",
                    "--split", "test", "--batch-size", str(batch_size), "--out", str(work / "eval")], check=True)
    wall = time.perf_counter() - started
    summary = json.loads((work / "eval" / "summary.json").read_text())
    results["eval_gsm8k_test"] = {
        "questions": summary["examples"], "batch_size": batch_size, "latents": latents, "wall_s": wall,
        "generation_s": summary["seconds_per_sample"] * summary["examples"], "questions_per_s_end_to_end": summary["examples"] / wall,
    }


def weight_bytes(model) -> dict:
    """Bytes a decode step reads at batch 1: the decoder's weights, plus the vocabulary projection (a token step) or the
    projection head (a latent step). The tied embedding matrix is the vocabulary projection; a lookup reads one row."""
    size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())
    vocabulary = model.output_layer.weight.numel() * model.output_layer.weight.element_size()
    decoder = size(model.decoder) - (vocabulary if model.decoder.embed_tokens.weight is model.output_layer.weight else 0)
    return {"decoder": decoder, "vocabulary": vocabulary, "head": size(model.head) + size(model.adapter)}


def copy_bandwidth(device) -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write): what streaming the weights once can reach."""
    source = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), repeats=5)
    return 2 * source.numel() / seconds


def engine_step(model, tokenizer, question: str, compile_step: bool, steps: int = 64, repeats: int = 3) -> dict:
    """The engine's own batch-1 decode step (``StaticDecoder.step`` replayed ``steps`` times after a prefill), captured
    as a CUDA graph, or compiled first and then captured: milliseconds per step, its first call's seconds (warm-up,
    compilation, capture), and a torch.profiler view of the kernels inside the replayed graph."""
    from torch.profiler import ProfilerActivity, profile

    from rot_model.decoding import StaticDecoder

    ids, mask = pad([user_turn_ids(tokenizer, question)], tokenizer.pad_token_id, left=True)
    ids, mask = ids.to(model.lm.device), mask.to(model.lm.device)
    engine = StaticDecoder(model.decoder, 1, ids.shape[1] + max(steps, 16) + 1, compile_step=compile_step)

    def decode(n):
        engine.prefill(prompt, mask)
        sync()
        started = time.perf_counter()
        for _ in range(n):
            engine.step(prompt[:, -1])
        sync()
        return time.perf_counter() - started

    with torch.no_grad():
        prompt = model.embed(ids)
        first = decode(1)
        per_step = statistics.median(decode(steps) / steps for _ in range(repeats))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            decode(16)
    kernels = sorted(device_kernels(prof.key_averages()), key=lambda e: -e.self_device_time_total)
    matrix = [e for e in kernels if any(k in e.key.lower() for k in ("gemm", "gemv", "nvjet", "cutlass", "splitk"))]
    return {"ms_per_step": per_step * 1e3, "first_call_s": first,
            "profile": {"kernel_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1e3 / 16,
                        "matrix_kernel_ms_per_step": sum(e.self_device_time_total for e in matrix) / 1e3 / 16,
                        "kernels_per_step": sum(e.count for e in kernels) / 16,
                        "top_kernels": [{"name": e.key[:100], "ms_per_step": e.self_device_time_total / 1e3 / 16,
                                         "per_step": e.count / 16} for e in kernels[:12]]}}


def bench_limit(model, tokenizer, records, results, device, out):
    """The batch-1 decode step against its floor (the bytes it reads / measured copy bandwidth): the engine's step as
    a CUDA graph and compiled before capture, with a profile of the captured step's kernels."""
    if not torch.cuda.is_available():
        return
    bandwidth = copy_bandwidth(device)
    bytes_read = weight_bytes(model)
    token_floor = (bytes_read["decoder"] + bytes_read["vocabulary"]) / bandwidth  # what an explicit-CoT step reads
    decoder_floor = bytes_read["decoder"] / bandwidth  # the engine's step alone (the decoder)
    limit = results["decode_limit"] = {
        "copy_bandwidth_gb_s": bandwidth / 1e9, "weight_gb": {k: v / 1e9 for k, v in bytes_read.items()},
        "floor_ms_per_token_step": token_floor * 1e3, "floor_ms_per_decoder_step": decoder_floor * 1e3}
    question = records[0].question
    limit["graph"] = engine_step(model, tokenizer, question, compile_step=False)
    limit["graph"]["ratio_to_floor"] = limit["graph"]["ms_per_step"] / 1e3 / decoder_floor
    one = results.get("infer_batch1")
    if one and "prefill_ms" in one:  # RoT's own floor: its prefill plus every decode step at the weights' read time
        answer = one["rot_steps"] - one["latents"]
        rot_floor = one["prefill_ms"] / 1e3 + (one["latents"] * (bytes_read["decoder"] + bytes_read["head"])
                                               + answer * (bytes_read["decoder"] + bytes_read["vocabulary"])) / bandwidth
        limit.update(rot_floor_s=rot_floor, rot_ratio_to_floor=one["rot_s_per_question"] / rot_floor)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")  # kept if the compilation below runs out of time
    try:
        limit["compiled_graph"] = engine_step(model, tokenizer, question, compile_step=True)
        limit["compiled_graph"]["ratio_to_floor"] = limit["compiled_graph"]["ms_per_step"] / 1e3 / decoder_floor
    except Exception as error:  # recorded, not fatal: the rest of the run is already measured
        limit["compiled_graph"] = {"error": f"{type(error).__name__}: {error}"[:500]}


def bench_compiled(model, tokenizer, records, results, device, out, autotune: bool, latents: int = 32, answer_tokens: int = 6):
    """Batch-1 RoT with the engine's step compiled before its capture (``Engines(compile_step=True)``) against the
    captured eager step, in the same run, and against its floor (its prefill + each step's bytes / copy bandwidth);
    with ``autotune``, once more with inductor choosing its own kernels (max_autotune's exhaustive search of matrix
    kernels, coordinate descent over every kernel's launch settings)."""
    from rot_model.decoding import Engines, bucketed

    questions = [records[0].question]
    bandwidth, size = copy_bandwidth(device), weight_bytes(model)
    decode_bytes = latents * (size["decoder"] + size["head"]) + (answer_tokens + 1) * (size["decoder"] + size["vocabulary"])

    def measure() -> dict:
        graph = rot_seconds(model, tokenizer, questions, latents, answer_tokens)
        captured = model.engines
        model.engines = Engines(compile_step=True)
        try:
            started = time.perf_counter()
            generate_rot(model, tokenizer, questions, latents=latents, max_answer_tokens=answer_tokens, stop_at_eos=False)
            first = time.perf_counter() - started
            compiled = rot_seconds(model, tokenizer, questions, latents, answer_tokens)
            ids, mask = pad([user_turn_ids(tokenizer, q) + [model.img_begin_id] for q in questions], tokenizer.pad_token_id,
                            left=True)
            ids, mask = bucketed(ids.to(device), mask.to(device), tokenizer.pad_token_id)
            engine = model.engines.get(model.decoder, 1, ids.shape[1] + latents + answer_tokens + 1)  # the one generate_rot used
            with torch.no_grad():
                inputs = model.embed(ids)
                prefill = timed(lambda: engine.prefill(inputs, mask), repeats=5)
        finally:
            model.engines = captured
        floor = prefill + decode_bytes / bandwidth
        return {"rot_s_per_question": compiled, "rot_graph_s_per_question": graph, "first_call_s": first,
                "prefill_ms": prefill * 1e3, "copy_bandwidth_gb_s": bandwidth / 1e9, "rot_floor_s": floor,
                "rot_ratio_to_floor": compiled / floor, "graph_ratio_to_floor": graph / floor}

    results["compiled_batch1"] = measure()
    if autotune:  # minutes of kernel benchmarking in the first call: the results so far are kept if it runs out of time
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        import torch._inductor.config as inductor

        model.engines.clear()
        torch.compiler.reset()  # else the new engine's step reuses the compilation above (same code, same shapes)
        # the exhaustive search and all directions: 1.54x -> 1.45x the floor on one H100 (docs/benchmarks.md), ~3.5 min
        with inductor.patch(max_autotune=True, max_autotune_gemm_search_space="EXHAUSTIVE",
                            coordinate_descent_tuning=True, coordinate_descent_check_all_directions=True):
            results["compiled_batch1_autotuned"] = measure()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["4b", "tiny"], default="4b")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--parts", default="encode,train,infer,eval,limit,compiled",
                        help="also: autotune (with compiled: a third batch-1 run, inductor autotuning its kernels)")
    parser.add_argument("--batch-sizes", default="1,64", help="inference batch sizes")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = set(args.parts.split(","))
    tiny = args.size == "tiny"
    config = tiny_vlm_config("qwen3_vl", hidden_size=64, vocab_size=8192) if tiny else qwen3_vl_4b_config()
    records, _ = load_records("gsm8k", "train")
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "size": args.size,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    import transformers

    results["transformers"] = transformers.__version__
    work = Path(tempfile.mkdtemp())
    checkpoint = save_vision_checkpoint(config, work)
    if "encode" in parts:
        bench_encode(checkpoint, records[:64] if tiny else records, device, results, 16 if tiny else 500, ray_job=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    tokenizer = bpe_tokenizer([r.question + " " + r.cot for r in records], vocab_size=8000)
    model, ids = build_rot_model(config, tokenizer, device)
    micro_batch = 4 if tiny else 16
    if "train" in parts:
        model.lm.requires_grad_(False)
        checkpoint_activations(model.lm)
        model.train()
        bench_training(model, ids, tokenizer, records, checkpoint, device, results, micro_batch, stage=1)
        from peft import LoraConfig, get_peft_model

        model.head.requires_grad_(False)
        model.lm = get_peft_model(model.lm, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        checkpoint_activations(model.lm.base_model.model)
        model.to(device, torch.bfloat16).train()
        bench_training(model, ids, tokenizer, records, checkpoint, device, results, micro_batch, stage=2)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if hasattr(model.lm, "merge_and_unload"):  # inference on the merged model, never the LoRA-wrapped one
        model.lm = model.lm.merge_and_unload()
    if "eval" in parts:  # exported as trained (`rot-eval` fuses what it loads): before the fusing below
        bench_eval(model, tokenizer, ids, results, work)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    fuse_projections(model.decoder)  # q/k/v and gate/up fused: the model as `rot-eval` loads it
    if "infer" in parts:
        bench_inference(model, tokenizer, records, results, [int(b) for b in args.batch_sizes.split(",")])
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if "limit" in parts:
        bench_limit(model, tokenizer, records, results, device, args.out)
    if "compiled" in parts and torch.cuda.is_available():
        bench_compiled(model, tokenizer, records, results, device, args.out, autotune="autotune" in parts)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(r: dict) -> str:
    rows = [f"device: {r['device']}, torch {r['torch']}, transformers {r['transformers']}, {r['date']}", "",
            "| measurement | ours | comparison | ratio | goal |", "|---|---|---|---|---|"]
    if "encode_one_per_call" in r:
        ours, one = r["encode_packed_ours"], r["encode_one_per_call"]
        rows.append(f"| encode, images/s: ours (packed 256, varlen attention, GEMM patch embedding) vs one image per call "
                    f"(stock tower) | {ours['images_per_s']:.0f} | {one['images_per_s']:.1f} | "
                    f"{ours['images_per_s'] / one['images_per_s']:.1f}x | >= 20x |")
        rows.append(f"| encode, visual tokens/s, same comparison | {ours['tokens_per_s']:.0f} | {one['tokens_per_s']:.0f} | "
                    f"{ours['tokens_per_s'] / one['tokens_per_s']:.1f}x | - |")
        for key, what in (("encode_packed_conv3d", "Conv3d patch embedding"), ("encode_packed_per_image_sdpa", "per-image SDPA")):
            rows.append(f"| encode, ours vs ours with {what} | {ours['images_per_s']:.0f} | {r[key]['images_per_s']:.0f} | "
                        f"{ours['images_per_s'] / r[key]['images_per_s']:.2f}x | - |")
        prof = r.get("encode_profile")
        if prof:
            rows.append(f"| profile of one packed call: GPU busy fraction; host ms for the uint8 patches | "
                        f"{prof['gpu_busy_fraction']:.2f} | {prof['host_ms_grey_patches']:.1f} | | |")
        job = r.get("ray_job", {})
        if "images_per_s_pipeline" in job:
            rows.append(f"| rot-render build job steady vs encoder alone (same attention and pack), images/s | {job['images_per_s_steady']:.0f} | "
                        f"{ours['images_per_s']:.0f} | {job['images_per_s_steady'] / ours['images_per_s']:.2f}x | >= 0.9x |")
            rows.append(f"| rot-render build job incl. Ray + actor start-up, images/s | {job['images_per_s_with_startup']:.0f} | "
                        f"{ours['images_per_s']:.0f} | {job['images_per_s_with_startup'] / ours['images_per_s']:.2f}x | - |")
    for stage, goal in ((1, 10), (2, 5)):
        if f"stage{stage}_ours" in r:
            ours, official = r[f"stage{stage}_ours"], r[f"stage{stage}_official"]
            rows.append(f"| Stage {'I' * stage} samples/s (batch {ours['micro_batch']}) vs official loop | {ours['samples_per_s']:.2f} | "
                        f"{official['samples_per_s']:.2f} | {ours['samples_per_s'] / official['samples_per_s']:.1f}x | >= {goal}x |")
            rows.append(f"| Stage {'I' * stage} peak GiB vs official (tower {official['vision_tower_gib']:.2f} GiB) | {ours['peak_gib']:.2f} | "
                        f"{official['peak_gib']:.2f} | {official['peak_gib'] - ours['peak_gib']:.2f} GiB less | >= tower |")
    for key in sorted(k for k in r if k.startswith("infer_batch")):
        x = r[key]
        b = key.removeprefix("infer_batch")
        rows.append(f"| s/question batch {b}: RoT ({x['rot_steps']} steps) vs explicit CoT ({x['cot_steps']} steps), same engine; "
                    f"byte-count bound {x['byte_bound_vs_cot']:.2f}x (step-count {x['step_bound_vs_cot']:.2f}x) | "
                    f"{x['rot_s_per_question']:.4f} | {x['explicit_cot_s_per_question']:.4f} | {x['speedup_vs_cot']:.2f}x = "
                    f"{x['speedup_vs_cot'] / x['byte_bound_vs_cot']:.2f} of the bound | >= 0.9 of the bound |")
        rows.append(f"| questions/s batch {b}: RoT vs explicit CoT | {x['questions_per_s']:.1f} | {x['cot_questions_per_s']:.1f} | | |")
        rows.append(f"| s/question batch {b}: explicit CoT, our engine vs HF generate | {x['explicit_cot_s_per_question']:.4f} | "
                    f"{x['hf_generate_cot_s_per_question']:.4f} | {x['hf_generate_cot_s_per_question'] / x['explicit_cot_s_per_question']:.2f}x | - |")
        rows.append(f"| s/question batch {b}: RoT vs official decoding | {x['rot_s_per_question']:.4f} | "
                    f"{x['official_rot_decoding_s_per_question']:.4f} | {x['speedup_vs_official_decoding']:.2f}x | - |")
    if "latent_step_ms" in r.get("infer_batch1", {}):
        x = r["infer_batch1"]
        rows.append(f"| batch 1 ms: RoT latent step / RoT answer step / prefill; CoT token step | "
                    f"{x['latent_step_ms']:.2f} / {x['rot_answer_step_ms']:.2f} / {x['prefill_ms']:.1f} | {x['cot_step_ms']:.2f} | | |")
    if "decode_limit" in r:
        d = r["decode_limit"]
        if "rot_floor_s" in d:
            rows.append(f"| batch-1 RoT s/question vs its floor (prefill + each step's bytes / copy bandwidth) | "
                        f"{r['infer_batch1']['rot_s_per_question']:.4f} | {d['rot_floor_s']:.4f} | {d['rot_ratio_to_floor']:.2f}x | <= 1.5x |")
        for key, what in (("graph", "captured as a CUDA graph"), ("compiled_graph", "compiled, then captured")):
            if "ms_per_step" in d.get(key, {}):
                x = d[key]
                rows.append(f"| batch-1 engine step ms, {what}, vs floor (decoder {d['weight_gb']['decoder']:.2f} GB / "
                            f"{d['copy_bandwidth_gb_s']:.0f} GB/s); kernels per step {x['profile']['kernels_per_step']:.0f}, "
                            f"of which matrix products {x['profile']['matrix_kernel_ms_per_step']:.2f} ms | {x['ms_per_step']:.2f} | "
                            f"{d['floor_ms_per_decoder_step']:.2f} | {x['ratio_to_floor']:.2f}x | - |")
    for key, what in (("compiled_batch1", ""), ("compiled_batch1_autotuned", ", inductor's autotuned kernels")):
        if key in r:
            c = r[key]
            rows.append(f"| batch-1 RoT s/question{what}, step compiled then captured vs its floor (prefill {c['prefill_ms']:.1f} ms "
                        f"+ bytes / {c['copy_bandwidth_gb_s']:.0f} GB/s); captured eager step: {c['rot_graph_s_per_question']:.4f} s "
                        f"= {c['graph_ratio_to_floor']:.2f}x | {c['rot_s_per_question']:.4f} | {c['rot_floor_s']:.4f} | "
                        f"{c['rot_ratio_to_floor']:.2f}x | <= 1.5x |")
    if "eval_gsm8k_test" in r:
        e = r["eval_gsm8k_test"]
        rows.append(f"| GSM8k test ({e['questions']} questions) through `rot-eval run`, batch {e['batch_size']}, {e['latents']} latents: "
                    f"s end to end; of which generating | {e['wall_s']:.1f} | {e['generation_s']:.1f} | "
                    f"{e['questions_per_s_end_to_end']:.1f} questions/s | - |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()

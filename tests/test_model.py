"""The model on tiny real-architecture backbones, without DeepSpeed: loading, rollout, losses."""

import math

import pyarrow.parquet as pq
import pytest
import torch

from rot_data.transformers_compat import cache_arg, output_cache
from rot_data.tokens import IMG_BEGIN, IMG_END
from rot_model.backbone import add_latent_tokens, load_backbone
from rot_model.batches import RoTCollator
from rot_model.model import RoTModel
from rot_model.shard_stream import ShardSet, ShardStream


@pytest.mark.parametrize("fixture", ["tiny_qwen3_vl", "tiny_qwen2_5_vl"])
def test_vlm_checkpoint_loads_its_language_model_only_and_matches_the_vlm(request, fixture):
    from transformers import AutoModelForImageTextToText

    folder = request.getfixturevalue(fixture)
    lm, tokenizer = load_backbone(str(folder), dtype=torch.float32)
    names = [n for n, _ in lm.named_parameters()]
    assert names and not any("visual" in n or "vision" in n for n in names)
    vlm = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("What is 12 * 7? It is 84.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(lm.eval()(input_ids=ids).logits, vlm(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_new_tokens_have_norm_sqrt_hidden(tiny_qwen3_vl):
    lm, tokenizer = load_backbone(str(tiny_qwen3_vl), dtype=torch.float32)
    ids = add_latent_tokens(lm, tokenizer, seed=0)
    rows = lm.get_input_embeddings().weight[list(ids.values())]
    torch.testing.assert_close(rows.norm(dim=1), torch.full((2,), 64 ** 0.5))
    assert tokenizer.convert_ids_to_tokens(ids[IMG_END]) == IMG_END


def model_and_batch(backbone, shards, n_short: int, reading=None, max_latents=None):
    """A RoT model on ``backbone`` (head width 32) and a first batch of 4 rows in which row 1 has only ``n_short``
    latents (rows of different latent counts in one batch)."""
    torch.manual_seed(0)
    lm, tokenizer = load_backbone(str(backbone), dtype=torch.float32)
    ids = add_latent_tokens(lm, tokenizer)
    model = RoTModel(lm, 64, ids[IMG_BEGIN], ids[IMG_END], head_width=32).eval()
    collate = RoTCollator(tokenizer, ids[IMG_BEGIN], ids[IMG_END], max_latents, reading(tokenizer) if reading else None)
    batch = next(iter(ShardStream(ShardSet.open(shards), collate, micro_batch=4, shuffle_buffer=1)))
    batch["n_latents"][1] = n_short
    batch["target_mask"][1, n_short:] = 0
    return model, tokenizer, batch


@pytest.fixture(scope="module")
def rot_setup(tiny_qwen3_vl, tiny_shards):
    model, _, batch = model_and_batch(tiny_qwen3_vl, tiny_shards, n_short=5, max_latents=12)
    return model, batch


def reference_rollout(model, prefix, n_steps):
    """One sample, no padding, no KV cache: re-run the whole sequence for every latent."""
    inputs = model.embed(prefix[None])
    states = []
    for _ in range(n_steps):
        hidden = model.decoder(inputs_embeds=inputs).last_hidden_state[:, -1]
        states.append(hidden)
        inputs = torch.cat([inputs, model.latent_inputs(model.head(hidden))[:, None]], dim=1)
    return torch.cat(states)


def test_batched_rollout_equals_sample_by_sample_reference(rot_setup):
    """The trainer's one rollout, on the decoding engine (static cache, prefix left-padded to its bucket), against
    re-running each sample's whole sequence for every latent."""
    model, batch = rot_setup
    n_steps = batch["targets"].shape[1]
    with torch.no_grad():
        batched = model.rollout_hidden(batch["prefix_ids"], batch["prefix_mask"], n_steps)
    assert (batch["prefix_mask"] == 0).any(), "the batch should be left-padded"
    with torch.no_grad():
        for i in range(len(batch["ids"])):
            prefix = batch["prefix_ids"][i][batch["prefix_mask"][i].bool()]
            torch.testing.assert_close(batched[i], reference_rollout(model, prefix, n_steps), atol=1e-4, rtol=1e-4)


def test_a_model_keeps_its_own_engines_and_reuses_them_by_shape(rot_setup, tiny_qwen3_vl):
    """Rollouts of one shape reuse one engine (its cache and, on a GPU, its graphs); another model never shares it."""
    model, batch = rot_setup
    model.engines.clear()
    ids, mask, n_steps = batch["prefix_ids"], batch["prefix_mask"], batch["targets"].shape[1]
    with torch.no_grad():
        first = model.rollout_hidden(ids, mask, n_steps)
        again = model.rollout_hidden(ids, mask, n_steps)
    assert len(model.engines.kept) == 1
    torch.testing.assert_close(again, first)
    lm, tokenizer = load_backbone(str(tiny_qwen3_vl), dtype=torch.float32)
    ids_new = add_latent_tokens(lm, tokenizer)
    other = RoTModel(lm, 64, ids_new[IMG_BEGIN], ids_new[IMG_END], head_width=32)
    assert other.engines is not model.engines and not other.engines.kept


def test_teacher_forced_pass_sees_the_rolled_out_latents(rot_setup):
    model, batch = rot_setup
    n_steps = batch["targets"].shape[1]
    with torch.no_grad():
        rolled = model.rollout_hidden(batch["prefix_ids"], batch["prefix_mask"], n_steps)
        hidden, mask = model.teacher_forced(batch, model.head(rolled))
    start = batch["prefix_ids"].shape[1] - 1
    for i, n in enumerate(batch["n_latents"].tolist()):
        torch.testing.assert_close(hidden[i, start:start + n], rolled[i, :n], atol=1e-4, rtol=1e-4)
    assert mask[1, batch["prefix_ids"].shape[1] + 5:batch["prefix_ids"].shape[1] + n_steps].sum() == 0  # holes


def test_the_stop_loss_asks_for_img_end_after_each_rows_own_last_latent_and_learns_it(tiny_qwen3_vl, tiny_shards):
    """Per decision point k (latents seen), the target is <img_end> iff k equals the row's latent count (row 1 has 5 of
    the batch's slots): the batched loss equals a sample-by-sample one, and a few steps on it teach the LM head where
    each row stops (on the teacher-forced pass)."""
    model, _, batch = model_and_batch(tiny_qwen3_vl, tiny_shards, n_short=5, max_latents=12)
    truth = batch["targets"].to(model.embed_dtype)
    hidden, _ = model.teacher_forced(batch, truth)
    prefix_len = batch["prefix_ids"].shape[1]
    expected = []
    for i, n in enumerate(batch["n_latents"].tolist()):
        # in float64: float32's log(1 - p) for p near 1/vocabulary is off by ~1e-3 of p (1 - p rounds), more than
        # the loss's own rounding (it works from logsumexp); how far off depends on the CPU's summation order
        logits = model.output_layer(hidden[i, prefix_len - 1: prefix_len + n]).double()
        targets = torch.arange(n + 1) == n
        expected.append(torch.nn.functional.binary_cross_entropy(logits.softmax(-1)[:, model.img_end_id], targets.double()))
    torch.testing.assert_close(model.stop_loss(batch, hidden).double(), torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(60):
        loss = model.stop_loss(batch, model.teacher_forced(batch, truth)[0])
        first = first if first is not None else float(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        hidden, _ = model.teacher_forced(batch, truth)
        points = hidden[:, prefix_len - 1: prefix_len + batch["targets"].shape[1]]
        stops = model.output_layer(points).log_softmax(-1)[..., model.img_end_id] > math.log(0.5)
    assert float(loss) < 0.1 * first
    for row, n in zip(stops, batch["n_latents"].tolist()):
        assert row[:n + 1].tolist() == [False] * n + [True]  # each row stops after its own last latent


def test_stage1_loss_reaches_only_the_head(rot_setup):
    model, batch = rot_setup
    model.lm.requires_grad_(False)
    model.zero_grad()
    losses = model(batch, stage=1, vision_weight=10.0, lm_weight=1.0)
    losses["loss"].backward()
    assert set(losses) == {"loss", "mse", "lm", "latent_norm"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    assert all(p.grad is None for p in model.lm.parameters())


def test_no_code_edits_sys_path():
    """Imports work because the project is installed (or PYTHONPATH names packages/), never by editing sys.path."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    edits = [f"{path.relative_to(root)}:{number}" for folder in ("packages", "benchmarks", "tests", "pipelines")
             for path in sorted((root / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"sys\.path\s*(\[.*\]\s*)?(=|\.insert|\.append|\.extend|\+=)", line)]
    assert not edits, edits


def official_stage2_loss(model, batch, row, rolled_out=None):
    """The official CoTCompressor forward for one sample: a rollout *with* gradients (the latent fed back as the
    next input is detached, the KV cache keeps its graph), then the answer pass over the undetached latents.
    With ``rolled_out`` (the curriculum), only that many latents are rolled out; the true embeddings follow."""
    prefix = batch["prefix_ids"][row][batch["prefix_mask"][row].bool()]
    suffix = batch["suffix_ids"][row][batch["suffix_mask"][row].bool()]
    n = int(batch["n_latents"][row])
    k = n if rolled_out is None else min(rolled_out, n)
    output = model.decoder(inputs_embeds=model.embed(prefix[None]), use_cache=True)
    latents = []
    for step in range(k):
        latent = model.head(output.last_hidden_state[:, -1])
        latents.append(latent)
        if step < k - 1:
            output = model.decoder(inputs_embeds=model.latent_inputs(latent.detach())[:, None],
                                   use_cache=True, **cache_arg(model.decoder, output_cache(output)))
    latents += [batch["targets"][row, i][None] for i in range(k, n)]
    inputs = torch.cat([model.embed(prefix[None]), model.latent_inputs(torch.stack(latents, 1)), model.embed(suffix[None])], 1)
    hidden = model.decoder(inputs_embeds=inputs).last_hidden_state[0]
    start = len(prefix) + n - 1  # the last latent predicts <img_end>
    logits = model.output_layer(hidden[start:start + len(suffix)])
    return torch.nn.functional.cross_entropy(logits, suffix)


@pytest.mark.parametrize("latent_gradient", ["official", "detached"])
def test_stage2_gradient_matches_the_official_forward_sample_by_sample(rot_setup, latent_gradient):
    model, batch = rot_setup
    model.latent_gradient = latent_gradient
    model.lm.requires_grad_(True)
    model.head.requires_grad_(False)
    parameters = [p for p in model.lm.parameters()]
    model.zero_grad()
    model(batch, stage=2, vision_weight=0.0, lm_weight=1.0)["lm"].backward()
    batched = [p.grad.clone() for p in parameters]
    model.zero_grad()
    reference = torch.stack([official_stage2_loss(model, batch, i) for i in range(len(batch["ids"]))]).mean()
    reference.backward()
    official = [p.grad.clone() for p in parameters]
    model.zero_grad()
    model.lm.requires_grad_(False)
    model.latent_gradient = "official"
    matches = all(torch.allclose(a, b, atol=2e-5, rtol=2e-3) for a, b in zip(batched, official))
    assert matches == (latent_gradient == "official")  # the detached variant misses the path through the latents


@pytest.mark.parametrize("rolled_out", [0, 3])
def test_curriculum_rolls_out_the_first_latents_and_teacher_forces_the_rest(rot_setup, rolled_out):
    """Stage II's curriculum: the first ``rolled_out`` latents are the model's own (official gradient through them),
    the rest are the true visual embeddings; loss and gradients equal the sample-by-sample reference."""
    model, batch = rot_setup
    model.lm.requires_grad_(True)
    model.head.requires_grad_(False)
    parameters = [p for p in model.lm.parameters()]
    model.zero_grad()
    batched_loss = model(batch, stage=2, vision_weight=0.0, lm_weight=1.0, rolled_out=rolled_out)["lm"]
    batched_loss.backward()
    batched = [p.grad.clone() for p in parameters]
    model.zero_grad()
    reference = torch.stack([official_stage2_loss(model, batch, i, rolled_out) for i in range(len(batch["ids"]))]).mean()
    reference.backward()
    official = [p.grad.clone() for p in parameters]
    model.zero_grad()
    full = model(batch, stage=2, vision_weight=0.0, lm_weight=1.0)["lm"]  # every latent rolled out: another loss
    model.lm.requires_grad_(False)
    torch.testing.assert_close(batched_loss, reference, atol=1e-5, rtol=1e-4)
    assert all(torch.allclose(a, b, atol=2e-5, rtol=2e-3) for a, b in zip(batched, official))
    assert not torch.allclose(full, batched_loss)


def test_curriculum_schedule_and_its_errors():
    from rot_train.train import TrainConfig

    config = TrainConfig(stage=2, shards="s", backbone="b", out="o", curriculum_steps=10, curriculum_stride=4)
    assert [config.rolled_out(step) for step in (0, 9, 10, 25, 70)] == [0, 0, 4, 8, 28]
    assert TrainConfig(stage=2, shards="s", backbone="b", out="o").rolled_out(5) is None  # off: the official forward
    with pytest.raises(ValueError, match="Stage II option"):
        TrainConfig(stage=1, shards="s", backbone="b", out="o", curriculum_steps=10)
    with pytest.raises(ValueError, match="--curriculum-stride 0"):
        TrainConfig(stage=2, shards="s", backbone="b", out="o", curriculum_steps=10, curriculum_stride=0)


def test_a_missing_backbone_folder_says_not_found_and_exports_store_resolved_paths(tmp_path, monkeypatch):
    """Issue 14.5: a path that is not a folder is not sent to the hub (whose 'Repo id must be ...' misled), and an
    export records a local backbone as an absolute path, so evaluating from another directory finds it."""
    from rot_model.backbone import checkpoint_dir
    from rot_model.export import portable_name

    for name in ("./nope", "runs/a/b", "/no/such/folder"):
        with pytest.raises(ValueError, match=f"--backbone {name}: no such checkpoint folder"):
            checkpoint_dir(name)
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert portable_name("ckpt") == str(tmp_path / "ckpt") and portable_name("./ckpt") == str(tmp_path / "ckpt")
    assert portable_name("Qwen/Qwen3-VL-4B-Instruct") == "Qwen/Qwen3-VL-4B-Instruct" and portable_name("anchor") == "anchor"


@pytest.fixture(scope="module")
def reader_setup(micro_anchor, tiny_shards):
    """The micro anchor as backbone and as frozen reader (hidden 64 = the tiny shards' dim), a batch with a short row."""
    from rot_model.batches import ReadingTurn

    model, tokenizer, batch = model_and_batch(micro_anchor, tiny_shards, n_short=20,
                                              reading=lambda tokenizer: ReadingTurn(tokenizer, thought_tags=False))
    model.set_reader(load_backbone(str(micro_anchor), dtype=torch.float32)[0])
    rows = pq.read_table(sorted(tiny_shards.glob("*.parquet")), columns=["id", "cot"]).to_pylist()
    return model, tokenizer, batch, {r["id"]: r["cot"] for r in rows}


def test_reader_loss_is_the_reader_transcribing_each_rows_latents(reader_setup):
    """The batched reader loss (padding, holes, positions) equals the reader's cross-entropy on each row's own OCR
    prompt (rot_vision.read.reading_prompt) with the latents in the placeholders' place, and so do its gradients."""
    from rot_data.tokens import IMAGE_PAD
    from rot_vision.read import reading_prompt
    from rot_data.shards import drawn_text
    from rot_model.batches import answer_ids

    model, tokenizer, batch, cot_of = reader_setup
    predicted = torch.randn(batch["targets"].shape, requires_grad=True)
    batched = model.reader_loss(batch, predicted)
    batched_grad, = torch.autograd.grad(batched, predicted)
    cots = [cot_of[i] for i in batch["ids"]]
    references = []
    for i, n in enumerate(batch["n_latents"].tolist()):
        prompt = reading_prompt(tokenizer, n)
        ids = torch.tensor(prompt + answer_ids(tokenizer, drawn_text(cots[i], False)))
        inputs = model.reader.get_input_embeddings()(ids).clone()
        inputs[ids == tokenizer.convert_tokens_to_ids(IMAGE_PAD)] = predicted[i, :n]
        logits = model.reader(inputs_embeds=inputs[None]).logits[0]
        references.append(torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1], ids[len(prompt):]))
    reference = torch.stack(references).mean()
    reference_grad, = torch.autograd.grad(reference, predicted)
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched_grad, reference_grad, atol=1e-6, rtol=1e-3)
    assert batched_grad[1, int(batch["n_latents"][1]):].abs().sum() == 0  # holes are never read



def losses_and_gradients(model, batch, stage: int, packing: bool):
    """The step's losses and the gradients of every trainable parameter, with packing on or off (the rollout is
    computed once, outside, so both settings see the same latents)."""
    model.packing = packing
    model.zero_grad()
    options = {"stage": 1, "vision_weight": 10.0, "lm_weight": 1.0} if stage == 1 else \
        {"stage": 2, "vision_weight": 1.0, "lm_weight": 1.0, "stop_weight": 1.0}
    losses = model(batch, hidden_roll=batch["hidden_roll"], **options)
    losses["loss"].backward()
    model.packing = False
    return ({k: v.detach() for k, v in losses.items()},
            {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("stage", [1, 2])
def test_packing_gives_the_same_losses_and_gradients(rot_setup, stage):
    """The passes packed (real tokens only, one sequence) equal the padded ones: losses and the gradients of the head
    (Stage I), of the whole LLM through the answer pass and the official latent gradient (Stage II, with the
    vision and stop losses that read the latent slots and their holes), on a batch with left padding, latent holes
    and right padding."""
    model, batch = rot_setup
    prefix, suffix = batch["prefix_mask"], batch["suffix_mask"]
    assert (prefix[:, 0] == 0).any() and (suffix[:, -1] == 0).any() and batch["n_latents"][1] < batch["targets"].shape[1]
    with torch.no_grad():
        batch = {**batch, "hidden_roll": model.rollout_hidden(batch["prefix_ids"], prefix, batch["targets"].shape[1])}
    model.lm.requires_grad_(stage == 2)
    model.head.requires_grad_(stage == 1)
    try:
        padded_losses, padded_grads = losses_and_gradients(model, batch, stage, packing=False)
        packed_losses, packed_grads = losses_and_gradients(model, batch, stage, packing=True)
    finally:
        model.lm.requires_grad_(False)
        model.head.requires_grad_(True)
        model.zero_grad()
    assert padded_losses.keys() == packed_losses.keys() and len(padded_grads) > 10
    for name in padded_losses:
        torch.testing.assert_close(packed_losses[name], padded_losses[name], atol=1e-5, rtol=1e-5)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert max(g.abs().max() for g in packed_grads.values()) > 1e-3  # gradients that matter were compared


def test_packing_on_a_backbone_that_cannot_pack_is_refused_in_one_line(rot_setup):
    model, batch = rot_setup
    config = model.decoder.config
    attention_before, model.packing = config._attn_implementation, True
    config._attn_implementation = "eager"
    try:
        with pytest.raises(ValueError, match=r"^--packing: this backbone cannot pack \(its attention is eager, not rot_sdpa\); "
                                             r"use --no-packing$"):
            model.decode(model.decoder, model.embed(batch["prefix_ids"]), batch["prefix_mask"])
    finally:
        config._attn_implementation, model.packing = attention_before, False


def test_packing_gives_the_same_reader_loss_and_gradient(reader_setup):
    model, _, batch, _ = reader_setup
    predicted = torch.randn(batch["targets"].shape, requires_grad=True, generator=torch.Generator().manual_seed(3))
    results = []
    for packing in (False, True):
        model.packing = packing
        loss = model.reader_loss(batch, predicted)
        results.append((loss.detach(), torch.autograd.grad(loss, predicted)[0]))
    model.packing = False
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-4)

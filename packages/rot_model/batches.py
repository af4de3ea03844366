"""Turn shard rows into the tensors of one micro-batch.

``prefix_ids``: chat-templated question + <img_begin>, left-padded (so the rollout's last column is
every row's newest position). ``suffix_ids``: <img_end> + answer + end-of-turn, right-padded.
``targets``: the stored visual embeddings (each ``merge`` consecutive ones averaged into one latent, then capped at
``max_latents`` if given), zero-padded.
With a reader (Stage II's reader loss): ``read_prefix_ids`` / ``read_suffix_ids``, the anchor's OCR turn around the
latent slots with the drawn CoT as the answer to score, which starts at suffix column ``read_from``.
"""

from __future__ import annotations

import torch

from rot_data.tokens import user_turn_ids


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, or its end-of-turn id when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def pad(sequences: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[i, span] = torch.tensor(sequence, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


class ReadingTurn:
    """The anchor's OCR prompt (``rot_vision.read.reading_prompt``) cut around its visual rows, and the text a reader
    should read there: the CoT exactly as the shard's line draws it."""

    def __init__(self, tokenizer, thought_tags: bool):
        from rot_data.tokens import IMAGE_PAD
        from rot_vision.read import reading_prompt

        pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        ids = reading_prompt(tokenizer, 1)
        if pad_id not in ids:
            raise ValueError(f"--reader-weight reads latents in the anchor's OCR prompt, and this backbone's tokenizer has no "
                             f"{IMAGE_PAD} token: use a backbone pretrained with that prompt (the anchor), or --reader-weight 0")
        cut = ids.index(pad_id)
        self.tokenizer, self.thought_tags, self.before, self.after = tokenizer, thought_tags, ids[:cut], ids[cut + 1:]

    def __call__(self, rows: list[dict]) -> dict:
        from rot_data.shards import drawn_text

        pad_id = pad_token_id(self.tokenizer)
        suffixes = [self.after + answer_ids(self.tokenizer, drawn_text(r["cot"], self.thought_tags)) for r in rows]
        suffix_ids, suffix_mask = pad(suffixes, pad_id, left=False)
        return {"read_prefix_ids": torch.tensor([self.before] * len(rows)), "read_suffix_ids": suffix_ids,
                "read_suffix_mask": suffix_mask, "read_from": len(self.after)}


def merged(embeddings: torch.Tensor, merge: int) -> torch.Tensor:
    """[tokens, dim] -> [ceil(tokens / merge), dim]: each ``merge`` consecutive visual embeddings averaged into the
    one latent that predicts them (the last group may be shorter). Fewer latents per thought than visual tokens, as
    the vision tower's own spatial merge makes one token of four patches; ``merge`` 1 keeps them as they are."""
    if merge == 1:
        return embeddings
    groups = torch.arange(len(embeddings)) // merge
    sums = torch.zeros(int(groups[-1]) + 1, embeddings.shape[1], dtype=torch.float32).index_add_(0, groups, embeddings.float())
    return (sums / torch.bincount(groups)[:, None]).to(embeddings.dtype)


class RoTCollator:
    reads_embeddings = True  # the stored visual latents are Stage I/II targets

    def __init__(self, tokenizer, img_begin_id: int, img_end_id: int, max_latents: int | None = None,
                 reading: ReadingTurn | None = None, merge: int = 1):
        self.tokenizer, self.img_begin_id, self.img_end_id, self.max_latents = tokenizer, img_begin_id, img_end_id, max_latents
        self.reading, self.merge = reading, merge

    def __call__(self, rows: list[dict], embeddings: list[torch.Tensor]) -> dict:
        embeddings = [merged(e, self.merge) for e in embeddings]
        pad_id = pad_token_id(self.tokenizer)
        prefix_ids, prefix_mask = pad([user_turn_ids(self.tokenizer, r["question"]) + [self.img_begin_id] for r in rows], pad_id, left=True)
        suffix_ids, suffix_mask = pad([[self.img_end_id] + answer_ids(self.tokenizer, r["answer"]) for r in rows], pad_id, left=False)
        n_latents = torch.tensor([len(e) if self.max_latents is None else min(len(e), self.max_latents) for e in embeddings])
        slots = max(1, int(n_latents.max()))
        targets = torch.zeros(len(rows), slots, embeddings[0].shape[1])
        for i, (embedding, n) in enumerate(zip(embeddings, n_latents.tolist())):
            targets[i, :n] = embedding[:n]
        target_mask = (torch.arange(slots)[None] < n_latents[:, None]).float()
        batch = {"ids": [r["id"] for r in rows], "prefix_ids": prefix_ids, "prefix_mask": prefix_mask,
                 "suffix_ids": suffix_ids, "suffix_mask": suffix_mask, "n_latents": n_latents,
                 "targets": targets, "target_mask": target_mask}
        return {**batch, **self.reading(rows)} if self.reading else batch


class SFTCollator:
    """The baselines: question -> ``cot #### answer`` (SFT with CoT) or question -> answer (SFT without CoT)."""

    reads_embeddings = False  # the stream then skips the embedding column (the bulk of every shard)

    def __init__(self, tokenizer, with_cot: bool, latent_dim: int):
        self.tokenizer, self.with_cot, self.latent_dim = tokenizer, with_cot, latent_dim

    def __call__(self, rows: list[dict], embeddings: list[torch.Tensor]) -> dict:
        pad_id = pad_token_id(self.tokenizer)
        prefix_ids, prefix_mask = pad([user_turn_ids(self.tokenizer, r["question"]) for r in rows], pad_id, left=True)
        targets = [f"{' '.join(r['cot'].split())} #### {r['answer']}" if self.with_cot else r["answer"] for r in rows]
        suffix_ids, suffix_mask = pad([answer_ids(self.tokenizer, t) for t in targets], pad_id, left=False)
        return {"ids": [r["id"] for r in rows], "prefix_ids": prefix_ids, "prefix_mask": prefix_mask,
                "suffix_ids": suffix_ids, "suffix_mask": suffix_mask, "n_latents": torch.zeros(len(rows), dtype=torch.long),
                "targets": torch.zeros(len(rows), 0, self.latent_dim), "target_mask": torch.zeros(len(rows), 0)}

"""The special-token strings, written once: the anchor's tokenizer is built from them and RoT adds ``<img_begin>`` /
``<img_end>`` to any backbone under the same names, so a RoT model built on the anchor starts from rows the anchor
already learned (``<img_begin>`` opens a line of visual tokens, ``<img_end>`` closes it before the answer)."""

from __future__ import annotations

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
IMG_BEGIN, IMG_END = "<img_begin>", "<img_end>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END, IMG_BEGIN, IMG_END, IMAGE_PAD, VIDEO_PAD]
CHAT_TEMPLATE = (  # Qwen's chat layout, for the anchor's tokenizer
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def user_turn_ids(tokenizer, content: str) -> list[int]:
    """A user turn of the tokenizer's chat template, then the assistant prompt, as token ids: the prefix of every prompt
    (RoT's question before ``<img_begin>``, the SFT baselines', the anchor's reading turn)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]

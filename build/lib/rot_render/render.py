"""Render a chain of thought as one line of black-on-white text (paper section 3.1).

The whole CoT becomes a single row: newlines are turned into spaces, so the vision tower's
patches run left to right in reading order. The width is padded up to a whole number of the
encoder's token width and the height is one token row, so an image of width W yields exactly
W / token_px visual tokens. The font is DejaVu Sans as shipped inside matplotlib, so every machine
draws the same pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def default_font_path() -> str:
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


@dataclass(frozen=True)
class RenderSettings:
    """How a line is drawn. ``height=None`` means one token row of the encoder in use."""

    height: int | None = None
    font_size: int = 20
    padding: int = 4
    foreground: int = 0  # grey level, 0 = black
    background: int = 255  # grey level, 255 = white
    font_path: str | None = None
    thought_tags: bool = False  # wrap as '<|begin_of_thought|>  ...  <|end_of_thought|>' like the official code

    def resolved(self, token_px: int) -> "RenderSettings":
        """Fill the defaults that depend on the encoder and check the line is one token row."""
        height = self.height or token_px
        if height % token_px:
            raise ValueError(f"--height {height} is not a multiple of the encoder's token size {token_px} px; use {token_px}")
        if self.font_size + 2 * self.padding > height:
            raise ValueError(f"--font-size {self.font_size} plus 2x--padding {self.padding} does not fit in --height {height}")
        return RenderSettings(
            height, self.font_size, self.padding, self.foreground, self.background,
            self.font_path or default_font_path(), self.thought_tags,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["font_file"] = Path(data.pop("font_path") or default_font_path()).name
        return data


@lru_cache(maxsize=8)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    # the basic layout engine: the same glyph advances whether or not Pillow was built with libraqm
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def line_text(cot: str, settings: RenderSettings) -> str:
    """The exact string drawn for a CoT: one line, optional thought tags."""
    text = " ".join(cot.split())
    if settings.thought_tags:
        text = f"<|begin_of_thought|>  {text}  <|end_of_thought|>"
    return text


def render_line(cot: str, settings: RenderSettings, token_px: int) -> np.ndarray:
    """Draw ``cot`` as a [height, width] uint8 grey image, width a multiple of ``token_px``."""
    settings = settings.resolved(token_px)
    text = line_text(cot, settings)
    font = _font(settings.font_path, settings.font_size)
    text_width = int(np.ceil(font.getlength(text)))
    width = max(token_px, -(-(text_width + 2 * settings.padding) // token_px) * token_px)
    image = Image.new("L", (width, settings.height), color=settings.background)
    ascent, descent = font.getmetrics()
    top = (settings.height - (ascent + descent)) // 2
    ImageDraw.Draw(image).text((settings.padding, top), text, font=font, fill=settings.foreground)
    return np.asarray(image, dtype=np.uint8)


def missing_glyphs(texts, font_path: str | None = None) -> set[str]:
    """Characters in ``texts`` that the font has no glyph for (they would draw as boxes)."""
    from fontTools.ttLib import TTFont

    covered = set(TTFont(font_path or default_font_path()).getBestCmap())
    used = set()
    for text in texts:
        used.update(text)
    return {char for char in used if not char.isspace() and ord(char) not in covered}

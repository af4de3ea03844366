"""Render a chain of thought as one line of black-on-white text (paper section 3.1).

The whole CoT becomes a single row: newlines are turned into spaces, so the vision tower's
patches run left to right in reading order. The width is padded up to a whole number of the
encoder's token width and the height is one token row, so an image of width W yields exactly
W / token_px visual tokens. The font is DejaVu Sans as shipped inside matplotlib, so every machine
draws the same pixels. A line longer than ``max_tokens`` tokens is cut after the last character that
fits (the build counts such rows). Text the renderer cannot draw faithfully, characters the font has
no glyph for and right-to-left scripts (drawn left to right, unjoined), is refused by the build
(``drawing_problem``), not drawn as boxes or backwards.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rot_data.ranges import refuse_out_of_range
from rot_data.shards import drawn_text


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
    max_tokens: int = 512  # width cap in visual tokens; longer lines are cut (GSM8k's longest CoT is 348)

    def resolved(self, token_px: int) -> "RenderSettings":
        """Fill the defaults that depend on the encoder and check the line is one token row."""
        refuse_out_of_range(self, at_least_one=("height", "font_size", "max_tokens"), not_negative=("padding",),
                            optional=("height",))
        height = token_px if self.height is None else self.height
        if height % token_px:
            raise ValueError(f"--height {height} is not a multiple of the encoder's token size {token_px} px; use {token_px}")
        if self.font_size + 2 * self.padding > height:
            raise ValueError(f"--font-size {self.font_size} plus 2x--padding {self.padding} does not fit in --height {height}")
        if self.max_tokens < 1 or self.max_tokens * token_px <= 2 * self.padding:
            raise ValueError(f"--max-tokens {self.max_tokens} leaves no room for text; use at least 1 (default 512)")
        return RenderSettings(
            height, self.font_size, self.padding, self.foreground, self.background,
            self.font_path or default_font_path(), self.thought_tags, self.max_tokens,
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
    """The exact string drawn for a CoT: one line, optional thought tags (the shard format's ``drawn_text``)."""
    return drawn_text(cot, settings.thought_tags)


def fit_line(cot: str, settings: RenderSettings, token_px: int) -> tuple[str, bool, float]:
    """The text drawn for ``cot``, whether it was cut to ``settings.max_tokens`` tokens (the longest
    prefix whose width, with the padding, fits), and its width in pixels (measured once: a layout costs
    about a sixth of drawing the line)."""
    settings = settings.resolved(token_px)
    text = line_text(cot, settings)
    font = _font(settings.font_path, settings.font_size)
    room = settings.max_tokens * token_px - 2 * settings.padding  # ceil(width) <= room  <=>  width <= room
    width = font.getlength(text)
    if width <= room:
        return text, False, width
    fits, fits_width, too_long = 0, 0.0, len(text)
    while too_long - fits > 1:  # binary search on the prefix length
        middle = (fits + too_long) // 2
        middle_width = font.getlength(text[:middle])
        if middle_width <= room:
            fits, fits_width = middle, middle_width
        else:
            too_long = middle
    return text[:fits], True, fits_width


def render_line(cot: str, settings: RenderSettings, token_px: int) -> np.ndarray:
    """Draw ``cot`` as a [height, width] uint8 grey image, width a multiple of ``token_px``."""
    return render_fitted(cot, settings, token_px)[0]


def render_fitted(cot: str, settings: RenderSettings, token_px: int) -> tuple[np.ndarray, bool]:
    """``render_line`` and whether the line was cut to ``settings.max_tokens``."""
    settings = settings.resolved(token_px)
    text, truncated, text_width = fit_line(cot, settings, token_px)
    font = _font(settings.font_path, settings.font_size)
    width = max(token_px, -(-(int(np.ceil(text_width)) + 2 * settings.padding) // token_px) * token_px)
    image = Image.new("L", (width, settings.height), color=settings.background)
    ascent, descent = font.getmetrics()
    top = (settings.height - (ascent + descent)) // 2
    ImageDraw.Draw(image).text((settings.padding, top), text, font=font, fill=settings.foreground)
    return np.asarray(image, dtype=np.uint8), truncated


@lru_cache(maxsize=8)
def _covered(font_path: str) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    return frozenset(TTFont(font_path).getBestCmap())


def missing_glyphs(texts, font_path: str | None = None) -> set[str]:
    """Characters in ``texts`` that the font has no glyph for (they would draw as boxes)."""
    covered = _covered(font_path or default_font_path())
    used = set()
    for text in texts:
        used.update(text)
    return {char for char in used if not char.isspace() and ord(char) not in covered}


RIGHT_TO_LEFT = {"R", "AL", "RLE", "RLO", "RLI"}  # Unicode bidi classes of right-to-left text and overrides


def _named(chars) -> str:
    chars = sorted(chars)
    named = ", ".join(f"{c!r} U+{ord(c):04X}" for c in chars[:5])
    return named + (f" and {len(chars) - 5} more" if len(chars) > 5 else "")


def drawing_problem(text: str, font_path: str | None = None) -> str | None:
    """Why ``text`` cannot be drawn faithfully (a bad row's reason), or None.

    Right-to-left scripts are refused rather than drawn: the one-line renderer lays glyphs out left to
    right without shaping, so Hebrew or Arabic would come out reversed and unjoined."""
    right_to_left = {c for c in set(text) if unicodedata.bidirectional(c) in RIGHT_TO_LEFT}  # each character once
    if right_to_left:
        return f"right-to-left text ({_named(right_to_left)}) would be drawn backwards; the renderer draws left to right only"
    missing = missing_glyphs([text], font_path)
    if missing:
        return f"the font has no glyph for {_named(missing)} (they would be drawn as boxes); pass --font with a font that has them"
    return None


def check_font(font_path: str | None) -> None:
    """Refuse a --font that is missing or not a font, in one line, before any worker tries to draw with it."""
    if font_path is None:
        return
    if not Path(font_path).is_file():
        raise ValueError(f"--font {font_path} does not exist; give a .ttf/.otf file, or leave --font out for DejaVu Sans")
    try:
        ImageFont.truetype(font_path, 10)
        _covered(font_path)
    except Exception as error:  # Pillow and fontTools raise several types for a file that is not a font
        raise ValueError(f"--font {font_path} cannot be read as a font ({str(error).splitlines()[0][:80]}); give a .ttf/.otf file") from None

import subprocess

import numpy as np
import pytest
from PIL import Image

from rot_data.records import load_records
from rot_vision.render import RenderSettings, line_text, missing_glyphs, render_line


@pytest.mark.parametrize("token_px", [32, 28])
def test_line_is_one_token_row_and_whole_tokens_wide(token_px):
    image = render_line("Natalia sold 48/2 = 24 clips in May.\nShe sold 72 clips.", RenderSettings(), token_px)
    assert image.dtype == np.uint8 and image.shape[0] == token_px
    assert image.shape[1] % token_px == 0 and image.shape[1] >= 300
    assert image.min() == 0 and image.max() == 255  # black text on white
    assert (image[:, -4:] == 255).all()  # right padding stays white


def test_newlines_become_one_line_and_longer_text_is_wider():
    settings = RenderSettings()
    assert line_text("a\nb\n\n c", settings) == "a b c"
    assert line_text("x", RenderSettings(thought_tags=True)) == "<|begin_of_thought|>  x  <|end_of_thought|>"
    short, long = (render_line(t, settings, 32) for t in ("12 + 30 = 42", "12 + 30 = 42 and 42 * 2 = 84"))
    assert long.shape[1] > short.shape[1]


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="not a multiple of the encoder's token size 32"):
        render_line("x", RenderSettings(height=40), 32)
    with pytest.raises(ValueError, match="does not fit"):
        render_line("x", RenderSettings(font_size=30), 32)


def test_font_covers_every_character_of_gsm8k():
    texts = []
    for split in ("train", "test"):
        records, _ = load_records("gsm8k", split)
        texts += [r.cot for r in records] + [r.question for r in records]
    assert len(set("".join(texts))) > 80
    assert missing_glyphs(texts) == set()
    assert missing_glyphs(["\u4e2d"]) == {"\u4e2d"}  # the check can fail


def test_show_writes_a_png(tmp_path):
    out = tmp_path / "line.png"
    result = subprocess.run(["rot-render", "show", "3 * 4 = 12", "-o", str(out)], capture_output=True, text=True, check=True)
    image = Image.open(out)
    assert image.size[1] == 32 and image.size[0] % 32 == 0
    assert result.stdout == f"wrote {out}: {image.size[0]}x32 px = {image.size[0] // 32} tokens of 32 px\n"
    one = subprocess.run(["rot-render", "show", "1", "-o", str(out)], capture_output=True, text=True, check=True)
    assert one.stdout == f"wrote {out}: 32x32 px = 1 token of 32 px\n"  # not "1 tokens"


@pytest.mark.parametrize("text, named", [
    ("48 / 2 = 24 \u4e2d\u6587", "'\u4e2d' U+4E2D, '\u6587' U+6587"),  # CJK: no glyph in DejaVu Sans
    ("so 3 apples \U0001F34E", "'\U0001F34E' U+1F34E"),  # emoji
])
def test_characters_without_a_glyph_are_named(text, named):
    from rot_vision.render import drawing_problem

    assert drawing_problem(text) == f"the font has no glyph for {named} (they would be drawn as boxes); pass --font with a font that has them"


def test_right_to_left_text_is_refused_and_plain_text_accepted():
    from rot_vision.render import drawing_problem

    assert drawing_problem("\u0633\u0644\u0627\u0645 = 5") == ("right-to-left text ('\u0627' U+0627, '\u0633' U+0633, '\u0644' U+0644, "
                                                        "'\u0645' U+0645) would be drawn backwards; the renderer draws left to right only")  # Arabic: DejaVu has the glyphs
    assert drawing_problem("\u05e9\u05dc\u05d5\u05dd").startswith("right-to-left text")  # Hebrew
    assert drawing_problem("Natalia sold 48/2 = 24 clips; 3\u00d74 \u2248 12 \u2264 13 \u2192 ok") is None


def test_long_lines_are_cut_to_max_tokens_after_a_whole_character():
    from rot_vision.render import _font, fit_line, render_fitted

    settings = RenderSettings(max_tokens=4)
    long = "12 + 30 = 42 and 42 * 2 = 84 and 84 - 1 = 83"
    image, truncated = render_fitted(long, settings, 32)
    assert truncated and image.shape == (32, 4 * 32)
    text, _, width = fit_line(long, settings, 32)
    assert long.startswith(text) and len(text) < len(long)
    resolved = settings.resolved(32)
    assert width == _font(resolved.font_path, resolved.font_size).getlength(text) <= 4 * 32 - 2 * settings.padding
    assert not render_line(text + long[len(text)], RenderSettings(), 32).shape[1] <= 4 * 32  # the next character would not fit
    short, cut = render_fitted("1 + 2 = 3", settings, 32)
    assert not cut and np.array_equal(short, render_line("1 + 2 = 3", RenderSettings(), 32))
    with pytest.raises(ValueError, match="--max-tokens 0: use at least 1"):
        render_line("x", RenderSettings(max_tokens=0), 32)


def test_a_missing_or_broken_font_is_named(tmp_path):
    from rot_vision.render import check_font

    with pytest.raises(ValueError, match=f"--font {tmp_path / 'no.ttf'} does not exist; give a .ttf/.otf file"):
        check_font(str(tmp_path / "no.ttf"))
    (tmp_path / "bad.ttf").write_bytes(b"not a font")
    with pytest.raises(ValueError, match=r"bad.ttf cannot be read as a font \(.*\); give a .ttf/.otf file"):
        check_font(str(tmp_path / "bad.ttf"))


def test_build_command_line_defaults_are_the_dataclass_defaults():
    """One source of defaults: `rot-render build` with no option builds what BuildConfig() and RenderSettings() say."""
    from dataclasses import fields

    import typer

    from rot_render.cli import app
    from rot_render.pipeline import BuildConfig

    options = {p.name: p.default for p in typer.main.get_command(app).commands["build"].params}
    config = {f.name: f.default for f in fields(BuildConfig) if f.name not in ("dataset", "out", "render", "attn_implementation")}
    render = {"height": "height", "font_size": "font_size", "padding": "padding", "font": "font_path",
              "thought_tags": "thought_tags", "max_tokens": "max_tokens"}
    assert set(options) == set(config) | set(render) | {"dataset", "out"}
    assert {name: options[name] for name in config} == config
    assert {name: options[name] for name in render} == {name: getattr(RenderSettings(), field) for name, field in render.items()}


def test_render_sizes_below_their_bound_are_refused_and_a_zero_height_is_not_the_default():
    """Found by the options fuzz: --font-size 0 failed inside a Ray render task, and --height 0 meant "one token row"."""
    from rot_vision.render import RenderSettings

    for settings, message in ((RenderSettings(font_size=0), "--font-size 0: use at least 1"),
                              (RenderSettings(height=0), "--height 0: use at least 1"),
                              (RenderSettings(padding=-1), "--padding -1: use 0 or more"),
                              (RenderSettings(max_tokens=0), "--max-tokens 0: use at least 1")):
        with pytest.raises(ValueError, match=message):
            settings.resolved(32)
    assert RenderSettings().resolved(32).height == 32

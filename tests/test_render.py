import subprocess

import numpy as np
import pytest
from PIL import Image

from rot_data.records import load_records
from rot_render.render import RenderSettings, line_text, missing_glyphs, render_line


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
    assert "tokens of 32 px" in result.stdout
    image = Image.open(out)
    assert image.size[1] == 32 and image.size[0] % 32 == 0

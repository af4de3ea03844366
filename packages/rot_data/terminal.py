"""Help text that keeps every option's name whole when it is piped (``rot-train stage2 --help | less``).

Why: rich lays help out at 80 columns when stdout is no terminal, and cuts long names (``--deepspeed-conf…``).
A terminal keeps its own width; ``TERMINAL_WIDTH`` still overrides both.
"""

from __future__ import annotations

import sys

PIPED_WIDTH = 140


def wide_help_when_piped() -> None:
    from typer import rich_utils

    if rich_utils.MAX_WIDTH is None and not sys.stdout.isatty():
        rich_utils.MAX_WIDTH = PIPED_WIDTH

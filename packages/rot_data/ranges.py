"""One rule for numeric options, shared by every config: a given 0 is a value, never "not given"; a value that makes
no sense is refused in one line naming the flag and what it accepts."""

from __future__ import annotations


def refuse_out_of_range(config, at_least_one: tuple = (), not_negative: tuple = (), optional: tuple = ()) -> None:
    """Raise ValueError for the first field of ``config`` below its bound (None, where allowed, is "not given")."""
    for names, lowest, what in ((at_least_one, 1, "at least 1"), (not_negative, 0, "0 or more")):
        for name in names:
            value = getattr(config, name)
            if value is not None and value < lowest:
                raise ValueError(f"--{name.replace('_', '-')} {value:g}: use {what}"
                                 + (" (leave it out for the default)" if name in optional else ""))

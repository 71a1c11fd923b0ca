"""The CLI's console: the terminal's width, or a wide one when output goes to a file or pipe."""

from __future__ import annotations

from rich.console import Console

#: Columns for output that is not a terminal (rich would assume 80 and cut report columns).
PIPE_WIDTH = 200


def make_console(*, stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)

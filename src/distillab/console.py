"""The consoles distillab prints through: rich's on a terminal; plain, whole lines on anything else.

Piped or redirected (`distillab train ... > log`), rich would wrap every line at 80 columns (or at the width of a
terminal elsewhere in the session) and squeeze tables until their cells wrap. `make_console` gives such output a
`PlainConsole` instead: no colour or cursor codes, no wrapping, tables at their natural width with their title and
caption on lines of their own, rules as short text lines. Spinners and progress bars already print nothing there.
Either console raises BrokenPipeError when its output is a pipe closed early (rich's own would exit with status 1),
so that the command line ends the same way whatever wrote last (cli.main).
"""

from __future__ import annotations

import copy
import errno
import os
from typing import Any

from rich.console import Console
from rich.rule import Rule
from rich.style import Style
from rich.table import Table
from rich.text import Text

PLAIN_WIDTH = 10_000  # wider than anything distillab prints: nothing wraps, nothing is cut
RULE_WIDTH = 80  # a rule's width in plain output (wider when its title needs it)


class BaseConsole(Console):
    """rich's console, except that a closed pipe raises BrokenPipeError rather than exiting."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more to write
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


class PlainConsole(BaseConsole):
    """A console for files and pipes: plain text, every line whole."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(width=PLAIN_WIDTH, soft_wrap=True, color_system=None, force_terminal=False,
                         force_interactive=False, force_jupyter=False, **kwargs)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """As rich prints, except that a table's title and caption are lines of their own, not wrapped to the
        table's width."""
        if not any(_annotated(obj) for obj in objects):
            super().print(*objects, **kwargs)
            return
        for obj in objects:
            if not _annotated(obj):
                super().print(obj, **kwargs)
                continue
            bare = copy.copy(obj)
            bare.title = bare.caption = None
            for part in (obj.title, bare, obj.caption):
                if part is not None and part != "":
                    super().print(part, **kwargs)

    def rule(self, title: str | Text = "", *, characters: str = "─", style: str | Style = "rule.line",
             align: str = "center") -> None:
        """A rule RULE_WIDTH wide (or as wide as its title needs), not the console's width."""
        text = self.render_str(title) if isinstance(title, str) else title
        width = max(RULE_WIDTH, text.cell_len + 8)
        self.print(Rule(title, characters=characters, style=style, align=align), width=width)  # type: ignore[arg-type]


def _annotated(obj: Any) -> bool:
    return isinstance(obj, Table) and bool(obj.title or obj.caption)


def make_console(*, stderr: bool = False, quiet: bool = False) -> Console:
    """rich's console where the output is a terminal (or a notebook, or FORCE_COLOR / TTY_COMPATIBLE=1 says to
    treat it as one); a `PlainConsole` anywhere else."""
    console = BaseConsole(stderr=stderr, quiet=quiet)
    if console.is_terminal or console.is_jupyter:
        return console
    return PlainConsole(stderr=stderr, quiet=quiet)

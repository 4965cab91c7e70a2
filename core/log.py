"""Rank-aware logging: one place decides who prints."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

from cliptune.runtime import rank  # the one rank lookup; `cliptune.log.rank` stays importable

_CONFIGURED = False


def get_logger(name: str) -> logging.Logger:
    """A logger under the `cliptune` hierarchy, with a rich handler installed once."""
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("cliptune")
        if not root.handlers:
            handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
            root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
        _CONFIGURED = True
    if not name.startswith("cliptune"):
        name = f"cliptune.{name}"
    return logging.getLogger(name)


def rank_zero_print(*args, **kwargs) -> None:
    """Print through rich on global rank zero only (tables, summaries)."""
    if rank() != 0:
        return

    Console().print(*args, **kwargs)


def rank_zero_info(msg: str, *args) -> None:
    if rank() == 0:
        get_logger("cliptune").info(msg, *args)


def rank_zero_warn(msg: str, *args) -> None:
    if rank() == 0:
        get_logger("cliptune").warning(msg, *args)

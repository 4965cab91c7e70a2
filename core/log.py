"""Rank-aware logging: one place decides who prints, and how the libraries a job loads log.

``get_logger`` is cliptune's logger, ``rank_zero_print`` prints tables and summaries on rank zero,
and ``configure_job_logging`` is what every CLI calls as its job starts: a newcomer's
``cliptune-train experiment=smoke > log.txt`` reads as cliptune's lines, Lightning's few useful ones
and the progress lines, whole and once each.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from rich.console import Console
from rich.logging import RichHandler

from cliptune.runtime import rank  # the one rank lookup; `cliptune.log.rank` stays importable

# Columns of a console that is not a terminal (a log file, nohup, CI): wide enough that rich never
# shortens a cell to "0.0…"; a table still takes only the width its cells need.
WIDE_CONSOLE = 10_000

_CONFIGURED = False


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


class _PlainHandler(logging.StreamHandler):
    """Timestamped plain lines on whatever ``sys.stdout`` is when a record arrives (a redirected
    file, a pipe, a test's capture): no wrapping at 80 columns, no terminal codes."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _console_handler() -> logging.Handler:
    """Rich in a terminal, plain lines otherwise; marked so that a later call can swap it."""
    if _stdout_is_terminal():
        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _PlainHandler()
    handler._cliptune_console = True  # type: ignore[attr-defined]  # our marker on a logging handler
    return handler


def _install_console_handler() -> None:
    """Replace cliptune's console handler by one that suits ``sys.stdout`` as it is now."""
    root = get_logger("cliptune")
    for h in [h for h in root.handlers if getattr(h, "_cliptune_console", False)]:
        root.removeHandler(h)
    root.addHandler(_console_handler())


def get_logger(name: str) -> logging.Logger:
    """A logger under the `cliptune` hierarchy, with a console handler installed once."""
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("cliptune")
        if not root.handlers:
            root.addHandler(_console_handler())
        root.setLevel(logging.INFO)
        root.propagate = False
        _CONFIGURED = True
    if not name.startswith("cliptune"):
        name = f"cliptune.{name}"
    return logging.getLogger(name)


def console() -> Console:
    """rich's console for ``sys.stdout`` as it is now; outside a terminal it is ``WIDE_CONSOLE`` columns wide,
    so tables print whole in log files (rich would otherwise cut every column to fit 80)."""
    c = Console()
    return c if c.is_terminal else Console(width=WIDE_CONSOLE)


def rank_zero_print(*args, **kwargs) -> None:
    """Print through rich on global rank zero only (tables, summaries), whole in any output."""
    if rank() != 0:
        return
    console().print(*args, **kwargs)


def rank_zero_info(msg: str, *args) -> None:
    if rank() == 0:
        get_logger("cliptune").info(msg, *args)


def rank_zero_warn(msg: str, *args) -> None:
    if rank() == 0:
        get_logger("cliptune").warning(msg, *args)


# ----------------------------------------------------------------------------------------------
# The libraries' logging in a CLI job

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPORT_ROW = re.compile(r"^(\S+)\s*\|\s*([A-Z][A-Z_ ]*[A-Z])\s*\|", re.M)
_OPEN_CLIP_DIR = f"{os.sep}open_clip{os.sep}"
# Lightning's loggers that print its "💡 Tip: try litlogger / litmodels" advertisements
_LIGHTNING_RANK_ZERO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                        "lightning_utilities.core.rank_zero", "pytorch_lightning.utilities.rank_zero",
                        "lightning_fabric.utilities.rank_zero")


class _DropOpenClipInfo(logging.Filter):
    """open_clip logs each step of building a model at INFO on the *root* logger (``logging.info``:
    "Parsing model identifier...", "Instantiating model architecture..."): dropped; its warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or _OPEN_CLIP_DIR not in record.pathname


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith("💡 Tip")


class _LoadReportAsOneLine(logging.Filter):
    """transformers' report on loading a pretrained tower (a table of checkpoint keys, e.g. BERT's
    ``pooler.dense.*`` marked UNEXPECTED because open_clip's text tower pools itself) becomes one
    cliptune line saying what was loaded and what was left out; a warning only when weights were
    initialised fresh (MISSING) or reshaped (MISMATCH)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = _ANSI.sub("", record.getMessage())
        if "LOAD REPORT" not in msg and not msg.startswith("Some weights of"):
            return True
        if rank() == 0:
            get_logger("cliptune").log(*_load_report_line(msg))
        return False


def _load_report_line(msg: str) -> tuple[int, str]:
    head = msg.splitlines()[0]
    m = re.match(r"\s*(\S+) LOAD REPORT from: (.*)", head)
    if not m:  # transformers < 5: "Some weights of X were not used when initializing Y: [...]"
        return logging.INFO, "transformers: " + (head if len(head) <= 300 else head[:300] + " ...")
    by_status: dict[str, list[str]] = {}
    for key, status in _REPORT_ROW.findall(msg):
        if key != "Key":
            by_status.setdefault(status.split()[0], []).append(key)
    parts = []
    names = {"UNEXPECTED": "checkpoint weight{s} this architecture does not use, left out",
             "MISSING": "weight{s} not in the checkpoint, initialised fresh",
             "MISMATCH": "weight{s} of another shape in the checkpoint, initialised fresh"}
    for status, keys in by_status.items():
        shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
        what = names.get(status, status.lower() + " weight{s}").format(s="s" if len(keys) > 1 else "")
        parts.append(f"{len(keys)} {what}: {shown}")
    level = logging.WARNING if set(by_status) - {"UNEXPECTED"} else logging.INFO
    loaded = f"pretrained {m.group(1)} loaded from {m.group(2).strip()}"
    return level, loaded + ("; " + "; ".join(parts) if parts else "")


_OPEN_CLIP_FILTER = _DropOpenClipInfo()
_TIPS_FILTER = _DropTips()
_LOAD_REPORT_FILTER = _LoadReportAsOneLine()


def _share_root_log_files(root: logging.Logger) -> None:
    """Hydra's job log file (cliptune-eval's ``<out>/eval.log``) is a FileHandler on the root logger,
    which cliptune's records never reach: its logger does not propagate (its own console handler).
    Give cliptune's logger the root's file handlers, and drop those of an earlier job (``-m``: Hydra
    closes them, and a closed FileHandler would reopen the previous job's file)."""
    own = get_logger("cliptune")
    for h in [h for h in own.handlers if getattr(h, "_cliptune_root_file", False) and h not in root.handlers]:
        own.removeHandler(h)
    for h in root.handlers:
        if isinstance(h, logging.FileHandler) and h not in own.handlers:
            h._cliptune_root_file = True  # type: ignore[attr-defined]  # our marker on a logging handler
            own.addHandler(h)


def configure_job_logging() -> None:
    """Set how a CLI job and the libraries it loads log. Every CLI calls it as its job starts, after
    the job's libraries are imported; calling it again changes nothing more.

    - cliptune's lines: rich in a terminal, plain timestamped lines otherwise (no wrapping at 80 columns).
    - open_clip's INFO lines on the root logger are dropped (see ``_DropOpenClipInfo``), its warnings kept.
    - transformers' load report of a pretrained tower becomes one cliptune line (``_LoadReportAsOneLine``);
      outside a terminal the Hugging Face progress bars ("Loading weights: 100%|...") are off.
    - Lightning: its "💡 Tip" advertisements are dropped, and each of its lines prints once (its
      ``lightning`` logger has its own stderr handler besides the root's, so every line came twice).
    - Two warnings nothing in a run can act on are ignored: Lightning 2.6 calling a pytree check that
      torch deprecates, and "Found N module(s) in eval mode" (a locked tower is kept in eval mode on
      purpose: no dropout, frozen statistics, cacheable features).
    """
    _install_console_handler()
    root = logging.getLogger()
    _share_root_log_files(root)
    root.addFilter(_OPEN_CLIP_FILTER)  # a no-op when already there
    for name in _LIGHTNING_RANK_ZERO:  # filters on a logger object hold whenever the library imports it
        logging.getLogger(name).addFilter(_TIPS_FILTER)
    logging.getLogger("transformers.modeling_utils").addFilter(_LOAD_REPORT_FILTER)
    if root.handlers:  # Hydra's job logging: Lightning's lines reach it (and a run's log file) through the root
        lightning = logging.getLogger("lightning")
        for h in [h for h in lightning.handlers if type(h) is logging.StreamHandler]:
            lightning.removeHandler(h)
        lightning.propagate = True
    if not _stdout_is_terminal():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
        for name, fn in (("transformers.utils.logging", "disable_progress_bar"),
                         ("huggingface_hub.utils", "disable_progress_bars")):
            module = sys.modules.get(name)  # already imported: tell it directly (never import it just for this)
            if module is not None and hasattr(module, fn):
                getattr(module, fn)()
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # the module moves its batches itself on purpose (it records the stream position first)
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device`")

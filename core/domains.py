"""What values a setting may take: numeric ranges (:class:`Num`) and the option names of each choice.

One home for each domain. The schemas (``cliptune.config``) carry their fields' ranges in
``field(metadata=...)`` built from :class:`Num`; the validator (``cliptune.validate``) reads them
and the option tuples below; the code that consumes a value (the loss, the optimiser, the module,
the augmentation) imports its own tuple from here. No imports: the CLIs check a config before
torch is loaded, and the losses stay free of any framework.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEDULES = ("cosine", "constant")  # optim.schedule: cliptune.train.optim.lr_lambda
POSITIVES = ("pair", "group")  # loss.fn.positives: cliptune.train.losses
TOWERS = ("image", "text")  # lora.towers: cliptune.lora
ON_NONFINITE = ("error", "skip")  # on_nonfinite: cliptune.train.module.ContrastiveModule
DISTILL_OBJECTIVES = ("mse", "cosine")  # objective of cliptune-distill: cliptune.train.distill.distill_loss
EVAL_PRECISIONS = ("auto", "bf16", "fp32")  # precision of cliptune-eval: cliptune.eval.runner
WISEFT_SELECT = ("domain", "sum")  # select of cliptune-wiseft (or one of its alphas): cliptune.eval.wiseft
AUGMENT_PRESETS = ("none", "light", "strong")  # data.augment: cliptune.data.augment
AUGMENT_FLIP: tuple[str | bool, ...] = ("auto", True, False)  # data.augment_flip: cliptune.data.augment
EVAL_SPLITS = ("val", "test", "validation")  # the splits an evaluation set is read from: cliptune.data.langs


def show_value(v: Any) -> str:
    """A value as it would be typed on the command line."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(show_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {show_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Num:
    """A finite number in a range: ``lo``/``hi`` bounds (``open`` ends exclude them), ``integer``
    rejects floats, ``null`` also allows null, ``also`` lists extra allowed values (e.g. -1)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    null: bool = False
    also: tuple[Any, ...] = ()

    def ok(self, v: Any, typed: bool = False) -> bool:
        """``v`` is allowed; ``typed``: a schema has checked its type already, check only the range."""
        if v is None:
            return self.null
        if not typed and not (is_int(v) if self.integer else is_number(v)):
            return False
        if any(v == a and type(v) is type(a) for a in self.also):
            return True
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def range(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {_fmt(lo)}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {_fmt(hi)}"
        return ""

    def describe(self, v: Any) -> str:
        r = self.range()
        if self.integer:
            main = f"an int {r}".rstrip()
        elif is_number(v) and not math.isfinite(v):
            main = f"a finite number {r}".rstrip()
        elif is_number(v) or v is None:
            main = r or "a finite number"
        else:
            main = f"a number {r}".rstrip()
        alts = (["null"] if self.null else []) + [show_value(a) for a in self.also]
        return "must be " + " or ".join(alts + [main])

    def placeholder(self) -> str:
        noun = "int" if self.integer else "float"
        if self.lo == 0 and self.lo_open and self.hi is None:
            text = f"<positive {noun}>"
        else:
            r = self.range()
            text = f"<{noun} {r}>" if r else f"<{noun}>"
        return " or ".join([text] + [show_value(a) for a in self.also] + (["null"] if self.null else []))


POS_INT = Num(lo=1, integer=True)
NONNEG_INT = Num(lo=0, integer=True)
POS_FLOAT = Num(lo=0, lo_open=True)


@dataclass(frozen=True)
class Domain:
    """What ``cliptune.validate`` checks of a schema field (``field(metadata={"domain": Domain(...)})``):
    a range (``num``), a set of options (``choices``) or a fixed-length list of numbers each in ``each``;
    ``example`` is the value the fix suggests, ``why`` what the value means."""

    example: str
    num: Num | None = None
    choices: tuple[Any, ...] = ()
    each: Num | None = None
    why: str | None = None


def domain(default: Any, example: str, num: Num | None = None, choices: tuple[Any, ...] = (),
           each: Num | None = None, why: str | None = None) -> Any:
    """A schema field with its default and its :class:`Domain`."""
    return field(default=default, metadata={"domain": Domain(example, num, choices, each, why)})

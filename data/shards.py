"""``cliptune-shards``: image-text data -> webdataset shards + ``<split>.json`` index (the shard format).

The command only: reading inputs is :mod:`cliptune.data.inputs`, writing is :mod:`cliptune.data.writer`
(:func:`~cliptune.data.writer.build_shards` with a :class:`~cliptune.data.writer.ShardSettings`).

    cliptune-shards pairs.csv --out shards/ --val-fraction 0.05 --group-key album
    cliptune-shards pairs.tsv --out shards/ --caption-col caption,caption_zh:zh --image-size 384
    cliptune-shards pairs.jsonl --out shards/ --image-format webp --quality 90 --workers 8
    cliptune-shards photos/ --out shards/          # images with same-stem .txt / .json sidecars
    cliptune-shards classes/ --out shards/         # FLYP: class subfolders, captions from templates
    cliptune-shards heldout.csv --out eval_sets/heldout --split val   # an evaluation-only set
    cliptune-shards tiny.csv --out /tmp/s --image-size 64 --shard-size 100 --workers 2   # CPU-sized

Inputs: CSV/TSV (header row), JSONL (or a .json list of objects), parquet, or a folder. Image
paths are relative to the input file (``--image-root`` overrides); parquet may also hold image
bytes (Hugging Face style ``{"bytes": ..., "path": ...}``). A caption cell is a string, a list,
or a dict by language (``{"en": [...], "zh": [...]}``; in CSV/TSV written as JSON); a caption
column named ``col:lang`` gives its plain strings that language, else ``--lang``. ``label``,
``group`` and ``neg`` (hard-negative captions, same forms) are optional; every other column is
kept in the sample json's ``meta``.

Images: decoded, EXIF-rotated, alpha flattened onto white, and downscaled so that the *shorter*
side is ``--image-size`` (aspect kept, never upscaled; 0 keeps the size), then encoded as
``--image-format``. An image that needs no change and is already in the target format is copied
byte for byte (no second JPEG generation).

Split: ``--val-fraction`` of the split keys (``--group-key``: ``group`` by default, ``label``,
any extra column, or ``sample``) go to ``val``, each key's side chosen by a hash of (seed, key):
groups never straddle, and adding data does not move existing groups. For class folders (FLYP)
the default key is ``sample`` (a split by class would leave val classes unseen in training).
An evaluation-only set goes wholly to ``val`` (``--split val``, or ``--val-fraction 1``): its folder
then holds ``val-*.tar`` and ``val.json`` only, and is read as a set of cliptune-eval's ``sets`` or
a training run's ``data.val.<name>`` (named after the folder), never as ``data.train``.
``--split train`` puts everything in train.

Resume: shards are written to ``.<name>.<pid>.tmp`` (the writing process's pid) and renamed; a
small done record per shard (in ``OUT/.cliptune-shards/``) holds a fingerprint of its samples and
the options. Shards are byte-deterministic, so re-running the same command after any interruption
(Ctrl-C, SIGKILL) skips finished shards, removes leftover temp files of dead processes and
rewrites only what is missing: the result equals an uninterrupted run. Worker processes end with
the writer (Linux: PR_SET_PDEATHSIG; elsewhere a thread that watches the parent pid), so a killed
run leaves nothing writing behind it.

One folder, one writer, one dataset: a writer holds ``OUT/.lock`` (an flock the kernel drops when
it dies), so a second one on the same ``--out`` refuses at once, naming the first one's PID. Shards
of another dataset (other input or options; the plan is recorded in ``OUT/.cliptune-shards/``) are
never mixed with or silently replaced: that needs ``--overwrite``, which removes the old shards,
indexes and done records first and rewrites everything (also needed if image files changed in
place). The ``<split>.json`` index is written last; the reader refuses a folder of writer shards
without it (a killed run: re-run the same command).

Bad inputs (missing, unreadable or corrupt images, empty captions, a row repeating an earlier
row's image and captions) are skipped, counted by reason with examples in the index and the
printed summary; a run that writes no sample at all fails (exit 2) with the reasons. Images and caption
sidecars are read only from regular files of at most ``--max-image-bytes``: a device (``/dev/zero``), a FIFO, a
directory or a larger file is skipped as "not a regular file" or "file too large". Input that
cannot be parsed (a bad CSV row, an over-long field, an invalid JSON line, bytes that are not
UTF-8, a lone surrogate) or a missing column is an error naming the file and line or the columns.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cliptune.data.inputs import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_TEMPLATES, InputError
from cliptune.data.writer import IMAGE_FORMATS, MAX_IMAGE_SIZE, MAX_WORKERS, SPLITS, ShardSettings, build_shards
from cliptune.log import configure_job_logging, get_logger

log = get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# CLI


def _int_in(low: int, high: int) -> Any:
    """An argparse type: an int in [low, high]; argparse names the flag in its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cliptune-shards",
        description="Write webdataset shards (+ <split>.json indexes) from CSV/TSV/JSONL/parquet or an image folder.",
    )  # each default is said once, in its help: "(default: ...)"
    p.add_argument("input", help="a .csv/.tsv/.jsonl/.json/.parquet file or an image folder")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_argument_group("split")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of split keys that go to val; 1: an evaluation-only set, like --split val "
                        "(default: %(default)s)")
    g.add_argument("--group-key", default=None,
                   help="what keeps samples together in one split: group, label, sample or an extra column "
                        "(default: group; sample for class folders)")
    g.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    g.add_argument("--split", choices=SPLITS, default=None,
                   help="write every record to this split (val: an evaluation-only set); excludes --val-fraction")
    g = p.add_argument_group("images and shards")
    g.add_argument("--image-size", type=_int_in(0, MAX_IMAGE_SIZE), default=512,
                   help="shorter side in px, downscale only; 0 keeps the size (default: %(default)s)")
    g.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpg",
                   help="format of the stored images (default: %(default)s)")
    g.add_argument("--quality", type=int, default=95, help="jpg/webp quality (default: %(default)s)")
    g.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help="larger image or caption files are skipped, as are devices, FIFOs, directories "
                        "(default: %(default)s)")
    g.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
    g.add_argument("--workers", type=_int_in(1, MAX_WORKERS), default=None,
                   help=f"processes, 1 to {MAX_WORKERS} (default: min(8, cpus))")
    g.add_argument("--overwrite", action="store_true",
                   help="remove the shards and indexes already in --out, then write every shard (no resume); "
                        "needed to write another dataset there")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("fields")
    g.add_argument("--format", dest="input_format", choices=("csv", "tsv", "jsonl", "json", "parquet", "folder"),
                   help="input type (default: from the extension)")
    g.add_argument("--image-col", help="image path column (default: image)")
    g.add_argument("--caption-col", action="append",
                   help="caption column(s); repeat or comma list; 'col:lang' sets the language (default: caption)")
    g.add_argument("--label-col", help="label column (default: label, optional)")
    g.add_argument("--group-col", help="group column (default: group, optional)")
    g.add_argument("--neg-col", help="hard-negative captions column (default: neg, optional)")
    g.add_argument("--sep", help="CSV/TSV separator (default: from the extension; '\\t' works)")
    g.add_argument("--lang", default="en", help="language of captions given without one (default: %(default)s)")
    g.add_argument("--image-root", help="base folder for relative image paths (default: the input's folder)")
    g.add_argument("--labels-from-folders", action=argparse.BooleanOptionalAction, default=None,
                   help="class subfolders -> label and prompt captions (FLYP); default: when no sidecars")
    g.add_argument("--templates", action="append",
                   help=f"prompt template with {{c}} (repeat) or a file with one per line "
                        f"(default: {list(DEFAULT_TEMPLATES)})")
    return p


def _load_templates(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    if len(values) == 1 and Path(values[0]).is_file():
        return [ln.strip() for ln in Path(values[0]).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """``cliptune-shards``: returns 0 on success, 2 for input errors (message logged)."""
    args = _parser().parse_args(argv)
    configure_job_logging()
    try:
        settings = ShardSettings(
            val_fraction=args.val_fraction, split=args.split, group_key=args.group_key, seed=args.seed,
            image_size=args.image_size, image_format=args.image_format, quality=args.quality,
            max_image_bytes=args.max_image_bytes, shard_size=args.shard_size, workers=args.workers,
            overwrite=args.overwrite, progress=not args.no_progress, input_format=args.input_format, lang=args.lang,
            image_col=args.image_col, caption_col=args.caption_col, label_col=args.label_col,
            group_col=args.group_col, neg_col=args.neg_col, sep=args.sep, templates=_load_templates(args.templates),
            labels_from_folders=args.labels_from_folders, image_root=args.image_root,
        )
        build_shards(args.input, args.out, settings)
    except (InputError, ValueError) as e:
        log.error("cliptune-shards: %s", e)
        return 2
    except KeyboardInterrupt:
        log.error("cliptune-shards: interrupted; run the same command again to resume (finished shards are kept)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

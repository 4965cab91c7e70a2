"""Tiny shards in the cliptune shard format, written directly with webdataset.TarWriter.

Independent of the real writer (data/writer.py) so reader tests pin the format itself.
"""

from __future__ import annotations

import io
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms

from cliptune.data.wds import DecodeSettings, LoaderSettings, make_train_loader

CONTEXT = 24  # token length of the char tokenizer


def char_tokenizer(texts: list[str]) -> torch.Tensor:
    """Trivial reversible tokenizer: unicode code points, zero padded to CONTEXT."""
    out = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
    for i, t in enumerate(texts):
        codes = [ord(c) for c in t[:CONTEXT]]
        out[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
    return out


def untokenize(tokens: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in tokens if int(c) != 0)


def tiny_transform() -> transforms.Compose:
    return transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])


def image_bytes(i: int, fmt: str = "jpeg", size: int = 20) -> bytes:
    img = Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_sample(
    key: str,
    captions: dict[str, list[str]] | None = None,
    *,
    i: int = 0,
    ext: str = "jpg",
    image: bytes | None = None,
    txt: str | None = "",
    group: str | None = None,
    label: Any = None,
    neg: dict[str, list[str]] | None = None,
    with_json: bool = True,
    raw_json: bytes | None = None,
) -> dict[str, Any]:
    """One tar sample as the writer produces it (``txt=""`` means: first caption)."""
    captions = captions if captions is not None else {"en": [f"cap {key}"]}
    sample: dict[str, Any] = {"__key__": key}
    if ext:
        sample[ext] = image if image is not None else image_bytes(i, "png" if ext == "png" else "jpeg")
    if txt == "" and captions:
        txt = next(iter(captions.values()))[0]
    if txt:
        sample["txt"] = txt.encode("utf-8")
    if raw_json is not None:
        sample["json"] = raw_json
    elif with_json:
        meta = {"id": key, "captions": captions, "label": label, "group": group, "meta": {}}
        if neg is not None:
            meta["neg"] = neg
        sample["json"] = json.dumps(meta).encode("utf-8")
    return sample


def basic_samples(n: int, prefix: str = "s", langs: tuple[str, ...] = ("en",)) -> list[dict[str, Any]]:
    """n samples, caption per language 'cap <key> <lang>'."""
    return [
        make_sample(f"{prefix}{i:05d}", {lang: [f"{prefix}{i:05d} {lang}"] for lang in langs}, i=i)
        for i in range(n)
    ]


def write_shards(
    out_dir: str | Path,
    samples: list[dict[str, Any]],
    per_shard: int,
    split: str = "train",
    index: bool = True,
) -> list[Path]:
    """Write ``<split>-%06d.tar`` shards (+ ``<split>.json`` index) and return the shard paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, counts = [], []
    for s in range(0, len(samples), per_shard):
        path = out / f"{split}-{s // per_shard:06d}.tar"
        chunk = samples[s : s + per_shard]
        with wds.TarWriter(str(path)) as w:
            for sample in chunk:
                w.write(sample)
        paths.append(path)
        counts.append(len(chunk))
    if index:
        langs: dict[str, int] = {}
        for sample in samples:
            if "json" in sample:
                try:
                    for lang in json.loads(sample["json"]).get("captions", {}):
                        langs[lang] = langs.get(lang, 0) + 1
                except ValueError:
                    pass
        (out / f"{split}.json").write_text(
            json.dumps(
                {
                    "split": split,
                    "num_samples": len(samples),
                    "shards": [{"name": p.name, "num_samples": n} for p, n in zip(paths, counts)],
                    "languages": langs,
                    "skipped": {},
                    "args": {},
                }
            )
        )
    return paths


def keys_in(samples: list[dict[str, Any]]) -> list[str]:
    return [s["__key__"] for s in samples]


def copy_tree_to_fsspec(src_dir: str | Path, url: str) -> None:
    """Copy every file of ``src_dir`` to the fsspec directory ``url`` (e.g. ``memory://bucket``)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    for path in sorted(Path(src_dir).iterdir()):
        with fs.open(f"{root.rstrip('/')}/{path.name}", "wb") as f:
            f.write(path.read_bytes())


def train_loader(spec: Any, batch_size: int, tokenizer: Any = char_tokenizer, transform: Any = None, **kw: Any) -> Any:
    """``make_train_loader`` with its settings given as keywords: the call's own (rank, world_size, epoch_fn,
    what), then :class:`DecodeSettings` fields, the rest :class:`LoaderSettings` fields."""
    call = {k: kw.pop(k) for k in ("rank", "world_size", "epoch_fn", "what") if k in kw}
    decode = DecodeSettings(**{k: kw.pop(k) for k in [f.name for f in fields(DecodeSettings)] if k in kw})
    settings = LoaderSettings(batch_size, decode=decode, **kw)
    return make_train_loader(spec, settings, tokenizer, transform or tiny_transform(), **call)

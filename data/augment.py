"""Training-image augmentation presets for robustness to style shifts (``data.augment``).

    cliptune-train experiment=demo data.augment=strong          # crop, colour, grayscale, blur, TrivialAugment
    cliptune-train experiment=demo data.augment=light data.augment_flip=auto

The augmentation runs in the loader workers on the decoded PIL image, before the model's own
training transform (open_clip's ``preprocess_train``: resize / crop / normalise), so the tensor that
comes out has the size the model expects whatever the preset. It draws only from torch's RNG, which
:func:`cliptune.data.decode.seeded_transform` seeds per sample from the sample's place in the stream:
the same stream position gives the same augmented image, and a resumed run augments exactly as the
original would have. Evaluation images are never augmented.

Presets (torchvision.transforms.v2; the crop keeps the image's own size, the model resizes after):

- ``none``   nothing: the model's transform alone, exactly as without this module
- ``light``  random resized crop (area 0.6-1) and a mild colour jitter
- ``strong`` random resized crop (area 0.35-1), TrivialAugmentWide, colour jitter (p 0.8),
  grayscale (p 0.2) and Gaussian blur (sigma 0.1-2 px, p 0.5)

Horizontal flips (``data.augment_flip``) are separate because a mirror image can change what a
caption says: ``false`` (the default) never flips; ``true`` flips half of the images; ``auto`` flips
half of the images of samples none of whose texts (captions and hard negatives, every language)
mention a direction (:func:`mentions_direction`: left/right, clockwise, east/west, 左/右, ...). The
default is off because no word list sees every case: in the bundled emoji domain the mirror image of
"play button" is "reverse button", and flags and text read wrongly mirrored, with no direction word
in their names. Use ``auto`` on photographs with free-text captions, ``true`` where nothing is chiral.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import RandomResizedCrop as _CropParams  # its get_params is public (v1 API)
from torchvision.transforms.v2 import functional as TF

from cliptune.domains import AUGMENT_FLIP, AUGMENT_PRESETS
from cliptune.log import get_logger

__all__ = ["FLIP_MODES", "PRESETS", "Augment", "RandomGaussianBlur", "ResizedCropSameSize", "build_augment",
           "check_flip", "check_preset", "mentions_direction"]

log = get_logger(__name__)

PRESETS = AUGMENT_PRESETS  # data.augment
FLIP_MODES = AUGMENT_FLIP  # data.augment_flip

# Words whose meaning a mirror image flips. Latin words are matched whole (letters on neither side,
# so "left_arrow" and "left-facing" count, "bright" and "copyright" do not); CJK characters anywhere.
_DIRECTION_WORDS = (
    "left", "right", "leftward", "leftwards", "rightward", "rightwards", "clockwise", "counterclockwise",
    "counter-clockwise", "anticlockwise", "anti-clockwise", "east", "west", "eastward", "westward",
    "mirrored", "gauche", "droite", "izquierda", "derecha", "links", "rechts",
)
_DIRECTION_CJK = ("左", "右", "顺时针", "逆时针", "順時針", "逆時針", "왼쪽", "오른쪽")
_DIRECTION = re.compile(
    r"(?<![^\W\d_])(?:" + "|".join(re.escape(w) for w in sorted(_DIRECTION_WORDS, key=len, reverse=True))
    + r")(?![^\W\d_])|" + "|".join(map(re.escape, _DIRECTION_CJK)),
    re.IGNORECASE,
)


def mentions_direction(texts: Iterable[str]) -> bool:
    """True when any text names a direction a horizontal flip would reverse (``"arrow pointing left"``,
    ``"counterclockwise arrows"``, ``"向右箭头"``)."""
    return any(_DIRECTION.search(t) for t in texts if isinstance(t, str))


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"data.augment={preset!r} is not a preset; choose one of {', '.join(PRESETS)} "
                         "(none: the model's transform only)")
    return preset


def check_flip(flip: str | bool) -> str | bool:
    """``"auto"``, True or False (the strings ``"true"`` / ``"false"`` are read as the booleans)."""
    if isinstance(flip, str) and flip.lower() in ("true", "false"):
        flip = flip.lower() == "true"
    if not any(flip == m and type(flip) is type(m) for m in FLIP_MODES):
        raise ValueError(f"data.augment_flip={flip!r}: choose auto, true or false (auto: flip only samples whose "
                         "captions name no direction)")
    return flip


class ResizedCropSameSize:
    """A random crop of ``scale`` of the area (aspect ratio in ``ratio``), resized back to the input's size."""

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.scale, self.ratio = scale, ratio

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, h, w = _CropParams.get_params(img, list(self.scale), list(self.ratio))  # torch RNG
        return TF.resized_crop(img, top, left, h, w, [img.height, img.width],
                               interpolation=InterpolationMode.BICUBIC, antialias=True)

    def __repr__(self) -> str:
        return f"resized crop (area {self.scale[0]:g}..{self.scale[1]:g}, same size)"


class RandomGaussianBlur:
    """PIL's Gaussian blur with sigma drawn from ``sigma`` (torch RNG); on small PIL images about 100x
    faster than torchvision's GaussianBlur, which converts to a tensor and convolves."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        radius = float(torch.empty(()).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius))  # PIL's radius is the standard deviation

    def __repr__(self) -> str:
        return f"gaussian blur (sigma {self.sigma[0]:g}..{self.sigma[1]:g})"


def _ops(preset: str) -> list[Callable[[Image.Image], Image.Image]]:
    if preset == "light":
        return [ResizedCropSameSize((0.6, 1.0)),
                v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)]
    if preset == "strong":
        return [
            ResizedCropSameSize((0.35, 1.0)),
            v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=0.5),
        ]
    return []


def _describe(op: object) -> str:
    if isinstance(op, v2.RandomApply):
        inner = ", ".join(_describe(t) for t in op.transforms)
        return f"{inner} p={op.p:g}"
    if isinstance(op, v2.ColorJitter):
        parts = [f"{k} {v[0]:g}..{v[1]:g}" for k in ("brightness", "contrast", "saturation", "hue")
                 if (v := getattr(op, k)) is not None]
        return f"colour jitter ({', '.join(parts)})"
    if isinstance(op, v2.RandomGrayscale):
        return f"grayscale p={op.p:g}"
    if isinstance(op, v2.TrivialAugmentWide):
        return "TrivialAugmentWide"
    return repr(op)


class Augment:
    """A preset's image augmentation: ``augment(img, texts) -> img`` (PIL in, PIL out, same size).

    ``texts`` are the sample's captions and hard negatives; with ``flip="auto"`` they decide whether
    the image may be mirrored. Every random draw is from torch's RNG (seeded per sample by the loader).
    """

    def __init__(self, preset: str = "none", flip: str | bool = False) -> None:
        self.preset = check_preset(preset)
        self.flip = check_flip(flip)
        self.ops = _ops(self.preset)

    def flip_allowed(self, texts: Sequence[str] = ()) -> bool:
        return self.flip is True or (self.flip == "auto" and not mentions_direction(texts))

    def __call__(self, img: Image.Image, texts: Sequence[str] = ()) -> Image.Image:
        for op in self.ops:
            img = op(img)
        # drawn last, and only when flips are on: the other draws are the same whatever data.augment_flip says
        if self.flip is not False and bool(torch.rand(()) < 0.5) and self.flip_allowed(texts):
            img = TF.horizontal_flip(img)
        return img

    def describe(self) -> str:
        """One line for the run log: ``data.augment=light: resized crop (...) > colour jitter (...); flip: off``."""
        steps = [_describe(op) for op in self.ops] or ["no augmentation"]
        flip = {False: "off", True: "p=0.5",
                "auto": "p=0.5 unless a caption or negative names a direction (left, right, clockwise, 左, 右, ...)"}
        return (f"data.augment={self.preset}: {' > '.join(steps)}; horizontal flip (data.augment_flip="
                f"{str(self.flip).lower()}): {flip[self.flip]}; then the model's training transform")

    def __repr__(self) -> str:
        return f"Augment(preset={self.preset!r}, flip={self.flip!r})"


def build_augment(preset: str = "none", flip: str | bool = False) -> Augment | None:
    """The :class:`Augment` for ``data.augment`` / ``data.augment_flip``; None when it would do nothing
    (``none`` without flips), so the loader runs the model's transform exactly as before."""
    aug = Augment(preset, flip)
    return None if not aug.ops and aug.flip is False else aug

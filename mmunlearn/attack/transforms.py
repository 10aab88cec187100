"""Rephrased pictures for the image probe of ``mmunlearn attack``: the same forget picture
cropped, colour-jittered, blurred, posterised or made grey, deterministically from a seed.

Every transform keeps the picture's size (and its mode, for RGB / L / RGBA pictures; other
modes come back RGB), so the model's processor sees an input of the same shape; the random
parameters of picture ``index`` come from ``random.Random(f"{seed}:{name}:{index}")``, so one
picture's draw depends on nothing else in the run. The ranges follow the usual augmentation
settings (torchvision's ``RandomResizedCrop`` / ``ColorJitter`` / ``GaussianBlur``), taken
milder so that a person stays recognisable to a model that still knows them:

- ``crop``: a crop of 60–85 % of the area, aspect ratio 3/4–4/3 (log-uniform), anywhere in the
  picture, resized back to the full size (bicubic);
- ``jitter``: brightness, contrast and saturation each scaled by a factor in [0.6, 1.4]
  (:mod:`PIL.ImageEnhance`, in that order);
- ``blur``: a Gaussian blur of radius (σ) 1–3 % of the shorter side, at least 0.5 px;
- ``posterize``: 3 bits per channel (:func:`PIL.ImageOps.posterize`; no randomness);
- ``greyscale``: ITU-R 601-2 luma in all three channels (:func:`PIL.ImageOps.grayscale`;
  no randomness): the style change.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

TRANSFORMS = ("crop", "jitter", "blur", "posterize", "greyscale")
CROP_AREA = (0.60, 0.85)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = (0.6, 1.4)
BLUR_SIGMA = (0.01, 0.03)  # of the shorter side
POSTERIZE_BITS = 3
_KEEP_MODES = ("RGB", "L", "RGBA")


def _crop(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    area = w * h * rng.uniform(*CROP_AREA)
    ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    cw = max(1, min(w, round(math.sqrt(area * ratio))))
    ch = max(1, min(h, round(math.sqrt(area / ratio))))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)


def _jitter(img: Image.Image, rng: random.Random) -> Image.Image:
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(*JITTER))
    return img


def _blur(img: Image.Image, rng: random.Random) -> Image.Image:
    sigma = max(0.5, rng.uniform(*BLUR_SIGMA) * min(img.size))
    return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def _posterize(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.posterize(img, POSTERIZE_BITS)


def _greyscale(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


_FNS = {
    "crop": _crop,
    "jitter": _jitter,
    "blur": _blur,
    "posterize": _posterize,
    "greyscale": _greyscale,
}


def rephrase(image: Image.Image, name: str, seed: int = 0, index: int | str = 0) -> Image.Image:
    """``image`` under transform ``name`` (one of :data:`TRANSFORMS`), its random parameters
    drawn from ``(seed, name, index)``; a new picture of the same size (and mode: module
    docstring). ValueError for an unknown name."""
    if name not in _FNS:
        raise ValueError(f"unknown image transform {name!r}; choose from {', '.join(TRANSFORMS)}")
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    rng = random.Random(f"{seed}:{name}:{index}")
    out = _FNS[name](image.convert("RGB"), rng)
    mode = image.mode if image.mode in _KEEP_MODES else "RGB"
    if mode == "RGBA":  # the transforms act on the colours; the alpha channel is kept
        out = out.convert("RGBA")
        out.putalpha(image.getchannel("A"))
        return out
    return out.convert(mode)


def rephrased_items(samples, name: str, seed: int = 0) -> list:
    """Copies of ``samples`` whose picture (or every picture of a list) is under transform
    ``name``; item ``i``'s draw is ``rephrase(..., index=i)`` (picture ``j`` of a list:
    ``index=f"{i}.{j}"``). Text-only items are copied unchanged."""
    out = []
    for i, s in enumerate(samples):
        img = s.image
        if isinstance(img, (list, tuple)):
            img = [rephrase(x, name, seed, f"{i}.{j}") for j, x in enumerate(img)]
        elif img is not None:
            img = rephrase(img, name, seed, i)
        out.append(replace(s, image=img))
    return out


__all__ = ["TRANSFORMS", "rephrase", "rephrased_items"]

"""Procedurally drawn portraits of fictitious people (the synthetic benchmark's pictures).

A portrait is a face-like layout of coloured shapes (background, shirt, hair, face, eyes, mouth,
badge) whose colours, sizes and positions are drawn per person (:func:`appearance`); every
picture is a variant of it (:func:`variant`): shifted by up to ``pad`` px, with a brightness
jitter and pixel noise. Everything is seeded through numpy ``SeedSequence`` streams
(:func:`seeded_rng`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def appearance(rng: np.random.Generator) -> dict:
    """Portrait parameters of one person (plain Python floats/lists)."""

    def col(lo=0.0, hi=1.0):
        return [float(x) for x in rng.uniform(lo, hi, 3)]

    return {
        "background": col(0.05, 0.95),
        "shirt": col(),
        "hair": col(0.0, 0.85),
        "skin": col(0.25, 1.0),
        "eyes": col(),
        "mouth": col(),
        "badge": col(),
        "hair_style": int(rng.integers(4)),
        "face_cy": float(rng.uniform(0.47, 0.56)),
        "face_rx": float(rng.uniform(0.22, 0.33)),
        "face_ry": float(rng.uniform(0.28, 0.38)),
        "eye_dx": float(rng.uniform(0.08, 0.15)),
        "eye_dy": float(rng.uniform(-0.12, -0.02)),
        "eye_r": float(rng.uniform(0.04, 0.065)),
        "mouth_w": float(rng.uniform(0.08, 0.22)),
        "mouth_dy": float(rng.uniform(0.12, 0.22)),
        "badge_x": float(rng.choice([0.12, 0.88])),
        "badge_y": float(rng.uniform(0.1, 0.3)),
    }


def draw_portrait(appearance: Mapping, size: int = 32, pad: int = 0) -> np.ndarray:
    """The person's base portrait as a float32 ``(size + 2·pad, size + 2·pad, 3)`` array in
    [0, 1]; the central ``size × size`` window is the unshifted picture, the ``pad`` border lets
    variants shift without an empty edge."""
    a = appearance
    n = size + 2 * pad
    # pixel-centre coordinates in units of the picture side; the picture spans [0, 1]
    c = (np.arange(n, dtype=np.float32) - pad + 0.5) / size
    v, u = np.meshgrid(c, c, indexing="ij")
    img = np.empty((n, n, 3), np.float32)
    img[:] = a["background"]

    def paint(mask, colour):
        img[mask] = colour

    cy, rx, ry = a["face_cy"], a["face_rx"], a["face_ry"]
    face = ((u - 0.5) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0
    paint((v > cy + 0.75 * ry) & (np.abs(u - 0.5) < 0.42), a["shirt"])
    style = a["hair_style"]
    if style == 0:  # short cap of hair
        hair = (((u - 0.5) / (rx * 1.12)) ** 2 + ((v - cy) / (ry * 1.1)) ** 2 <= 1.0) & (
            v < cy - 0.2 * ry
        )
    elif style == 1:  # long hair framing the face
        hair = (((u - 0.5) / (rx * 1.3)) ** 2 + ((v - cy + 0.05) / (ry * 1.15)) ** 2 <= 1.0) & (
            v < cy + 0.7 * ry
        )
    elif style == 2:  # tall hair
        hair = ((u - 0.5) / (rx * 0.9)) ** 2 + ((v - cy + 0.6 * ry) / (ry * 0.75)) ** 2 <= 1.0
    else:  # side-swept
        hair = (((u - 0.45) / (rx * 1.2)) ** 2 + ((v - cy) / (ry * 1.1)) ** 2 <= 1.0) & (
            v < cy - 0.1 * ry + 0.3 * (u - 0.5)
        )
    paint(hair, a["hair"])
    # the face, with the hair on top of its upper part for the cap and side styles
    paint(face & ~(hair & (v < cy - 0.45 * ry)) if style in (0, 3) else face, a["skin"])
    ey, er = cy + a["eye_dy"], a["eye_r"]
    for ex in (0.5 - a["eye_dx"], 0.5 + a["eye_dx"]):
        paint((u - ex) ** 2 + (v - ey) ** 2 <= er * er, a["eyes"])
    paint(
        (np.abs(u - 0.5) < a["mouth_w"] / 2) & (np.abs(v - cy - a["mouth_dy"]) < 0.035), a["mouth"]
    )
    paint((u - a["badge_x"]) ** 2 + (v - a["badge_y"]) ** 2 <= 0.07**2, a["badge"])
    return img


def variant(
    base: np.ndarray, size: int, pad: int, rng: np.random.Generator, brightness: float, noise: float
) -> Image.Image:
    """One picture: a shifted window of ``base`` with brightness jitter and Gaussian noise."""
    dy, dx = (int(x) for x in rng.integers(-pad, pad + 1, 2)) if pad else (0, 0)
    crop = base[pad + dy : pad + dy + size, pad + dx : pad + dx + size]
    gain = rng.uniform(1.0 - brightness, 1.0 + brightness)
    arr = crop * gain + rng.normal(0.0, noise, crop.shape).astype(np.float32)
    return Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


__all__ = ["appearance", "draw_portrait", "seeded_rng", "variant"]

"""Pictures for the FiftyOne datasets: a unit's top-k montage with its masks drawn on each patch.

Everything here is plain numpy + Pillow on small arrays (thumbnails, feature-map-sized masks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MASK_COLOUR = (255, 208, 0)      # contour and tint of a unit's mask (reads on grey tissue)
LESION_COLOUR = (213, 94, 0)     # frame of a lesion patch (Okabe & Ito vermilion)
NORMAL_COLOUR = (0, 114, 178)    # frame of a normal patch (Okabe & Ito blue)
UNLABELLED_COLOUR = (153, 153, 153)  # frame of a patch from an unlabelled image (a tissue-grid patch set)
TILE = 128
STRIP = 16                       # caption strip under each tile


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A boolean mask resized (nearest) to ``size`` x ``size``."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return np.asarray(image.resize((size, size), Image.NEAREST)) > 127


def mask_outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The pixels of ``mask`` within ``width`` pixels of its border (4-neighbourhood erosion)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[[0, -1], :] = False
        shrunk[:, [0, -1]] = False
        inner = shrunk
    return mask & ~inner


def overlay_mask(grey: np.ndarray, mask: np.ndarray, colour: Sequence[int] = MASK_COLOUR,
                 tint: float = 0.28) -> np.ndarray:
    """An RGB uint8 image: ``grey`` (H, W) with ``mask`` tinted and outlined in ``colour``."""
    rgb = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=2)
    if mask.shape != grey.shape:
        mask = resize_mask(mask, grey.shape[0])
    colour_arr = np.asarray(colour, dtype=np.float32)
    rgb[mask] = (1 - tint) * rgb[mask] + tint * colour_arr
    rgb[mask_outline(mask)] = colour_arr
    return np.clip(rgb, 0, 255).astype(np.uint8)


def load_grey(path: str | Path, size: int = TILE) -> np.ndarray:
    """A thumbnail as a (size, size) uint8 grey array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((size, size), Image.BILINEAR))


def montage(tiles: Sequence[np.ndarray], captions: Sequence[str], frames: Sequence[Sequence[int]],
            title: str, *, columns: int | None = None) -> Image.Image:
    """Tiles (RGB, TILE x TILE) in a grid, best first, each framed and captioned, under a title bar."""
    n = max(len(tiles), 1)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pad, header = 4, 20
    width = columns * (TILE + pad) + pad
    height = header + rows * (TILE + STRIP + pad) + pad
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((pad + 2, 4), title, fill=(240, 240, 240), font=font)
    for i, (tile, caption, frame) in enumerate(zip(tiles, captions, frames, strict=True)):
        r, c = divmod(i, columns)
        x = pad + c * (TILE + pad)
        y = header + r * (TILE + STRIP + pad)
        sheet.paste(Image.fromarray(tile), (x, y))
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], outline=tuple(frame), width=2)
        draw.text((x + 2, y + TILE + 2), caption, fill=(230, 230, 230), font=font)
    return sheet


def save_png(image: Image.Image | np.ndarray, path: Path) -> Path:
    """Write a PNG atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path

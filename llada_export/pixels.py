"""Reading an image's pixels as a viewer shows them, torch-free (the CLIs' image reads and the HTTP
server's image parts share it with :mod:`llada_export.graphs.anyres`).

- EXIF orientation: a phone photo stored sideways (orientation 5-8 swap width and height) is read
  upright, and its size is the upright size.
- 16-bit greyscale (PNG mode ``I;16``): scaled to 8 bits; Pillow's ``convert("RGB")`` clips every
  value above 255, so such a file became a white image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

#: The EXIF tag of the orientation, and its values that turn the stored pixels by 90 degrees.
EXIF_ORIENTATION, SWAPPED_ORIENTATIONS = 0x0112, (5, 6, 7, 8)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: upright) from what opening the file read: Pillow's ``getexif`` decodes a
    whole PNG to look for an eXIf chunk after the pixels, so a PNG counts only one before them (where
    Pillow writes it). The size and the pixels read it the same way, so they agree."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(EXIF_ORIENTATION, 1)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as shown, its EXIF orientation applied (header only)."""
    w, h = image.size
    return (h, w) if orientation(image) in SWAPPED_ORIENTATIONS else (w, h)


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened PIL image as the RGB image a viewer shows (decoded in full)."""
    if orientation(image) != 1:  # exif_transpose copies even an upright image
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.getextrema()[1] > 255):
        grey = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(grey, 0, 65535) >> 8).astype(np.uint8))
    return image.convert("RGB")

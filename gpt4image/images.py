"""The one way every stage (training loaders of both recipes, generate_descriptions, benchmarks)
turns an image file into 8-bit RGB.

Pillow's ``convert("RGB")`` is right for 8-bit modes but wrong for others: a 16-bit greyscale PNG
(mode ``I;16``, common for scientific and medical images) is clipped, so 99.6 % of a 0..65535 ramp
becomes white; transparent pixels keep whatever colour is stored under them. Here:

- ``RGB``: used as decoded (no copy; the training loader's fast path for JPEGs);
- ``1``, ``L``, ``P`` (no transparency), ``CMYK`` (through its ICC profile when it has one), ``YCbCr``:
  Pillow's conversion;
- ``I;16`` and its byte orders, and ``I`` (how Pillow opens 16-bit greyscale PNGs and TIFFs): the
  range 0..65535 scaled to 0..255 (``round(v * 255 / 65535)``); ``I`` values outside that range
  are refused;
- ``F`` (32-bit float): the range 0..1 scaled to 0..255; values outside it (or not finite) are refused;
- with transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``L``/``RGB`` with a transparent colour):
  composited over white (``BACKGROUND``);
- any other mode (``LAB``, ``HSV``, ...) is refused by name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # Pillow is imported when an image is opened, not with the package
    from PIL import Image

BACKGROUND = (255, 255, 255)  # what transparent pixels become
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class UnsupportedImage(ValueError):
    """An image whose pixels have no agreed 8-bit RGB meaning; the message says why."""


def _scaled(values, top):
    """``values`` in 0..top as uint8 0..255, rounded to nearest."""
    return np.rint(values.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def _grey(array):
    from PIL import Image
    return Image.fromarray(np.ascontiguousarray(array), "L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` (a loaded PIL image) as 8-bit RGB by the rules of this module's docstring; raises
    ``UnsupportedImage`` for a mode (or a range) it refuses."""
    from PIL import Image
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in SIXTEEN_BIT:
        return _grey(_scaled(np.asarray(image), 65535))
    if mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImage(f"mode I (32-bit integer) pixels from {values.min()} to {values.max()} are outside "
                                   f"0..65535 and have no agreed 8-bit scale; save it as an 8- or 16-bit image")
        return _grey(_scaled(values, 65535))
    if mode == "F":
        values = np.asarray(image)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise UnsupportedImage("mode F (32-bit float) pixels outside 0..1 have no agreed 8-bit scale; "
                                   "save it as an 8- or 16-bit image")
        return _grey(_scaled(values, 1.0))
    if mode == "CMYK" and image.info.get("icc_profile"):
        import io
        from PIL import ImageCms
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # an unreadable profile: Pillow's plain conversion below
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "RGBX"):
        return image.convert("RGB")
    raise UnsupportedImage(f"mode {mode} images are not supported; save it as RGB, greyscale or 16-bit greyscale")


def open_rgb(path: str) -> Image.Image:
    """The image file ``path`` decoded and made 8-bit RGB (``to_rgb``). Raises what Pillow raises for
    a file it cannot decode, and ``UnsupportedImage``."""
    from PIL import Image
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
        return to_rgb(image)

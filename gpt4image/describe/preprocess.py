"""How many pixels a VLM sees: the processor's pixel budget and a resize in the loader workers.

Qwen2-VL's image processor (also Qwen2.5-VL's) resizes every image to a multiple of 28 pixels whose
area lies in ``[min_pixels, max_pixels]`` and turns each 28 x 28 square into one vision token; the
published Qwen2-VL checkpoints allow up to 12.8M pixels, so a phone photo becomes thousands of
tokens. ``apply_pixel_budget`` sets that range on processors that have one and refuses it on the
others. ``fit_pixels`` shrinks an image before the processor (in the loader workers), decoding a
JPEG at a reduced scale when that is enough, which is where most of the CPU time of a large photo goes.
"""
import argparse
from typing import Any

from ..cli import at_least
from ..errors import UserError


def add_preprocess_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """generate_descriptions.py's flags of the pixels a model sees."""
    p.add_argument("--max-pixels", type=at_least(1), default=None,
                   help="largest image area the processor keeps (Qwen2-VL family: about 784 pixels per vision "
                        "token, e.g. 200704 for <= 256 tokens); default: the model's preprocessor_config.json")
    p.add_argument("--min-pixels", type=at_least(1), default=None,
                   help="smallest image area the processor enlarges to (Qwen2-VL family)")
    p.add_argument("--loader-max-pixels", type=at_least(1), default=None, metavar="PIXELS",
                   help="shrink each image to at most this area (aspect kept) in the loader workers, before the "
                        "processor; JPEGs are decoded at a reduced scale when possible")
    return p


def has_pixel_budget(image_processor: Any) -> bool:
    """True for processors that size images by area (Qwen2-VL family)."""
    if hasattr(image_processor, "max_pixels") and hasattr(image_processor, "min_pixels"):
        return True  # transformers < 5 keeps them as attributes
    kwargs = getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {})
    return "max_pixels" in kwargs and "min_pixels" in kwargs


def pixel_budget(image_processor: Any) -> tuple[int, int] | None:
    """``(min_pixels, max_pixels)`` the processor applies now, or None."""
    if not has_pixel_budget(image_processor):
        return None
    size = getattr(image_processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    low = get("shortest_edge") or getattr(image_processor, "min_pixels", None)
    high = get("longest_edge") or getattr(image_processor, "max_pixels", None)
    return int(low), int(high)


def apply_pixel_budget(processor: Any, max_pixels: int | None = None, min_pixels: int | None = None,
                       model: str = "") -> tuple[int, int] | None:
    """Set ``[min_pixels, max_pixels]`` on ``processor.image_processor`` (in place); a processor
    without a pixel budget, or min above max, is a UserError. Returns the budget now in force."""
    image_processor = getattr(processor, "image_processor", processor)
    if max_pixels is None and min_pixels is None:
        return pixel_budget(image_processor)
    if not has_pixel_budget(image_processor):
        raise UserError(f"--max-pixels/--min-pixels need a processor that sizes images by area (Qwen2-VL family); "
                        f"{model or 'this model'} uses {type(image_processor).__name__}: drop those flags, or use "
                        f"--loader-max-pixels to shrink images before its processor")
    low, high = pixel_budget(image_processor)
    low = min_pixels if min_pixels is not None else low
    high = max_pixels if max_pixels is not None else high
    if low > high:
        raise UserError(f"--min-pixels {low} is above --max-pixels {high}; the processor needs min <= max")
    if hasattr(image_processor, "max_pixels"):
        image_processor.min_pixels, image_processor.max_pixels = low, high
    size = getattr(image_processor, "size", None)
    if isinstance(size, dict):
        image_processor.size = dict(size, shortest_edge=low, longest_edge=high)
    else:
        image_processor.size = {"shortest_edge": low, "longest_edge": high}
    return low, high


def vision_tokens(inputs: Any, merge_size: int = 2) -> list[int]:
    """Vision tokens per image of a Qwen2-VL processor output (``image_grid_thw``: patches of 14 px,
    merged ``merge_size`` x ``merge_size`` into one token)."""
    grid = inputs["image_grid_thw"]
    return [int(t * h * w) // merge_size ** 2 for t, h, w in grid.tolist()]


def _target(size, max_pixels):
    width, height = size
    if width * height <= max_pixels:
        return None
    scale = (max_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def draft_for(image: Any, max_pixels: int) -> None:
    """Before decoding: let a JPEG decode at 1/2, 1/4 or 1/8 scale when the result still covers
    the area ``fit_pixels`` keeps (a no-op for other formats)."""
    target = _target(image.size, max_pixels)
    if target is not None and getattr(image, "format", None) == "JPEG":
        image.draft("RGB", target)


def fit_pixels(image: Any, max_pixels: int) -> Any:
    """``image`` (a decoded PIL image) shrunk to at most ``max_pixels`` in area, aspect kept."""
    from PIL import Image
    target = _target(image.size, max_pixels)
    return image if target is None else image.resize(target, Image.BICUBIC)

"""Images decoded and preprocessed ahead of the model: ``PromptBatches`` (a Dataset whose item i is
batch i, so that DataLoader workers run ahead), the workers' set-up, and a loader that measures how
long the model waited for it. An image that cannot be used is reported with its reason, not raised.
"""
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .listing import ImageItem


def open_rgb_or_reason(path: str, max_pixels: int | None = None) -> tuple[Any, str | None]:
    """``(image, None)``: the image as 8-bit RGB (``images.to_rgb``, the conversion of every stage),
    shrunk to ``max_pixels`` in area when given; or ``(None, reason)`` where ``images.open_rgb`` would
    raise (any error Pillow raises, decompression-bomb limits and refused modes included)."""
    from PIL import Image

    from ..images import to_rgb
    from .preprocess import draft_for, fit_pixels
    try:
        with Image.open(path) as image:
            if max_pixels:
                draft_for(image, max_pixels)
            image.load()
            image = to_rgb(image)
            return (fit_pixels(image, max_pixels) if max_pixels else image), None
    except Exception as e:  # noqa: BLE001  every way a file can fail is the file's problem
        return None, f"{type(e).__name__}: {e}".replace("\n", " ")


class PromptBatches(torch.utils.data.Dataset):
    """Item i: batch i of ``items`` decoded and preprocessed for the model.

    Returns ``(items, inputs, failures)``: the described items, the processor's tensors for them
    (None when none is left), and ``[(item, reason)]`` for images that could not be used. With
    ``preprocess=False`` (vLLM preprocesses itself) ``inputs`` is ``(prompts, images)``.
    ``max_pixels``: images are shrunk to that area here, in the loader workers.
    """

    def __init__(self, items: list[ImageItem], batch_size: int, processor: Any, prompts: Callable[[ImageItem], str],
                 preprocess: bool = True, max_pixels: int | None = None):
        self.batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        self.processor = processor
        self.prompts = prompts
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.batches)

    def _process(self, items, images):
        return self.processor(text=[self.prompts(item) for item in items], images=images, padding=True,
                              return_tensors="pt")

    def __getitem__(self, i: int) -> tuple[list[ImageItem], Any, list[tuple[ImageItem, str]]]:
        good, images, failures = [], [], []
        for item in self.batches[i]:
            image, reason = open_rgb_or_reason(item.file, self.max_pixels)
            if image is None:
                failures.append((item, reason))
            else:
                good.append(item)
                images.append(image)
        if not good:
            return [], None, failures
        if not self.preprocess:
            return good, ([self.prompts(item) for item in good], images), failures
        try:
            return good, self._process(good, images), failures
        except Exception:  # noqa: BLE001  find the image the processor refuses, keep the others
            kept, kept_images = [], []
            for item, image in zip(good, images):
                try:
                    self._process([item], [image])
                    kept.append(item)
                    kept_images.append(image)
                except Exception as e:  # noqa: BLE001
                    failures.append((item, f"the processor refused it: {type(e).__name__}: {e}".replace("\n", " ")))
            return kept, (self._process(kept, kept_images) if kept else None), failures


def loader_worker_init(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn`` of generate_descriptions: Ctrl-C (sent to the whole foreground
    group) is the main process's to handle; and a worker that was handing a batch over when the main
    process stopped stays quiet about the dropped connection instead of printing a traceback."""
    import sys

    from ..train.resumable import ignore_stop_signals
    ignore_stop_signals(worker_id)
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, traceback)
    sys.excepthook = hook


class TimedLoader:
    """A DataLoader that adds up how long the model waited for it (``waited``, seconds)."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self.waited = 0.0

    def __iter__(self) -> Iterator:
        iterator = iter(self.loader)
        while True:
            tick = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - tick
            yield batch

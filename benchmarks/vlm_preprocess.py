"""Images/s per CPU core of Qwen2-VL's real image processor, at the model's pixel budget and at smaller ones.

    python benchmarks/vlm_preprocess.py [--images 96] [--batch 16] [--size 500x375] [--size 2000x1500]

Preprocessing, not the GPU, bounds a small VLM: this measures how many images one core turns into
vision tokens. The processor is transformers' ``Qwen2VLImageProcessor`` (the torchvision backend
that AutoProcessor picks, and the PIL one) built here with the values of Qwen2-VL-2B-Instruct's
published preprocessor_config.json (min_pixels 3136, max_pixels 12845056, patch 14, merge 2): no
download. Inputs are JPEGs of photo content (smooth colour fields with noise, quality 90) at each
``--size``. For each pixel budget it prints vision tokens per image, images/s for decoding + the
processor, and for the processor alone, all on one thread and counted in CPU seconds of this process (so images per
core-second, unaffected by other load on the machine), and how many cores feed a
GPU at 100, 500 and 1,500 images/s. ``--loader-max-pixels`` rows add the loader workers' resize
(JPEG draft decoding + bicubic) before the processor.
"""
import argparse
import os
import tempfile
import time

import torch

from common import RESULTS, print_table, write_json

PUBLISHED = {"min_pixels": 56 * 56, "max_pixels": 12845056}  # Qwen2-VL-2B-Instruct's preprocessor_config.json


def photo_like(width, height, generator):
    """A JPEG-friendly photo stand-in: a few smooth colour fields plus sensor-like noise."""
    low = torch.rand(3, max(2, height // 64), max(2, width // 64), generator=generator)
    image = torch.nn.functional.interpolate(low[None], size=(height, width), mode="bicubic", align_corners=False)[0]
    image = image + 0.06 * torch.randn(3, height, width, generator=generator)
    return (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()


def make_jpegs(directory, n, size):
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"{size[0]}x{size[1]}_{i:04d}.jpg")
        Image.fromarray(photo_like(*size, generator)).save(path, quality=90)
        paths.append(path)
    return paths


def processor(backend, max_pixels):
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl, image_processing_qwen2_vl
    cls = (image_processing_qwen2_vl.Qwen2VLImageProcessor if backend == "torchvision"
           else image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil)
    return cls(min_pixels=PUBLISHED["min_pixels"], max_pixels=max_pixels)


def measure(paths, image_processor, batch, loader_max_pixels=None, repeats=2):
    """(tokens per image, images/s decode + process, images/s process only) on this thread."""
    from gpt4image.describe.loading import open_rgb_or_reason
    from gpt4image.describe.preprocess import vision_tokens

    def decode():
        return [open_rgb_or_reason(p, loader_max_pixels)[0] for p in paths]
    images = decode()
    tokens = vision_tokens(image_processor(images=images[:1], return_tensors="pt"))[0]
    best_all = best_proc = float("inf")
    for _ in range(repeats):  # CPU time of this process (one thread): per core, whatever else the machine runs
        start = time.process_time()
        images = decode()
        decoded = time.process_time()
        for i in range(0, len(images), batch):
            image_processor(images=images[i:i + batch], return_tensors="pt")
        end = time.process_time()
        best_all, best_proc = min(best_all, end - start), min(best_proc, end - decoded)
    return tokens, len(paths) / best_all, len(paths) / best_proc


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch", type=int, default=16, help="images per processor call (generate_descriptions' default)")
    p.add_argument("--size", action="append", default=None, help="WxH of the JPEGs (repeatable; default 500x375)")
    p.add_argument("--backends", nargs="+", default=["torchvision", "pil"])
    p.add_argument("--json", default=os.path.join(RESULTS, "vlm_preprocess.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    sizes = [tuple(int(v) for v in s.split("x")) for s in (args.size or ["500x375"])]
    budgets = [("published default", PUBLISHED["max_pixels"], None), ("~256 tokens", 256 * 28 * 28, None),
               ("~64 tokens", 64 * 28 * 28, None), ("~256 tokens + loader resize", 256 * 28 * 28, 256 * 28 * 28)]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for size in sizes:
            paths = make_jpegs(directory, args.images, size)
            for backend in args.backends:
                for name, max_pixels, loader in budgets:
                    tokens, full, alone = measure(paths, processor(backend, max_pixels), args.batch, loader)
                    rows.append({"image": f"{size[0]}x{size[1]}", "processor": backend, "max_pixels": max_pixels,
                                 "budget": name, "vision tokens": tokens, "img/s per core (decode + process)": full,
                                 "img/s per core (process only)": alone,
                                 "cores for 100 / 500 / 1500 img/s": " / ".join(
                                     f"{rate / full:.1f}" for rate in (100, 500, 1500))})
                    print(rows[-1], flush=True)
    print()
    print_table(rows, list(rows[0]))
    write_json(args.json, {"images": args.images, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()

"""generate_descriptions.py's batched pipeline against one image at a time, with the same model, in one run.

    python benchmarks/generate_descriptions.py [--model tiny|2b] [--images 64] [--batch 16] [--new-tokens 16]
        [--workers 1] [--vllm]

"one at a time": for each image, decode, preprocess and ``generate`` with batch 1 (how published
single-image scripts describe a data set). "batched": the tool's own pieces (``PromptBatches`` in
DataLoader workers ahead of the model, left-padded batches, ``generate`` + prompt stripping).
Every answer has exactly ``--new-tokens`` tokens (min = max), so both do the same work. ``tiny`` is
the tests' 2-layer Qwen2-VL; ``2b`` is a random-weight model of Qwen2-VL-2B's sizes (GPU). Prints
images/s, seconds per image, the share of time spent waiting for the loader, and the projected
hours for ImageNet's 1,281,167 training images on one device and on 8. ``--vllm`` (run it with
an interpreter that has vLLM) adds the vLLM backend on the same images and the same model (saved
to a temporary folder; the tiny model then has attention heads of 64, which vLLM's CPU kernels need).
"""
import argparse
import os
import tempfile
import time

import torch

from common import RESULTS, print_table, write_json
from gpt4image.describe.hf import generate
from gpt4image.describe.listing import ImageItem
from gpt4image.describe.loading import PromptBatches, open_rgb_or_reason
from gpt4image.describe.prompts import PromptBuilder

IMAGENET_TRAIN = 1_281_167


def make_images(directory, n, size):
    """``n`` JPEGs of ``size`` (w, h) with random pixels (no two alike)."""
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
        path = os.path.join(directory, f"{i:05d}.jpg")
        Image.fromarray(pixels).save(path, quality=90)
        items.append(ImageItem(index=i, path=os.path.basename(path), file=path))
    return items


def one_at_a_time(model, processor, prompts, items, device, generation):
    start = time.perf_counter()
    for item in items:
        image, _ = open_rgb_or_reason(item.file)
        inputs = processor(text=[prompts(item)], images=[image], return_tensors="pt")
        generate(model, processor, inputs, device, generation)
    return {"seconds": time.perf_counter() - start, "loader_wait_share": None, "first_batch_s": None,
            "steady_wait_share": None}


def batched(model, processor, prompts, items, device, generation, batch, workers):
    loader = torch.utils.data.DataLoader(PromptBatches(items, batch, processor, prompts), batch_size=None,
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    waits = []
    start = tick = time.perf_counter()
    for _good, inputs, _ in loader:
        waits.append(time.perf_counter() - tick)
        generate(model, processor, inputs, device, generation)
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    # the first wait is the workers' start-up (once per run); the rest is whether they keep up
    return {"seconds": seconds, "loader_wait_share": sum(waits) / seconds, "first_batch_s": waits[0],
            "steady_wait_share": sum(waits[1:]) / (seconds - waits[0])}


def vllm_run(model, processor, prompts, items, args, tmp, generation):
    """The vLLM backend over ``items`` as the tool runs it: the same model saved to ``tmp``, images
    decoded in loader workers, 256 requests in flight."""
    from gpt4image.describe.vllm_engine import VLLMEngine
    directory = os.path.join(tmp, "model")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    engine = VLLMEngine(directory, args.device, dtype, generation, model.config.get_text_config().vocab_size,
                        memory=None if args.device.startswith("cuda") else 0.1)
    engine(([prompts(items[0])], [open_rgb_or_reason(items[0].file)[0]]))  # warm-up
    batches = PromptBatches(items, args.batch, processor, prompts, preprocess=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers,
                                         prefetch_factor=4 if args.workers else None)
    start = time.perf_counter()
    for _ in engine.stream(loader, 256):
        pass
    return {"seconds": time.perf_counter() - start, "loader_wait_share": None, "first_batch_s": None,
            "steady_wait_share": None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "2b"], default="tiny")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="default: 64 64 for tiny, 500 375 (an ImageNet-like photo) for 2b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vllm", action="store_true", help="also the vLLM backend (default batch for it: 256)")
    p.add_argument("--json", default=os.path.join(RESULTS, "generate_descriptions.json"))
    args = p.parse_args()
    from gpt4image.describe.tiny_vlm import build_tiny_vlm
    size = "vllm" if args.vllm and args.model == "tiny" else args.model
    model, processor = build_tiny_vlm("qwen2_vl", size=size, min_new_tokens=args.new_tokens)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = model.to(args.device, dtype).eval()
    processor.tokenizer.padding_side = "left"
    prompts = PromptBuilder(processor)
    generation = {"max_new_tokens": args.new_tokens, "do_sample": False}
    size = args.image_size or ((64, 64) if args.model == "tiny" else (500, 375))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        items = make_images(tmp, args.images, size)
        runs = []
        warm_up = [open_rgb_or_reason(items[0].file)[0]] * 2
        generate(model, processor, processor(text=[prompts(items[0])] * 2, images=warm_up, padding=True,
                                             return_tensors="pt"), args.device, generation)
        for name, run in (("one at a time", lambda: one_at_a_time(model, processor, prompts, items, args.device,
                                                                  generation)),
                          (f"batched ({args.batch}, {args.workers} workers)",
                           lambda: batched(model, processor, prompts, items, args.device, generation, args.batch,
                                           args.workers))):
            result = run()
            runs.append((name, result))
        if args.vllm:  # last: its engine process keeps polling (and taking a core) until this one ends
            runs.append(("vllm (256 requests in flight)", vllm_run(model, processor, prompts, items, args, tmp,
                                                                  generation)))
        for name, result in runs:
            per_image = result["seconds"] / len(items)
            rows.append({"pipeline": name, "images/s": len(items) / result["seconds"], "s/image": per_image,
                         "loader wait": result["loader_wait_share"], "first batch s": result["first_batch_s"],
                         "wait after the first batch": result["steady_wait_share"],
                         "hours for 1.28M (1 device)": per_image * IMAGENET_TRAIN / 3600,
                         "hours (8 devices)": per_image * IMAGENET_TRAIN / 3600 / 8})
    print(f"\nQwen2-VL ({args.model}, random weights), {args.images} images of {size[0]}x{size[1]}, "
          f"{args.new_tokens} new tokens each, {args.device}")
    print_table(rows, list(rows[0]))
    speedup = rows[1]["images/s"] / rows[0]["images/s"]
    print(f"\nbatched / one at a time: {speedup:.2f}x; loader wait {100 * rows[1]['loader wait']:.1f}% of the batched "
          f"run, {100 * rows[1]['wait after the first batch']:.1f}% after the first batch (workers' start-up)")
    if args.vllm:
        print(f"vllm / batched transformers: {rows[2]['images/s'] / rows[1]['images/s']:.2f}x")
    write_json(args.json, {"args": vars(args), "rows": rows, "speedup": speedup})


if __name__ == "__main__":
    main()

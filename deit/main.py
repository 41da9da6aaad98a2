"""DeiT-base on ImageNet-1k with the GPT4Image text-alignment loss (arXiv 2306.00693).

    cd deit && torchrun --nproc_per_node=8 main.py --data-path=/path/to/imagenet --batch-size=128 \\
        --text_emb=imagenet_clip_text_emb_0_1281166.pth --output_dir=./outputs

The full DeiT recipe (RandAugment, random erasing, repeated augmentation, Mixup/CutMix, label
smoothing, EMA, AdamW with warm-up and cosine, optional distillation) on timm 1.x, plus the
alignment of the class token (after the final norm) with the stored text embeddings.
The recipe itself is gpt4image/recipes/deit.py (importable as ``gpt4image.recipes.deit``).
"""
import sys

from gpt4image.recipes.deit import main
from gpt4image.train.launch import script_exit

if __name__ == "__main__":
    script_exit(main, sys.argv[1:])

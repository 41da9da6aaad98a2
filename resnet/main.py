"""ResNet-50 on ImageNet-1k with the GPT4Image text-alignment loss (arXiv 2306.00693).

    cd resnet && torchrun --nproc_per_node=4 main.py --data=/path/to/imagenet --batch-size=256 \\
        --text_emb=imagenet_clip_text_emb_0_1281166.pth --save_dir=./outputs

Also runs under ``python -m torch.distributed.launch --use_env``, ``srun`` and as one process
(GPU or CPU). Without ``--data`` it trains on generated images (as the original's FakeData).
The recipe itself is gpt4image/recipes/resnet.py (importable as ``gpt4image.recipes.resnet``).
"""
import sys

from gpt4image.recipes.resnet import main
from gpt4image.train.launch import script_exit

if __name__ == "__main__":
    script_exit(main, sys.argv[1:])

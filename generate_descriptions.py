"""Describe every training image with a local vision-language model (stage 0 of GPT4Image).

    python generate_descriptions.py --data /path/to/train --model /path/to/Qwen2-VL-2B-Instruct \\
        --output descriptions.jsonl

Options: ``python generate_descriptions.py --help``; the code: ``gpt4image/describe/`` (``cli.py``).
"""
import sys

from gpt4image.describe.cli import main
from gpt4image.errors import exit_on_user_error

if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])

"""Turn one description per training image into the table of text embeddings (stage 1 of GPT4Image).

    python description2embedding.py --caption=descriptions.jsonl --data=train/

Options: ``python description2embedding.py --help``; the code: ``gpt4image/text/`` (``cli.py``).
"""
import sys

from gpt4image.errors import exit_on_user_error
from gpt4image.text.cli import main

if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])

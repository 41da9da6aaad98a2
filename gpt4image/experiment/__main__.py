"""python -m gpt4image.experiment (see main.py)."""
import sys

from ..errors import exit_on_user_error
from .main import main

if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])

"""One exception type for mistakes in what the user gave us (files, values, flags).

Entry points catch it, print its one-line message and exit with status 2 before anything is
written; every other exception is a bug and keeps its traceback.
"""
import argparse
import math
import sys


class UserError(Exception):
    """Bad input: the message names the file or value and says how to fix it."""


def exit_on_user_error(main, argv=None):
    """Run ``main(argv)``; turn a UserError into ``error: <message>`` on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


def one_line(error):
    """The message of a UserError, also when a DataLoader worker re-raised it with its traceback."""
    text = str(error).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split("UserError: ", 1)[-1]
    return " ".join(text.split())  # a message that quotes a library's several lines stays one line


def at_least(minimum, kind=int, strict=False):
    """An argparse ``type`` that reads ``kind`` and refuses values below ``minimum`` (or equal to
    it with ``strict``) with argparse's own one-line error and exit code 2."""
    return in_range(kind, above=minimum) if strict else in_range(kind, minimum=minimum)


def in_range(kind=float, minimum=None, maximum=None, above=None, below=None):
    """An argparse ``type`` reading ``kind`` within [minimum, maximum] and (above, below), any bound
    optional; anything else (NaN included) is argparse's one-line error with exit code 2."""
    bounds = [f">= {minimum}" if minimum is not None else None, f"> {above}" if above is not None else None,
              f"<= {maximum}" if maximum is not None else None, f"< {below}" if below is not None else None]
    wanted = " and ".join(b for b in bounds if b)
    noun = "a whole number" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and not (kind is float and not math.isfinite(value)) and \
            (minimum is None or value >= minimum) and (above is None or value > above) and \
            (maximum is None or value <= maximum) and (below is None or value < below)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {noun}{' ' + wanted if wanted else ''}, got {text!r}")
        return value
    return parse



def check_device(device):
    """Refuse ``--device cuda...`` on a machine (or a torch build) without CUDA, in one line."""
    import torch
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; pass --device cpu "
                        f"or leave --device out")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (``error: argument --lr: must be ...``; --help shows the
    usage) and exit code 2, like every other refusal of ours."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")

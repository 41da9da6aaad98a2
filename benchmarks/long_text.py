"""--long-text chunks on one description without a space: seconds and characters handed to the
tokenizer's count, for lengths 20,000 to 200,000 characters (OpenAI CLIP's tokenizer). Work linear in
the length is the target (a quadratic splitter did not finish 100,000 characters in 2 minutes).

    python benchmarks/long_text.py [--lengths 20000 100000 200000]
"""
import argparse
import os
import random
import time

from common import RESULTS, print_table, write_json  # common puts the repository on the path


def measure(length, seed=0):
    from gpt4image.text.long_text import split_description
    from gpt4image.text.openai_clip_encoder import OpenAIClipTokenizer
    tokenizer = OpenAIClipTokenizer()
    tokenizer.count("warm up")
    counted = []

    def count(text):
        counted.append(len(text))
        return tokenizer.count(text)
    rng = random.Random(seed)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
    start = time.perf_counter()
    pieces = split_description(text, count, tokenizer.room, tokenizer.additive)
    return {"characters": length, "seconds": round(time.perf_counter() - start, 2), "pieces": len(pieces),
            "characters counted": sum(counted), "longest count": max(counted)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[20_000, 100_000, 200_000])
    args = p.parse_args()
    rows = [measure(n) for n in args.lengths]
    print_table(rows, list(rows[0]))
    write_json(os.path.join(RESULTS, "long_text.json"), {"rows": rows})


if __name__ == "__main__":
    main()

"""Long descriptions in pieces that fit a text encoder's context (``--long-text chunks``): whole
sentences packed greedily, a longer sentence split at word boundaries, a longer word between
characters; the work stays linear in the length of the text."""
import re
from collections.abc import Callable

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _pack(units, count, room, additive=False):
    """Join consecutive ``units`` (each fits ``room`` alone) with spaces into as few pieces of at
    most ``room`` tokens as a greedy pass finds. Token counts add up across a space for CLIP's BPE
    (``additive``: no token spans a space) and nearly so for other tokenisers, whose joins the
    exact count decides."""
    pieces, current, current_n = [], "", 0
    for unit in units:
        n = count(unit)
        if current and current_n + n <= room + (0 if additive else 1):
            joined = f"{current} {unit}"
            exact = current_n + n if additive else count(joined)
            if exact <= room:
                current, current_n = joined, exact
                continue
        if current:
            pieces.append(current)
        current, current_n = unit, n
    if current:
        pieces.append(current)
    return pieces


# Tokenisers (CLIP's BPE among them) take time quadratic in the length of one word, so a
# 100,000-character "word" would never be counted whole: a text or sentence holding a word longer
# than LONGEST_COUNTED_WORD characters is not counted whole, and a word that does not fit is cut into
# runs of LONGEST_WORD characters before it is cut between characters. No word of a description is
# that long; the work stays linear in the length of the text.
LONGEST_COUNTED_WORD = 256
LONGEST_WORD = 64
_HUGE_WORD = re.compile(rf"\S{{{LONGEST_COUNTED_WORD + 1},}}")


def _fits(text, count, room):
    return _HUGE_WORD.search(text) is None and count(text) <= room


def _cut_word(word, count, room):
    """A word that does not fit ``room`` (or is too long to count) as pieces that do."""
    pieces = []
    for i in range(0, len(word), LONGEST_WORD):
        run = word[i:i + LONGEST_WORD]
        pieces.extend(_split_long_word(run, count, room) if count(run) > room else [run])
    return pieces


def _split_long_word(word, count, room):
    """A word (of at most ``LONGEST_WORD`` characters) with more tokens than ``room``, cut between
    characters into the longest prefixes that fit (at least one character each)."""
    pieces = []
    while word:
        lo, hi = 1, len(word)  # word[:lo] is taken; the longest fitting prefix is in [lo, hi]
        while lo < hi:
            middle = (lo + hi + 1) // 2
            if count(word[:middle]) <= room:
                lo = middle
            else:
                hi = middle - 1
        pieces.append(word[:lo])
        word = word[lo:]
    return pieces


def _fitting(units, split, count, room):
    """``units`` with each one longer than ``room`` replaced by ``split(unit)``."""
    out = []
    for unit in units:
        out.extend([unit] if _fits(unit, count, room) else split(unit))
    return out


def split_description(text: str, count: Callable[[str], int], room: int, additive: bool = False) -> list[str]:
    """Pieces of ``text`` that fit ``room`` content tokens: whole sentences packed greedily, a longer
    sentence split at word boundaries (a longer word between characters). A text that fits is
    returned as it is (one piece). ``additive``: see ``_pack``. Linear in the length of ``text``:
    nothing longer than a sentence of ordinary words, or than a piece, is counted."""
    if _fits(text, count, room):
        return [text]
    known = {}

    def count(piece, count=count):  # each sentence and word is counted once
        if piece not in known:
            known[piece] = count(piece)
        return known[piece]

    pieces, run = [], []  # run: consecutive sentences that fit on their own, packed together
    for sentence in filter(None, _SENTENCE_END.split(text.strip())):
        if _fits(sentence, count, room):
            run.append(sentence)
            continue
        pieces += _pack(run, count, room, additive)
        run = []
        words = _fitting(sentence.split(), lambda w: _cut_word(w, count, room), count, room)
        pieces += _pack(words, count, room, additive)
    return pieces + _pack(run, count, room, additive)

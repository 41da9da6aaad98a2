"""The records of generate_descriptions: ``{"path", ["k"], "description", ["class"],
["hit_max_new_tokens"], ["flags"], ["retry"]}``, or ``{"path", ["k"], "error"}`` for an image that
could not be described (undecodable, or an empty generation); their keys, which of two records of one
task counts, and writing them to a shard's part file as each batch is answered.
"""
import json
from collections.abc import Container, Iterable
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..io import append_durably
from .hf import Result
from .listing import ImageItem
from .quality import QualityGate

if TYPE_CHECKING:
    from .parts import Parts

EMPTY = "empty description"


def read_records(path: str) -> list[dict[str, Any]]:
    """Records of one part file; a last line cut short by a kill is ignored."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the unterminated last line: the batch the kill interrupted
                continue
            raise UserError(f"{path}:{number} is not a JSON record; delete the line (that image is then "
                            f"described again) and rerun") from None
    return records


def record_key(record: dict[str, Any]) -> str | tuple[str, int]:
    """A record's task: its image path, or ``(path, k)`` for description k of several."""
    return (record["path"], record["k"]) if "k" in record else record["path"]


def task_key(item: ImageItem) -> str | tuple[str, int]:
    """An image's task, as ``record_key`` gives it for the task's record."""
    k = getattr(item, "k", None)
    return item.path if k is None else (item.path, k)


def record_wins(record: Container[str], best: Container[str]) -> bool:
    """Which of two records of one task counts: a retry over what it retried, else a description
    over an error, else the first (records, or the field names they have)."""
    if "retry" in record:
        return True
    return "error" in best and "error" not in record and "retry" not in best


def description_record(item: ImageItem, text: str, hit_limit: bool, gate: QualityGate) -> dict[str, Any]:
    """The record of one answer: ``{"path", ["k"], "description", ["class"], ["hit_max_new_tokens"],
    ["flags"]}``, or ``{"path", ["k"], "error"}`` for an empty one."""
    record = {"path": item.path}
    if getattr(item, "k", None) is not None:
        record["k"] = item.k
    if not text:
        record["error"] = EMPTY
        return record
    record["description"] = text
    if item.class_name is not None:
        record["class"] = item.class_name
    if hit_limit:
        record["hit_max_new_tokens"] = True
    flags = gate.check(text, hit_limit)
    if flags:
        record["flags"] = flags
    return record


def write_results(results: Iterable[list[Result]], parts: "Parts", shard: tuple[int, int], total: int, quiet: bool,
                  gate: QualityGate, retried: dict | None = None) -> None:
    """Append each list of results to the shard's part file, flushed to disk before the next; each
    description is checked by ``gate`` as it is written. ``retried``: ``{key: (first record,
    settings)}`` of a retry pass, kept in each new record's ``"retry"``."""
    from tqdm import tqdm
    index, count = shard
    flagged = 0
    path = parts.append_path(index, count)
    with tqdm(total=total, unit="img", disable=quiet, desc=f"describing {index}/{count}", dynamic_ncols=True) as bar:
        for batch in results:
            records = []
            for item, text, reason, hit_limit in batch:
                if reason is not None:
                    bar.write(f"warning: cannot describe {item.file}: {reason}")
                    records.append({"path": item.path, **({"k": item.k} if hasattr(item, "k") else {}),
                                    "error": reason})
                    continue
                records.append(description_record(item, text, hit_limit, gate))
                flagged += bool(records[-1].get("flags")) or "error" in records[-1]
                if retried is not None:
                    first, settings = retried[task_key(item)]
                    records[-1]["retry"] = {
                        "because": gate.check(first.get("description", ""), first.get("hit_max_new_tokens", False)),
                        "settings": settings, "first": first.get("description", "")}
            append_durably(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
            bar.update(len(records))
            if flagged:
                bar.set_postfix(flagged=flagged)

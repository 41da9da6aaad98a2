"""The resumable output of generate_descriptions: one JSON-lines part file per shard,
``<output>.parts/part-IIIII-of-NNNNN.jsonl``, appended and flushed per batch, with the settings each
was made with; and the streaming merge into the final file, which finds each task's record without
decoding most lines.
"""
import contextlib
import glob
import json
import os
import re
from typing import Any

from ..errors import UserError
from ..io import atomic_write_json, atomic_write_lines
from .listing import ImageItem
from .quality import QualityGate, Tally
from .records import EMPTY, read_records, record_key, record_wins, task_key


class Parts:
    """The part files of one output, ``<output>.parts/part-IIIII-of-NNNNN.jsonl``, and their merge."""

    def __init__(self, output: str):
        self.output = output
        self.directory = output + ".parts"
        self.settings_path = os.path.join(self.directory, "settings.json")

    def part_path(self, index: int, count: int) -> str:
        return os.path.join(self.directory, f"part-{index:05d}-of-{count:05d}.jsonl")

    def part_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.directory, "part-*-of-*.jsonl")))

    def _settings_files(self):
        return sorted(glob.glob(os.path.join(self.directory, "*settings.json")))

    def _read_settings(self, path):
        try:
            with open(path, encoding="utf-8") as f:
                settings = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); delete {self.directory} to start "
                            f"again") from None
        if not isinstance(settings, dict):
            raise UserError(f"{path} is not a settings object; delete {self.directory} to start again")
        return settings

    @staticmethod
    def _differences(before, now, keys=None):
        keys = sorted(set(before) | set(now)) if keys is None else keys
        differ = [k for k in keys if before.get(k) != now.get(k)]
        return "; ".join(f"{k}: {before.get(k)!r} in the parts, {now.get(k)!r} now" for k in differ[:3])

    def check_settings(self, settings: dict[str, Any], shard: tuple[int, int] = (0, 1)) -> None:
        """Refuse to add to parts made with other settings (model, prompt, generation, class-names
        content); record them for the output and for this shard's part file (shards started at once
        on a job array each leave their own record, which --merge compares)."""
        os.makedirs(self.directory, exist_ok=True)
        for path in self._settings_files():
            shown = self._differences(self._read_settings(path), settings)
            if shown:
                raise UserError(f"{self.directory} holds descriptions made with other settings ({shown}); "
                                f"use another --output, or delete that folder to start again")
        if not os.path.isfile(self.settings_path):
            atomic_write_json(self.settings_path, settings)
        own = self.part_path(*shard)[:-len(".jsonl")] + ".settings.json"
        if not os.path.isfile(own):
            atomic_write_json(own, settings)

    def check_merge(self, stated: dict[str, Any]) -> dict[str, Any] | None:
        """The settings every part was made with (None without parts); a part made with settings other
        than another part's, or than the --merge command states, is refused by name."""
        found = [(path, self._read_settings(path)) for path in self._settings_files()]
        if not found:
            return None
        first_path, first = found[0]
        for path, settings in found[1:]:
            shown = self._differences(first, settings)
            if shown:
                raise UserError(f"{os.path.basename(first_path)} and {os.path.basename(path)} in {self.directory} "
                                f"were made with different settings ({shown}); describe those shards again with "
                                f"one setting")
        shown = self._differences(first, stated, keys=sorted(stated))
        if shown:
            raise UserError(f"the parts in {self.directory} were made with other settings than this --merge "
                            f"command's ({shown}); run --merge with the same options as the shards")
        return first

    def done(self, retry_failed: bool = False) -> dict:
        """``{key: record}`` over every part file (key: the path, or ``(path, k)`` for description k
        of several): a description wins over an error, a retry over what it retried."""
        best = {}
        for path in self.part_files():
            for record in read_records(path):
                if retry_failed and "error" in record:
                    continue
                key = record_key(record)
                if key not in best or record_wins(record, best[key]):
                    best[key] = record
        return best

    def mark_done(self, run_id: str, rank: int) -> None:
        open(os.path.join(self.directory, f".done-{run_id}-{rank}"), "w").close()

    def wait_for_ranks(self, run_id: str, world_size: int, poll_seconds: float = 1.0) -> None:
        """Rank 0 waits until every rank of this launch has marked its shard done (a rank that dies
        ends the whole job under torchrun, so this does not wait for a dead one); no process group,
        so nothing here times out on a slow shard or meets vLLM's own distributed set-up."""
        import time
        markers = [os.path.join(self.directory, f".done-{run_id}-{r}") for r in range(world_size)]
        while not all(os.path.exists(m) for m in markers):
            time.sleep(poll_seconds)
        for marker in markers:
            os.unlink(marker)

    def append_path(self, index: int, count: int) -> str:
        """The shard's part file, ready to append to (``io.append_durably``); a last line cut short by
        a kill is removed first."""
        path = self.part_path(index, count)
        if os.path.exists(path):
            with open(path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        return path

    def missing_report(self, items: list[ImageItem], done: dict) -> tuple[list[ImageItem], str]:
        """How many images (tasks) have no record, and in which shards of the part files' layout."""
        missing = [item for item in items if task_key(item) not in done]
        counts = {int(m.group(1)) for m in (re.search(r"-of-(\d+)\.jsonl$", p) for p in self.part_files()) if m}
        count = max(counts) if counts else 1
        shards = sorted({item.index % count for item in missing})
        return missing, (f"{len(missing)} of {len(items)} images are not described yet (first: {missing[0].path}; "
                         f"shards {', '.join(f'{s}/{count}' for s in shards[:10])}"
                         f"{' ...' if len(shards) > 10 else ''})" if missing else "")

    def index(self) -> dict:
        """``{key: (part number, byte offset, marks)}`` of the record that counts for each task
        (``marks``: which of ``error``/``retry`` it has), found without decoding most lines, so that
        1.28M records take a few hundred MB and seconds; the merge copies the lines themselves."""
        best = {}
        for number, path in enumerate(self.part_files()):
            with open(path, "rb") as f:
                offset = 0
                for line_number, line in enumerate(f, 1):
                    start, offset = offset, offset + len(line)
                    if not line.strip():
                        continue
                    if not line.endswith(b"\n"):  # the unterminated last line: the batch a kill interrupted
                        try:
                            json.loads(line)
                        except ValueError:
                            continue
                    key = _fast_key(line) or _decoded_key(line, path, line_number)
                    marks = _marks(line)
                    if key not in best or record_wins(marks, best[key][2]):
                        best[key] = (number, start, marks)
        return best

    def merge(self, items: list[ImageItem], metadata: dict[str, Any], allow_missing: bool = False,
              gate: QualityGate | None = None) -> tuple[dict[str, int], list[dict[str, Any]], Tally]:
        """Write ``output`` (the records of ``items``, in their order, descriptions only, as the part
        files hold them: flags from the quality gate they were written under, ``gate``) and
        ``output.json``; returns the counts, the failures and the gate's Tally. Streams: lines are
        copied from the part files one at a time; only flagged, retried and failed ones are decoded."""
        gate = gate or QualityGate()
        index = self.index()
        missing, report = self.missing_report(items, index)
        if missing and not allow_missing:
            raise UserError(f"cannot merge {self.output}: {report}; run the missing shards (the same command "
                            f"skips what is done), or pass --allow-missing")
        failures, tally, described = [], Tally(), [0]
        stack = contextlib.ExitStack()
        files = [stack.enter_context(open(path, "rb")) for path in self.part_files()]

        def lines():
            for item in items:
                entry = index.get(task_key(item))
                if entry is None:
                    continue
                number, offset, marks = entry
                files[number].seek(offset)
                line = files[number].readline()
                if "error" in marks:
                    record = json.loads(line)
                    failures.append({"path": record["path"], "error": record["error"],
                                     **({"k": record["k"]} if "k" in record else {})})
                    if record["error"] == EMPTY:
                        tally.add(record, ["empty"])
                    continue
                if "retry" in marks or b'"flags": ' in line:
                    record = json.loads(line)
                    tally.add(record, record.get("flags", []))
                described[0] += 1
                yield line
        with stack:
            atomic_write_lines(self.output, lines())
        counts = {"images": len(items), "described": described[0],
                  "failed": sum(f["error"] != EMPTY for f in failures),
                  "empty": sum(f["error"] == EMPTY for f in failures), "missing": len(missing)}
        atomic_write_json(self.output + ".json", dict(metadata, counts=counts, failures=failures,
                                                      quality=tally.summary(gate)))
        return counts, failures, tally


_PATH_PREFIX = b'{"path": "'
_K_PREFIX = b', "k": '


def _fast_key(line):
    """The key of a line as this tool writes it (``{"path": "...", ["k": K, ]...``) without
    decoding it; None when the path holds an escape (then decode the line)."""
    if not line.startswith(_PATH_PREFIX):
        return None
    end = line.find(b'"', len(_PATH_PREFIX))
    path = line[len(_PATH_PREFIX):end]
    if end < 0 or b"\\" in path:
        return None
    path = path.decode("utf-8")
    if line.startswith(_K_PREFIX, end + 1):
        stop = line.find(b",", end + 1 + len(_K_PREFIX))
        return path, int(line[end + 1 + len(_K_PREFIX):stop if stop > 0 else None].rstrip(b"}\n "))
    return path


def _decoded_key(line, path, number):
    try:
        return record_key(json.loads(line))
    except ValueError:
        raise UserError(f"{path}:{number} is not a JSON record; delete the line (that image is then described "
                        f"again) and rerun") from None


def _marks(line):
    """Which of the top-level fields ``error`` and ``retry`` a record line has. Inside a JSON string
    a quote is escaped, so ``"error": `` can only be a key."""
    return tuple(name for name, token in (("error", b'"error": '), ("retry", b'"retry": ')) if token in line)

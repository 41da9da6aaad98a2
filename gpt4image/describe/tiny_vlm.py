"""Tiny randomly initialised vision-language models, saved like a downloaded Hugging Face model.

Used by the demo and the tests of ``generate_descriptions.py``: each builder writes a directory that
``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained(dir)`` load offline, with the real
architecture of its family (Qwen2-VL, LLaVA, SmolVLM/Idefics3, BLIP-2) at a few layers of width 64,
a byte-level tokenizer made in code with the family's special tokens, the family's image processor
and a chat template written here. Their descriptions are gibberish: they show that the pipeline
works, not what a real model would say.
"""
import os
from typing import Any

import torch

FAMILIES = ("qwen2_vl", "llava", "idefics3", "blip2")

# A minimal chat template in each family's layout: an image item becomes the family's image
# placeholder, text items are copied, and the assistant turn is opened for generation.
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def byte_level_tokenizer(special_tokens: list[str], eos: str, pad: str, bos: str | None = None,
                         wrap: tuple[str, str] | None = None, **named: str) -> Any:
    """A fast tokenizer over the 256 byte symbols (no merges) plus ``special_tokens``; ``wrap``
    ``(first, last)`` puts those special tokens around every encoded text (as BERT's or CLIP's do);
    ``named`` sets other named special tokens (cls_token=..., sep_token=...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast
    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    specials = list(dict.fromkeys([t for t in (eos, pad, bos, *named.values()) if t] + list(special_tokens)))
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(specials)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if wrap:
        first, last = wrap
        backend.post_processor = processors.TemplateProcessing(
            single=f"{first} $A {last}", pair=f"{first} $A {last} $B {last}",
            special_tokens=[(first, vocab[first]), (last, vocab[last])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad, bos_token=bos,
                                        **named)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special_tokens if t not in (eos, pad, bos)]})
    return tokenizer


def _llama_text(tokenizer, width=64, **extra):
    return dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **extra)


def _qwen2_vl(size="tiny"):
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)
    tok = byte_level_tokenizer(["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                "<|video_pad|>"], eos="<|im_end|>", pad="<|endoftext|>")
    ids = tok.convert_tokens_to_ids
    if size == "2b":  # the published Qwen2-VL-2B-Instruct sizes (random weights: the cost, not the words)
        text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16)
        pixels = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    else:  # "vllm": attention heads of 64 (a size vLLM's CPU kernels support)
        width, section = (128, [8, 12, 12]) if size == "vllm" else (64, [4, 6, 6])
        text = dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1,
                    rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e4})
        vision = dict(depth=2, embed_dim=32, hidden_size=width, num_heads=2)  # hidden_size: the text width
        pixels = dict(min_pixels=56 * 56, max_pixels=56 * 56)  # 4 x 4 patches of 14, merged 2 x 2: 4 tokens
    config = Qwen2VLConfig(
        text_config=dict(text, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                                 tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=_QWEN_TEMPLATE)
    return Qwen2VLForConditionalGeneration(config), processor


def _llava(size="tiny"):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    tok = byte_level_tokenizer(["<image>"], eos="</s>", pad="<pad>", bos="<s>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_llama_text(tok, 128 if size == "vllm" else 64),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE)
    return LlavaForConditionalGeneration(config), processor


def _idefics3():
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor)
    tok = byte_level_tokenizer(["<fake_token_around_image>", "<image>", "<global-img>", "<|im_start|>"],
                               eos="<end_of_utterance>", pad="<|endoftext|>", bos="<|begin_of_text|>")
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=_llama_text(tok), scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                             do_image_splitting=False)
    # (32 / 8)^2 patches, pixel-shuffled by scale_factor 2: 4 image tokens
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=_IDEFICS3_TEMPLATE)
    return Idefics3ForConditionalGeneration(config), processor


def _blip2():
    from transformers import (BlipImageProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              OPTConfig)
    tok = byte_level_tokenizer(["<image>"], eos="</s>", pad="<pad>", bos="</s>")
    text = OPTConfig(vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2,
                     word_embed_proj_dim=64, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=64),
        text_config=text.to_dict(), num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tok, num_query_tokens=4)
    return Blip2ForConditionalGeneration(config), processor


_BUILDERS = {"qwen2_vl": _qwen2_vl, "llava": _llava, "idefics3": _idefics3, "blip2": _blip2}


def build_tiny_vlm(family: str, seed: int = 0, min_new_tokens: int = 4,
                   size: str = "tiny") -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` of ``family`` with random weights, in memory (see save_tiny_vlm).
    ``size="2b"`` (Qwen2-VL only) gives Qwen2-VL-2B's sizes, for benchmarks; ``size="vllm"``
    (Qwen2-VL, LLaVA) attention heads of 64, which vLLM's CPU kernels need."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family](size) if size != "tiny" else _BUILDERS[family]()
    model.eval()
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.min_new_tokens = min_new_tokens
    allowed = {tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz\u0120"} | {tok.eos_token_id}
    model.generation_config.suppress_tokens = [i for i in range(model.config.get_text_config().vocab_size)
                                               if i not in allowed]
    return model, processor


def _hub_layout(directory):
    """Store LLaVA's vision tower under ``vision_tower.vision_model.`` as the published llava-hf
    checkpoints do (transformers reads both layouts; vLLM reads only this one)."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    state = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
             for k, v in state.items()}
    save_file(state, path, metadata={"format": "pt"})


def save_tiny_vlm(family: str, directory: str, seed: int = 0, min_new_tokens: int = 4, size: str = "tiny") -> str:
    """Write a tiny random model of ``family`` (one of FAMILIES) and its processor to ``directory``.

    Its generation config asks for at least ``min_new_tokens`` tokens and lets it write only lower
    case letters and spaces, so that a random model writes a non-empty word salad rather than
    stray bytes or an immediate end.
    """
    model, processor = build_tiny_vlm(family, seed, min_new_tokens, size)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    if family == "llava":
        _hub_layout(directory)
    return str(directory)

"""Stage 0: describing images with a local vision-language model (transformers or vLLM)."""

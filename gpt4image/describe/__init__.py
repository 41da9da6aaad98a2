"""Stage 0: describing images with a local vision-language model (transformers or vLLM).

- ``listing``: the images (ImageFolder or a list of paths), class names, path spelling;
- ``prompts``, ``multi``: the prompt of each image, K descriptions per image;
- ``loading``, ``preprocess``: images decoded and sized in DataLoader workers;
- ``models``: the model folder checked and loaded; ``hf``, ``vllm_engine``: the two backends;
- ``quality``: the quality gate; ``records``, ``parts``: the records, part files and merge;
- ``shard``, ``settings``, ``summary``, ``cli``: generate_descriptions.py itself;
- ``tiny_vlm``: tiny random models for tests and the demo.
"""

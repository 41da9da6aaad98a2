"""Stage 1: description files, text encoders and the embedding table.

- ``descriptions``: reading description files in every accepted form;
- ``encoder``: the encoder interface and ``load_text_encoder``; its families ``openai_clip_encoder``
  (with ``clip_text``), ``open_clip_encoder``, ``hf_encoder``;
- ``long_text``: long descriptions in pieces; ``encoding``: every description into one row;
- ``tables``: the table on disk and the datasets that carry its rows; ``cli``: description2embedding.py.
"""

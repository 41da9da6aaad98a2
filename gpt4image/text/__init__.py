"""Stage 1: description files, text encoders and the embedding table."""

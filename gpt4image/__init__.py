"""GPT4Image: align a vision model's features with CLIP text embeddings of per-image descriptions.

Importing the package first makes torchvision importable on a CPU build of torch (see _compat).
"""
from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"

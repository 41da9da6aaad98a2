"""GPT4Image: align a vision model's features with CLIP text embeddings of per-image descriptions.

Importing the package first makes torchvision importable on a CPU build of torch (see _compat).
"""
from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"

from .train.checkpoint import check_compatible, load_checkpoint, save_checkpoint  # noqa: E402
from .train.distributed import DistInfo, init_distributed, reduce_sums  # noqa: E402
from .log import setup_logging  # noqa: E402
from .errors import UserError  # noqa: E402
from .train.alignment import describe_alignment, effective_text_weight  # noqa: E402
from .train.losses import alignment_loss  # noqa: E402
from .train.models import TextAlignedModel, build_projection_head  # noqa: E402
from .train.samplers import ExactDistributedSampler, RASampler  # noqa: E402
from .text.tables import TextEmbeddings, WithTextEmbeddings, load_text_embeddings  # noqa: E402

__all__ = [
    "alignment_loss", "build_projection_head", "TextAlignedModel", "load_text_embeddings", "TextEmbeddings",
    "WithTextEmbeddings", "init_distributed", "DistInfo", "setup_logging", "reduce_sums",
    "ExactDistributedSampler", "RASampler", "save_checkpoint", "load_checkpoint", "check_compatible",
    "describe_alignment", "effective_text_weight", "UserError",
]

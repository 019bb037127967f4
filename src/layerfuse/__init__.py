"""layerfuse: fuse extra information into the output of any layer of a transformer.

>>> import torch, layerfuse
>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)).eval()
>>> config = layerfuse.FusionConfig(layer=1, method="addition", approach="layer")
>>> with layerfuse.fuse(model, torch.randn(32), config):
...     fused = model(torch.tensor([[1, 2, 3]])).last_hidden_state
"""

from .capture import capture
from .config import FusionConfig
from .deriving import Derived, derive, separation_by_layer
from .encoding import encode
from .erasure import eraser, inlp
from .errors import (
    ArchitectureError,
    ArgumentTypeError,
    ArgumentValueError,
    DataError,
    FileFormatError,
    FusionStateError,
    InfoShapeError,
    InfoTypeError,
    InfoValueError,
    LayerfuseError,
    LayerIndexError,
    MeasurementError,
    MergeError,
    ModelNotFoundError,
    UnknownNameError,
)
from .estimators import mean_difference, pca, probe
from .exporting import export_merged, save_merged
from .fusion import Fusion, FusionGroup, fuse, fuse_many
from .lab.compare import Comparison, compare
from .merging import Merged, merge
from .methods import (
    METHODS,
    Ablate,
    Addition,
    Clamp,
    Concat,
    CrossAttention,
    Erase,
    Film,
    Gate,
    Interpolate,
    Method,
    Multiplication,
    Project,
    Replace,
    Scale,
    register_method,
)
from .models import load_model
from .saving import load_config, load_fusion
from .sites import ModelSites, StackSites, inspect
from .sweep import sweep
from .training import train
from .words import WordInfo, word_info


def __getattr__(name: str) -> object:
    """`layerfuse.FusionTrainer`, imported when first asked for: it needs accelerate (`layerfuse[train]`)."""
    if name == "FusionTrainer":
        from .trainer import FusionTrainer

        return FusionTrainer
    raise AttributeError(f"module 'layerfuse' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "Ablate",
    "Addition",
    "ArchitectureError",
    "ArgumentTypeError",
    "ArgumentValueError",
    "Clamp",
    "Comparison",
    "Concat",
    "CrossAttention",
    "DataError",
    "Derived",
    "Erase",
    "FileFormatError",
    "Film",
    "Fusion",
    "FusionConfig",
    "FusionGroup",
    "FusionStateError",
    "Gate",
    "InfoShapeError",
    "InfoTypeError",
    "InfoValueError",
    "Interpolate",
    "LayerIndexError",
    "LayerfuseError",
    "MeasurementError",
    "MergeError",
    "Merged",
    "Method",
    "ModelNotFoundError",
    "ModelSites",
    "Multiplication",
    "Project",
    "Replace",
    "Scale",
    "StackSites",
    "UnknownNameError",
    "WordInfo",
    "capture",
    "compare",
    "derive",
    "encode",
    "eraser",
    "export_merged",
    "fuse",
    "fuse_many",
    "inlp",
    "inspect",
    "load_config",
    "load_fusion",
    "load_model",
    "mean_difference",
    "merge",
    "pca",
    "probe",
    "register_method",
    "save_merged",
    "separation_by_layer",
    "sweep",
    "train",
    "word_info",
]

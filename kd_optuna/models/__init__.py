"""Models: the CIFAR zoo, the digits CNNs, torchvision / timm entries, and the tap.

    model = build_model("resnet20", num_classes=100)
    tapped = tap_model(model, "resnet20")           # or tap_model(model, nodes={...})
    out = tapped(x)                                 # {"feat", "emb", "logit"}, one forward
    knowledge_shapes(tapped, (3, 32, 32))           # {"feat": (64, 8, 8), "emb": (64,), "logit": (100,)}
"""

from .registry import (
    MODEL_NAMES,
    ModelEntry,
    UnknownModel,
    build_model,
    build_model_skeleton,
    forward_error,
    input_mismatch,
    model_entry,
)
from .tap import KNOWLEDGE, TapError, TappedModel, check_nodes, knowledge_shapes, tap_model
from .vit import MissingExtra

__all__ = [
    "KNOWLEDGE",
    "MODEL_NAMES",
    "MissingExtra",
    "ModelEntry",
    "TapError",
    "TappedModel",
    "UnknownModel",
    "build_model",
    "build_model_skeleton",
    "check_nodes",
    "forward_error",
    "input_mismatch",
    "knowledge_shapes",
    "model_entry",
    "tap_model",
]

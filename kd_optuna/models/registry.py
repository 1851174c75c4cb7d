"""One registry of model names: ``build_model(name, num_classes)`` and the tap nodes of each.

Names follow RepDistiller / mdistiller for the CIFAR zoo (``resnet8`` .. ``ShuffleV2``, and the
CIFAR-resolution ``ResNet18`` / ``ResNet50``; ``mobile_half`` is an alias of ``MobileNetV2``), ``digits_teacher`` / ``digits_student`` for the
embedded task, torchvision's ImageNet ``resnet18/34/50`` and ``mobilenet_v2`` (random init), and
``vit_tiny_cifar`` / ``deit_tiny`` (timm, optional).

Outside the zoo, any torchvision classifier is a model by its name in
``torchvision.models.list_models(module=torchvision.models)`` (``mobilenet_v3_small``,
``efficientnet_b0``, ``convnext_tiny``, ...), and, when timm is installed, any timm model by its
``timm.list_models()`` name; ``torchvision:NAME`` / ``timm:NAME`` pick one library where both have
the name. They are built with random weights (``weights=None`` / ``pretrained=False``: nothing is
downloaded), take 3-channel images of any size, and need tap nodes from the config
(``nodes = {feat = ..., emb = ..., logit = ...}``) unless the tap recognises them (torchvision
ResNet / MobileNetV2, timm Vision Transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import KdOptunaError
from . import digits, mobilenetv2, resnet, resnet_v2, shufflenet, vgg, vit, wrn


class UnknownModel(KdOptunaError, KeyError):
    """A model name that the registry does not have."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class ModelEntry:
    """How to build a model and which graph nodes the tap reads.

    ``nodes`` maps ``feat``, ``emb`` and ``logit`` to torch.fx node names (a module path names
    the last node inside that module); ``feat_transform(model)``, when set, returns a function
    applied to the tapped ``feat`` tensor (ViT tokens -> patch grid)."""

    factory: Callable[..., nn.Module]
    nodes: dict[str, str] | None
    input_shape: tuple[int, int, int] | None
    feat_transform: Callable[[nn.Module], Callable] | None = field(default=None)
    #: "zoo", "torchvision" or "timm"; ``input_shape`` None: 3-channel images of any size.
    source: str = "zoo"


def _torchvision(name: str):
    def build(num_classes: int = 1000, **kwargs) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs)

    return build


_TV_RESNET = {"feat": "layer4", "emb": "flatten", "logit": "fc"}
_CIFAR = (3, 32, 32)

_REGISTRY: dict[str, ModelEntry] = {
    "digits_teacher": ModelEntry(digits.digits_teacher, digits.DigitsCNN.tap_nodes, (1, 16, 16)),
    "digits_student": ModelEntry(digits.digits_student, digits.DigitsCNN.tap_nodes, (1, 16, 16)),
    **{
        f"resnet{d}": ModelEntry(resnet.cifar_resnet(d), resnet.CifarResNet.tap_nodes, _CIFAR)
        for d in (8, 14, 20, 32, 44, 56, 110)
    },
    "resnet8x4": ModelEntry(resnet.cifar_resnet(8, wide=True), resnet.CifarResNet.tap_nodes, _CIFAR),
    "resnet32x4": ModelEntry(resnet.cifar_resnet(32, wide=True), resnet.CifarResNet.tap_nodes, _CIFAR),
    **{
        f"wrn_{d}_{k}": ModelEntry(wrn.wide_resnet(d, k), wrn.WideResNet.tap_nodes, _CIFAR)
        for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))
    },
    **{name: ModelEntry(vgg.vgg_bn(name), vgg.VGG.tap_nodes, _CIFAR) for name in vgg.CONFIGS},
    "MobileNetV2": ModelEntry(mobilenetv2.mobilenet_v2_half, mobilenetv2.MobileNetV2.tap_nodes, _CIFAR),
    "mobile_half": ModelEntry(mobilenetv2.mobilenet_v2_half, mobilenetv2.MobileNetV2.tap_nodes, _CIFAR),
    "ShuffleV1": ModelEntry(shufflenet.ShuffleNetV1, shufflenet.ShuffleNetV1.tap_nodes, _CIFAR),
    "ShuffleV2": ModelEntry(shufflenet.ShuffleNetV2, shufflenet.ShuffleNetV2.tap_nodes, _CIFAR),
    "ResNet18": ModelEntry(resnet_v2.cifar_resnet18, resnet_v2.CifarResNetV2.tap_nodes, _CIFAR),
    "ResNet50": ModelEntry(resnet_v2.cifar_resnet50, resnet_v2.CifarResNetV2.tap_nodes, _CIFAR),
    **{n: ModelEntry(_torchvision(n), _TV_RESNET, (3, 224, 224)) for n in ("resnet18", "resnet34", "resnet50")},
    "mobilenet_v2": ModelEntry(
        _torchvision("mobilenet_v2"), {"feat": "features", "emb": "flatten", "logit": "classifier"}, (3, 224, 224)
    ),
    "vit_tiny_cifar": ModelEntry(
        vit.vit_tiny_cifar,
        {"feat": "norm", "emb": "fc_norm", "logit": "head"},
        _CIFAR,
        feat_transform=lambda model: vit.tokens_to_map(getattr(model, "num_prefix_tokens", 1)),
    ),
    "deit_tiny": ModelEntry(
        vit.deit_tiny,
        {"feat": "norm", "emb": "fc_norm", "logit": "head"},
        (3, 224, 224),
        feat_transform=lambda model: vit.tokens_to_map(getattr(model, "num_prefix_tokens", 1)),
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _timm_factory(name: str):
    def build(num_classes: int = 1000, **kwargs) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)

    return build


def _torchvision_classifiers() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _timm_has(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name)) and not name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))


def _external_entry(name: str) -> ModelEntry | None:
    library, _, bare = name.partition(":") if ":" in name else ("", "", name)
    if library in ("", "torchvision") and bare in _torchvision_classifiers():
        return ModelEntry(_torchvision(bare), None, None, source="torchvision")
    if library in ("", "timm") and _timm_has(bare):
        return ModelEntry(_timm_factory(bare), None, None, source="timm")
    return None


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``: the zoo's, else a torchvision / timm classifier's (see the
    module docstring); an unknown name raises UnknownModel listing the zoo."""
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None and isinstance(name, str):
        entry = _external_entry(name)
    if entry is None:
        timm_hint = "" if _timm_installed() else " (timm's too once `pip install timm` is done)"
        raise UnknownModel(
            f"unknown model {name!r}{_close_matches(name)}; use a torchvision classifier name such as "
            f"mobilenet_v3_small{timm_hint}, "
            f"or one of the zoo: {', '.join(MODEL_NAMES)}"
        )
    return entry


def _close_matches(name: object) -> str:
    """' (did you mean A, B?)' naming up to three known model names close to ``name``
    (``difflib``'s ratio, case ignored), or ''."""
    import difflib

    known = [*MODEL_NAMES, *_torchvision_classifiers()]
    if _timm_installed():
        import timm

        known += timm.list_models()
    by_lower = {k.lower(): k for k in reversed(known)}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=3, cutoff=0.75)
    return f" (did you mean {', '.join(by_lower[c] for c in close)}?)" if close else ""


def _timm_installed() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def input_mismatch(name: str, input_shape: tuple[int, int, int], any_size: bool) -> str | None:
    """What model ``name`` takes that ``input_shape`` (C, H, W) images are not, read from its
    registry entry (``takes (3, 32, 32) inputs``, ``takes 3-channel images``), or None where it
    may take them. A torchvision or timm classifier takes 3-channel images of any size; a zoo
    model its own shape, or with ``any_size`` (an image folder's crops) its own channels, the
    size left to :func:`forward_error` (a ViT's patch grid is fixed, a ResNet pools any size)."""
    entry = model_entry(name)
    if entry.input_shape is None:
        return None if input_shape[0] == 3 else "takes 3-channel images"
    if any_size:
        return None if input_shape[0] == entry.input_shape[0] else f"takes {entry.input_shape[0]}-channel images"
    return None if tuple(entry.input_shape) == tuple(input_shape) else f"takes {tuple(entry.input_shape)} inputs"


@torch.no_grad()
def blank_forward(model: nn.Module, input_shape: tuple[int, ...]):
    """``model``'s output for a zero batch (2, *input_shape) on its device, in eval mode
    without gradients; its mode is restored whatever the forward raises."""
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    try:
        return model(torch.zeros((2, *input_shape), device=device))
    finally:
        model.train(was_training)


def forward_error(model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """``Type: first line`` of what :func:`blank_forward` raises, or None when it runs."""
    try:
        blank_forward(model, input_shape)
    except Exception as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
    return None


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A freshly initialised model ``name`` with ``num_classes`` outputs; kwargs go to its factory."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise KdOptunaError(f"num_classes must be a positive integer, got {num_classes!r}")
    return model_entry(name).factory(num_classes=num_classes, **kwargs)


def build_model_skeleton(name: str, num_classes: int) -> nn.Module:
    """``build_model(name, num_classes)`` on the meta device (shapes without weights: nothing
    allocated), to check names and shapes; a factory that computes with tensors while it builds
    (torchvision's RegNets derive their widths so) cannot run there and is built on the CPU."""
    try:
        with torch.device("meta"):
            return build_model(name, num_classes)
    except NotImplementedError:
        return build_model(name, num_classes)

"""A small DeiT-style Vision Transformer from timm, an optional extra (``pip install timm``).

``vit_tiny_cifar``: DeiT-Ti's width (embed 192, 3 heads, MLP ratio 4) at CIFAR resolution,
patch 4 on 32x32 images -> 64 patch tokens + 1 class token; depth 12 (5.4M parameters for 100
classes). Keyword arguments go to timm's ``VisionTransformer`` (``depth``, ``embed_dim``,
``img_size``, ``in_chans``, ...), so smaller students or other inputs are one call away.
``deit_tiny``: the same at 224x224 with patch 16, as seed F.3 trains it beside a CIFAR teacher
(tap that teacher with ``input_size=32``).

Tapped with torch.fx like every model: feat = output of the final ``norm`` (N, 1 + L, D),
given to users as the patch-token grid (N, D, h, w) with the class token dropped (see
``tokens_to_map``), emb = the class token after ``fc_norm`` (N, D), logit = ``head`` (N, K).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import KdOptunaError


class MissingExtra(KdOptunaError, ImportError):
    """An optional dependency that a requested model needs is not installed."""


def _timm_vision_transformer():
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:
        raise MissingExtra("ViT students need timm: install it with `pip install timm`") from exc
    return VisionTransformer


def vit_tiny_cifar(num_classes: int = 100, **kwargs) -> nn.Module:
    settings = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0)
    settings.update(kwargs)
    return _timm_vision_transformer()(num_classes=num_classes, **settings)


def deit_tiny(num_classes: int = 100, **kwargs) -> nn.Module:
    """DeiT-Ti proper: 224x224 inputs, patch 16 (196 patch tokens), embed 192, depth 12, 3 heads."""
    settings = dict(img_size=224, patch_size=16)
    settings.update(kwargs)
    return vit_tiny_cifar(num_classes, **settings)


def is_timm_token_model(model: nn.Module) -> bool:
    """A timm transformer with patch tokens behind ``num_prefix_tokens`` class (and
    distillation) tokens: ViT, DeiT, CaiT, XCiT..."""
    return all(hasattr(model, a) for a in ("patch_embed", "num_prefix_tokens", "head"))


def prefix_tokens(model: nn.Module) -> int | None:
    """The class (and distillation) tokens before the patch tokens of a token model whose
    tokens the tap reads as the patch grid: a timm token model's ``num_prefix_tokens``,
    torchvision's ViT's one class token; None for other models."""
    if is_timm_token_model(model):
        return int(model.num_prefix_tokens)
    import torchvision

    return 1 if isinstance(model, torchvision.models.VisionTransformer) else None


def tokens_to_map(prefix_tokens: int):
    """(N, P + h*w, D) tokens -> (N, D, h, w) patch grid in timm's row-major patch order,
    dropping the P prefix (class) tokens; a node without prefix tokens, (N, h*w, D), is
    reshaped as it is. Tokens that form no square grid are returned unchanged."""

    def convert(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3:
            return tokens
        count = tokens.shape[1]
        for drop in (prefix_tokens, 0):
            side = math.isqrt(max(count - drop, 0))
            if side > 0 and side * side == count - drop:
                return tokens[:, drop:].transpose(1, 2).unflatten(2, (side, side))
        return tokens

    return convert

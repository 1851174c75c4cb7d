"""The weight initialisation the CIFAR zoo shares (RepDistiller's, per model family).

Convolutions: He normal with fan-out, ``N(0, 2 / (k_h * k_w * C_out))``, and a zero bias where
there is one. BatchNorm: weight 1, bias 0. Linear layers: ``N(0, linear_std^2)`` weights where
a family sets ``linear_std`` (VGG, WRN keeps PyTorch's default weights), zero bias; untouched
when ``linear_bias`` is False (the ResNets).
"""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module, *, linear_std: float | None = None, linear_bias: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_bias:
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)

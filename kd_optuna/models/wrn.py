"""Wide ResNets WRN-d-k for CIFAR (Zagoruyko & Komodakis 2016), pre-activation blocks.

Parameter names follow RepDistiller / mdistiller (``block{1,2,3}.layer.{i}.bn1``, ``convShortcut``,
final ``bn1``, ``fc``). Widths (16, 16k, 32k, 64k); for a (N, 3, 32, 32) input:
block1 (N, 16k, 32, 32) -> block2 (N, 32k, 16, 16) -> block3 (N, 64k, 8, 8)
-> relu(bn1(.)) = feat (N, 64k, 8, 8) -> global average pool -> emb (N, 64k) -> fc -> logit (N, K).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kd_optuna.models.init import init_weights


class WideBlock(nn.Module):
    """Pre-activation block: a = relu(bn1(x)); out = conv2(relu(bn2(conv1(a)))) + s, where the
    shortcut s is x when shapes match and convShortcut(a) otherwise."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        shortcut = x if self.convShortcut is None else self.convShortcut(a)
        return out + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN of depth 6n+4 and widen factor k."""

    tap_nodes = {"feat": "relu", "emb": "flatten", "logit": "fc"}

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def wide_resnet(depth: int, widen_factor: int):
    """Factory ``num_classes -> WideResNet`` for wrn_{depth}_{widen_factor}."""

    def build(num_classes: int = 100) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes)

    return build

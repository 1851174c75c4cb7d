"""CIFAR ResNets (He et al. 2016, the 6n+2 family) as the distillation literature uses them.

Parameter names follow RepDistiller / mdistiller (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv1``,
``...downsample.0``, ``fc``) so their ``ckpt_epoch_240.pth`` teachers load unchanged.

Shapes for a (N, 3, 32, 32) input and widths (w0, w1, w2, w3):
stem (N, w0, 32, 32) -> layer1 (N, w1, 32, 32) -> layer2 (N, w2, 16, 16) -> layer3 (N, w3, 8, 8)
-> global average pool -> emb (N, w3) -> fc -> logit (N, K).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kd_optuna.models.init import init_weights


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); shortcut is identity or 1x1 conv + BN."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet of depth 6n+2 with three stages of n basic blocks each."""

    tap_nodes = {"feat": "layer3", "emb": "flatten", "logit": "fc"}

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self, linear_bias=False)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def cifar_resnet(depth: int, wide: bool = False):
    """Factory ``num_classes -> CifarResNet`` for resnet{depth} (or resnet{depth}x4 when wide)."""

    def build(num_classes: int = 100) -> CifarResNet:
        return CifarResNet(depth, _WIDE if wide else _NARROW, num_classes)

    return build

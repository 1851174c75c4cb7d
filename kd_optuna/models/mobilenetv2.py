"""MobileNetV2 for CIFAR as RepDistiller's ``mobile_half`` (expansion 6, width 0.5).

Parameter names follow RepDistiller / mdistiller (``conv1.{0,1}``, ``blocks.{s}.{i}.conv.{0..7}``,
``conv2.{0,1}``, ``classifier.0``); unlike torchvision, every inverted residual keeps its 1x1
expansion conv even when the expansion is 1. For a (N, 3, 32, 32) input: stem stride 2 -> 16x16,
stage strides 1,1,2,2,1,2,1 -> (N, 160, 2, 2) -> conv2 1x1 -> feat (N, 1280, 2, 2)
-> global average pool -> emb (N, 1280) -> logit (N, K).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_optuna.models.init import init_weights

# expansion t, output channels c, repeats n, first stride s
_STAGES = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup), nn.ReLU()
    )


class InvertedResidual(nn.Module):
    """x + pw_linear(dw(pw(x))) when stride 1 and in == out channels, else pw_linear(dw(pw(x)))."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    tap_nodes = {"feat": "conv2", "emb": "flatten", "logit": "classifier"}

    def __init__(self, num_classes: int = 100, expansion: int = 6, width_mult: float = 0.5):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _STAGES:
            out = int(c * width_mult)
            t = t if t == 1 else expansion
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def mobilenet_v2_half(num_classes: int = 100) -> MobileNetV2:
    """RepDistiller's ``mobile_half`` / mdistiller's ``MobileNetV2``."""
    return MobileNetV2(num_classes, expansion=6, width_mult=0.5)

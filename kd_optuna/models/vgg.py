"""VGG with batch norm for CIFAR (fully connected layers removed, one linear classifier).

Parameter names follow RepDistiller / mdistiller: five conv blocks ``block0..block4`` (each a
Sequential of conv(bias) + BN + ReLU, the last ReLU dropped), ``classifier``. For a
(N, 3, 32, 32) input: block0 at 32x32, max-pool, block1 at 16, pool, block2 at 8, pool, block3
at 4, block4 at 4 (a fourth pool only with ``pool_before_last=True``, RepDistiller's 64x64
setting) -> feat (N, 512, 4, 4) -> global average pool -> emb (N, 512) -> logit (N, K).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kd_optuna.models.init import init_weights

CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [
        [64, 64],
        [128, 128],
        [256, 256, 256, 256],
        [512, 512, 512, 512],
        [512, 512, 512, 512],
    ],
}


def _conv_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    tap_nodes = {"feat": "feat_relu", "emb": "flatten", "logit": "classifier"}

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, pool_before_last: bool = False):
        super().__init__()
        in_channels = [3] + [stage[-1] for stage in cfg[:-1]]
        self.block0 = _conv_block(cfg[0], in_channels[0])
        self.block1 = _conv_block(cfg[1], in_channels[1])
        self.block2 = _conv_block(cfg[2], in_channels[2])
        self.block3 = _conv_block(cfg[3], in_channels[3])
        self.block4 = _conv_block(cfg[4], in_channels[4])
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2) if pool_before_last else nn.Identity()
        self.feat_relu = nn.ReLU()
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = self.pool3(F.relu(self.block3(x)))
        x = self.feat_relu(self.block4(x))
        x = torch.flatten(self.pool4(x), 1)
        return self.classifier(x)


def vgg_bn(name: str):
    """Factory ``num_classes -> VGG`` for vgg8/11/13/16/19 (all with batch norm)."""

    def build(num_classes: int = 100, pool_before_last: bool = False) -> VGG:
        return VGG(CONFIGS[name], num_classes, pool_before_last)

    return build

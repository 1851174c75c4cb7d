"""Two small CNNs for the embedded digits task (1 x 16 x 16 inputs, see kd_optuna.data).

Both are three 3x3 conv + BN + ReLU layers with 2x2 max-pools between them and a global
average pool (pooling early keeps a teacher epoch cheap on a CPU):
(N, 1, 16, 16) -> (N, w1, 16, 16) -> max-pool -> (N, w2, 8, 8) -> max-pool -> feat (N, w3, 4, 4);
emb = mean over H, W of feat (N, w3); logit = fc(emb) (N, K).
Teacher widths (32, 64, 128): 94,186 parameters for 10 classes. Student widths
(16, 32, 32): 14,458.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, padding=1, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


class DigitsCNN(nn.Module):
    tap_nodes = {"feat": "features", "emb": "flatten", "logit": "fc"}

    def __init__(self, widths: tuple[int, int, int], num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w1),
            nn.MaxPool2d(2),
            _conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),
            _conv_bn_relu(w2, w3),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def digits_teacher(num_classes: int = 10) -> DigitsCNN:
    return DigitsCNN((32, 64, 128), num_classes)


def digits_student(num_classes: int = 10) -> DigitsCNN:
    return DigitsCNN((16, 32, 32), num_classes)

"""ReviewKD: knowledge review (Chen, Liu, Zhao & Jia, CVPR 2021), on the two levels the tap gives.

The paper reviews the student's stages from the deepest to the shallowest: at each level i a
trainable attention-based fusion (ABF) mixes the student's level-i feature with the fused
result of the deeper levels, and a hierarchical context loss (HCL) compares the output with the
teacher's level-i feature. Its levels are the 4 stage outputs plus the pooled feature (as a
1 x 1 map); the tap gives only the last two, so this is ReviewKD on

    level 2: ``emb`` (N, D) as a (N, D, 1, 1) map      (the paper's deepest level, unchanged)
    level 1: ``feat`` (N, C, H, W), the last stage map

and the loss is ``weight * warm-up * (HCL(Y_1, T_feat) + HCL(Y_2, T_emb))``, where

    X_2 = BN(conv1x1(emb_s));                         Y_2 = BN(conv3x3(X_2))
    X_1' = BN(conv1x1(feat_s));  R = nearest(X_2, H_s x W_s)
    [a, b] = sigmoid(conv1x1([X_1', R]));  X_1 = nearest(a * X_1' + b * R, H_t x W_t)
    Y_1 = BN(conv3x3(X_1))
    HCL(Y, T) = (MSE(Y, T) + sum_{l in 4,2,1; l < H} 2^-j MSE(pool_l Y, pool_l T)) / (1 + sum 2^-j)

(j = 1, 2, ... over the pool sizes kept; pool_l is adaptive average pooling to l x l; MSE is a
mean over all elements). The ABF convolutions map the student's channels to a middle width
min(512, D_s) and then to the teacher's, so the two sides may differ in width and map size.

Why this method: the project's tap offers one feature map and its pooled vector, not the
multi-stage features ReviewKD was designed for. Among strong feature distillers it is the one
whose own deepest level and review step (the deeper level's residual fused into the shallower
level by ABF) exist unchanged on those two tensors. What is lost are the three earlier
stages, and with them most of the review (the paper's cross-stage paths, where the teacher's
earlier stages supervise fusions of the student's deeper ones), so numbers from this
adaptation are not the paper's. The
single-map alternatives (FitNets, AT, SP, CWD) are already classics in the search space.

Published defaults (CIFAR-100; the authors' CIFAR-100 scripts and mdistiller): weight 5 for
resnet32x4 -> resnet8x4 and the wrn_40_2 / ShuffleNetV1 pairs (8 for resnet32x4 ->
ShuffleNetV2, 0.6 for resnet56 -> resnet20, 1 for resnet110 -> resnet32), CE weight 1, a
linear warm-up over 20 epochs: ``min((epoch + 1) / warmup_epochs, 1)`` with the 0-based epoch
that the trainer gives ``set_epoch`` (mdistiller's ``min(epoch / 20, 1)``, epochs from 1;
before any ``set_epoch`` the factor is 1). The ABF layers are trainable and in
``.parameters()``; their batch norms need batches of 2 or more in training mode.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kd_optuna.distill.baselines._base import BaselineLoss, InvalidBaseline, Shapes, WarmUp, _knowledge_shape

POOL_SIZES = (4, 2, 1)


class ABF(nn.Module):
    """Attention-based fusion: 1x1 conv + BN to ``mid``, fuse with the deeper residual (if
    ``fuse``), resize to the teacher's map, 3x3 conv + BN to ``out``. The authors' layers and
    initialisation (Kaiming uniform, a = 1)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(mid_channels * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C_in, H, W) [, residual (N, mid, h, w)] -> output (N, C_out, *out_size) and
        the fused map (N, mid, *out_size), the next level's residual."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def hcl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """HCL of one level: (N, C, H, W) both -> 0-dim, MSE at full size and at the pyramid's
    pooled sizes l < H, weights 1, 1/2, 1/4, ... normalised to sum 1."""
    h = student.shape[2]
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for size in POOL_SIZES:
        if size >= h:
            continue
        weight /= 2.0
        pooled = F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        loss = loss + weight * pooled
        total += weight
    return loss / total


class ReviewKD(BaselineLoss):
    """ReviewKD on ``emb`` and ``feat``; trainable ABF layers ``abf_emb``, ``abf_feat``.

    ``set_epoch(e)`` (0-based) drives the warm-up.
    """

    name = "reviewkd"
    knowledge = "feat"

    def __init__(
        self,
        student_shapes: Shapes,
        teacher_shapes: Shapes,
        *,
        weight: float = 5.0,
        warmup_epochs: float = 20,
        max_mid_channels: int = 512,
    ):
        super().__init__(student_shapes, teacher_shapes)
        self.student_emb = _knowledge_shape(student_shapes, "emb", "student", self.name)
        self.teacher_emb = _knowledge_shape(teacher_shapes, "emb", "teacher", self.name)
        for side, feat, emb in (
            ("student", self.student_shape, self.student_emb),
            ("teacher", self.teacher_shape, self.teacher_emb),
        ):
            if len(feat) != 3 or len(emb) != 1:
                raise InvalidBaseline(
                    f"{self.name}: the {side}'s feat must be (C, H, W) and emb (D,) per sample; "
                    f"got {feat} and {emb}"
                )
        if max_mid_channels < 1:
            raise InvalidBaseline(f"{self.name}: max_mid_channels={max_mid_channels}; give 1 or more")
        self.weight = float(weight)
        self.warmup = WarmUp(warmup_epochs, self.name)
        mid = min(int(max_mid_channels), self.student_emb[0])
        self.abf_emb = ABF(self.student_emb[0], mid, self.teacher_emb[0], fuse=False)
        self.abf_feat = ABF(self.student_shape[0], mid, self.teacher_shape[0], fuse=True)

    def set_epoch(self, epoch: float) -> None:
        """Epoch ``epoch`` (0-based) starts: the term is scaled by min((epoch + 1) / warmup, 1)."""
        self.warmup.set_epoch(epoch)

    def forward(self, student, teacher, labels=None, index=None):
        s_feat = self._take(student, self.student_shape, "student")
        s_emb = self._take(student, self.student_emb, "student", "emb")
        t_feat = self._take(teacher, self.teacher_shape, "teacher").detach()
        t_emb = self._take(teacher, self.teacher_emb, "teacher", "emb").detach()
        n = s_feat.shape[0]
        if {s_emb.shape[0], t_feat.shape[0], t_emb.shape[0]} != {n}:
            raise InvalidBaseline(
                f"{self.name}: batches differ (student {n}/{s_emb.shape[0]}, teacher "
                f"{t_feat.shape[0]}/{t_emb.shape[0]}); feed both networks the same images"
            )
        if self.training and n < 2:
            raise InvalidBaseline(f"{self.name}: its batch norms need a batch of 2 or more in training")
        with torch.autocast(s_feat.device.type, enabled=False):
            out_emb, residual = self.abf_emb(s_emb.float()[:, :, None, None], None, (1, 1))
            out_feat, _ = self.abf_feat(s_feat.float(), residual, tuple(self.teacher_shape[1:]))
            loss = hcl_loss(out_feat, t_feat.float()) + hcl_loss(out_emb, t_emb.float()[:, :, None, None])
            return self.warmup.factor * self.weight * loss

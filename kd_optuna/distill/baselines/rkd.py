"""RKD: relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019).

The student learns the teacher's *relations* between samples, not its outputs. On embeddings
s (N, Ds) and t (N, Dt), with the Huber loss l_1 (smooth L1, delta = 1):

distance-wise, with mu the mean distance over the N(N-1) pairs i != j,

    psi_D(x_i, x_j) = ||x_i - x_j||_2 / mu,      L_D = mean_{i,j} l_1(psi_D(s_i, s_j), psi_D(t_i, t_j))

angle-wise, with e_ij = (x_j - x_i) / ||x_j - x_i||_2 (0 when x_i = x_j),

    psi_A(x_i, x_j, x_k) = <e_ij, e_ik>,         L_A = mean_{i,j,k} l_1(psi_A(s..), psi_A(t..))

and the loss ``weight * (w_d * L_D + w_a * L_A)`` with the paper's w_d = 25, w_a = 50. The means
run over all N^2 and N^3 index tuples (degenerate ones are 0 on both sides), as in the authors'
code; both terms are invariant to scaling either embedding.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kd_optuna.distill.baselines._base import BaselineLoss, Shapes

_EPS = 1e-12


def normalised_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) Euclidean distances divided by their mean over pairs i != j.

    The diagonal is exactly 0 and gets no gradient (the squared distance is clamped before
    the square root).
    """
    n = x.shape[0]
    squares = x.pow(2).sum(dim=1)
    squared = (squares[:, None] + squares[None, :] - 2.0 * x @ x.t()).clamp_min(_EPS)
    off_diagonal = 1.0 - torch.eye(n, dtype=x.dtype, device=x.device)
    distances = squared.sqrt() * off_diagonal
    mean = distances.sum() / max(n * (n - 1), 1)
    return distances / mean.clamp_min(_EPS)


def angle_cosines(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N, N): entry [i, j, k] = <e_ij, e_ik>, the cosine of the angle at x_i."""
    directions = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)
    return directions @ directions.transpose(1, 2)


def rkd_distance_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """L_D: Huber between the mean-normalised distance matrices; 0-dim."""
    return F.smooth_l1_loss(normalised_distances(s), normalised_distances(t))


def rkd_angle_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """L_A: Huber between the angle-cosine tensors; 0-dim."""
    return F.smooth_l1_loss(angle_cosines(s), angle_cosines(t))


class RKD(BaselineLoss):
    """RKD-DA on the pooled embeddings ``emb``; no trainable parameters.

    The default ``weight`` 1 with w_d = 25, w_a = 50 is CRD's benchmark setting on CIFAR-100.
    """

    name = "rkd"
    knowledge = "emb"

    def __init__(
        self,
        student_shapes: Shapes,
        teacher_shapes: Shapes,
        *,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        weight: float = 1.0,
    ):
        super().__init__(student_shapes, teacher_shapes)
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)
        self.weight = float(weight)

    def compute(self, s, t, labels, index):
        loss = self.distance_weight * rkd_distance_loss(s, t)
        loss = loss + self.angle_weight * rkd_angle_loss(s, t)
        return self.weight * loss

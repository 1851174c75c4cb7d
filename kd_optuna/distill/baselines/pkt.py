"""PKT: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

Each batch of embeddings becomes a distribution over neighbours. With the cosine kernel
scaled to [0, 1],

    K_ij = (1 + cos(x_i, x_j)) / 2,        P_{j|i} = K_ij / sum_k K_ik      (k includes i)

for the student (P^s from s, (N, Ds)) and the teacher (P^t from t, (N, Dt)); the loss is

    weight * (1 / N^2) * sum_{i,j} P^t_{j|i} * log(P^t_{j|i} / P^s_{j|i})

i.e. the KL divergence of each row, averaged over the N x N entries as the authors' code and
RepDistiller do. The two sides may have different widths: only the N x N kernels are compared.
The default weight 3e4 is the one CRD's benchmark (RepDistiller, mdistiller) uses on CIFAR-100.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kd_optuna.distill.baselines._base import BaselineLoss, Shapes

_EPS = 1e-7


def neighbour_probabilities(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N): row i is P_{.|i} from the cosine kernel (1 + cos) / 2."""
    unit = F.normalize(x, dim=1, eps=_EPS)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True).clamp_min(_EPS)


def pkt_divergence(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over the N x N entries of P^t log(P^t / P^s); 0-dim, 0 when the kernels agree."""
    p_s = neighbour_probabilities(s)
    p_t = neighbour_probabilities(t)
    return (p_t * (torch.log(p_t + _EPS) - torch.log(p_s + _EPS))).mean()


class PKT(BaselineLoss):
    """PKT on the pooled embeddings ``emb`` (N, Ds) and (N, Dt); no trainable parameters."""

    name = "pkt"
    knowledge = "emb"

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes, *, weight: float = 3e4):
        super().__init__(student_shapes, teacher_shapes)
        self.weight = float(weight)

    def compute(self, s, t, labels, index):
        return self.weight * pkt_divergence(s, t)

"""CRD: contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

Two linear heads map the embeddings s (N, Ds) and t (N, Dt) to unit vectors in a d-dim space
(d = 128): g_s = normalise(W_s s + b_s), g_t = normalise(W_t t + b_t). A memory bank holds
one unit vector per training sample for each side (M_s, M_t: (num_data, d) buffers). For a
sample with dataset index i, its positive is row i of the other side's bank and its K
negatives are rows drawn uniformly from the other indices. With h(a, b) = exp(<a, b>/tau) / Z
(tau = 0.07, Z a constant estimated once as num_data * mean exp(<a, b>/tau) on the first
batch, as in the authors' code) and the noise probability P_n = 1 / num_data, the NCE loss of
an anchor a against its positive p and negatives n_1..n_K is

    l(a) = -log( h(a, p) / (h(a, p) + K P_n) ) - sum_k log( K P_n / (h(a, n_k) + K P_n) )

and CRD's loss is ``weight * mean_i (l(g_s_i vs M_t) + l(g_t_i vs M_s))``: each side is the
anchor once against the other side's bank (the teacher head trains; the teacher does not).
After the scores are taken, a training-mode forward updates the bank rows at the batch's
indices with momentum m = 0.5: M[i] <- normalise(m M[i] + (1 - m) g_i).

The defaults (16384 negatives, weight 0.8) are CRD's on CIFAR-100; ``num_data`` is the size of
the training set the indices come from. One difference from the authors' CIFAR loader, which
draws negatives among samples of other classes: here they are drawn uniformly among all other
samples, so the loss needs no labels of the whole training set.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from kd_optuna.distill.baselines._base import BaselineLoss, InvalidBaseline, Shapes


class EmbedHead(nn.Module):
    """(N, D_in) -> (N, d): a linear map, then L2-normalised rows."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=1)


def draw_negatives(index: torch.Tensor, num_data: int, count: int) -> torch.Tensor:
    """(N,) positives -> (N, count) indices drawn uniformly from range(num_data) minus the row's own.

    A draw r from range(num_data - 1) maps to r + (r >= positive), which skips the positive
    and keeps the rest uniform.
    """
    draws = torch.randint(0, num_data - 1, (index.shape[0], count), device=index.device)
    return draws + (draws >= index[:, None]).long()


def bank_dot(anchor: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(N, d) anchors, (B, d) bank, (N, R) row indices -> (N, R) dot products <a_n, M[rows[n, r]]>.

    Gathering M[rows] reads N * R rows (about 1e6 for CRD's batch of 64 and 16384 negatives);
    when that is more than the bank holds, one product with the whole bank, then a gather of
    the scores, computes the same numbers with far less memory traffic.
    """
    if rows.numel() > memory.shape[0]:
        return (anchor @ memory.t()).gather(1, rows)
    return torch.einsum("nrd,nd->nr", memory[rows], anchor)


def nce_loss(scores: torch.Tensor, noise_probability: float) -> torch.Tensor:
    """NCE loss of (N, 1 + K) normalised scores h (column 0 the positive), summed over the
    K + 1 terms and averaged over the batch; 0-dim."""
    k_noise = (scores.shape[1] - 1) * noise_probability
    positive = torch.log(scores[:, 0] / (scores[:, 0] + k_noise))
    negatives = torch.log(k_noise / (scores[:, 1:] + k_noise)).sum(dim=1)
    return -(positive + negatives).mean()


class CRD(BaselineLoss):
    """CRD on the pooled embeddings ``emb``; trainable heads ``embed_student``, ``embed_teacher``.

    Forward needs ``index`` (N,), each sample's position in the training set.
    """

    name = "crd"
    knowledge = "emb"
    needs_index = True

    def __init__(
        self,
        student_shapes: Shapes,
        teacher_shapes: Shapes,
        *,
        num_data: int,
        num_negatives: int = 16384,
        feat_dim: int = 128,
        temperature: float = 0.07,
        momentum: float = 0.5,
        weight: float = 0.8,
    ):
        super().__init__(student_shapes, teacher_shapes)
        if num_data < 2:
            raise InvalidBaseline(f"crd: num_data={num_data}; the bank needs at least 2 samples")
        if num_negatives < 1:
            raise InvalidBaseline(f"crd: num_negatives={num_negatives}; give at least 1")
        if not 0.0 <= momentum < 1.0:
            raise InvalidBaseline(f"crd: momentum={momentum}; choose a value in [0, 1)")
        self.num_data = int(num_data)
        self.num_negatives = int(num_negatives)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.weight = float(weight)
        self.embed_student = EmbedHead(self.student_dim, feat_dim)
        self.embed_teacher = EmbedHead(self.teacher_dim, feat_dim)
        self.register_buffer("memory_student", _random_unit_rows(num_data, feat_dim))
        self.register_buffer("memory_teacher", _random_unit_rows(num_data, feat_dim))
        self.register_buffer("z_student_anchor", torch.tensor(-1.0))
        self.register_buffer("z_teacher_anchor", torch.tensor(-1.0))

    def compute(self, s, t, labels, index):
        index = index.to(device=s.device, dtype=torch.long).flatten()
        if index.shape[0] != s.shape[0]:
            raise InvalidBaseline(f"crd: {index.shape[0]} indices for a batch of {s.shape[0]}")
        if int(index.min()) < 0 or int(index.max()) >= self.num_data:
            raise InvalidBaseline(
                f"crd: indices must lie in [0, {self.num_data}); got "
                f"[{int(index.min())}, {int(index.max())}]; build CRD with num_data=len(train set)"
            )
        g_s = self.embed_student(s)
        g_t = self.embed_teacher(t)
        rows = torch.cat([index[:, None], draw_negatives(index, self.num_data, self.num_negatives)], 1)
        scores_s = self._scores(g_s, self.memory_teacher, rows, self.z_student_anchor)
        scores_t = self._scores(g_t, self.memory_student, rows, self.z_teacher_anchor)
        noise = 1.0 / self.num_data
        loss = nce_loss(scores_s, noise) + nce_loss(scores_t, noise)
        if self.training:
            self.memory_student = self._updated(self.memory_student, g_s, index)
            self.memory_teacher = self._updated(self.memory_teacher, g_t, index)
        return self.weight * loss

    def _scores(
        self, anchor: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """(N, d) anchors, (N, 1+K) bank rows -> (N, 1+K) h = exp(<a, M[row]>/tau) / Z."""
        raw = torch.exp(bank_dot(anchor, memory, rows) / self.temperature)
        if z.item() < 0:
            z.fill_(raw.detach().mean().item() * self.num_data)
        return raw / z

    @torch.no_grad()
    def _updated(self, memory: torch.Tensor, embedded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """A new bank with rows ``index`` moved towards ``embedded``. Out of place: the scores'
        backward still needs the bank they were computed from."""
        mixed = self.momentum * memory[index] + (1.0 - self.momentum) * embedded.detach()
        return memory.index_copy(0, index, F.normalize(mixed, dim=1))


def _random_unit_rows(rows: int, dim: int) -> torch.Tensor:
    """Random unit vectors (the authors draw uniform rows of about unit norm, 1/sqrt(dim/3))."""
    stdv = 1.0 / math.sqrt(dim)
    return F.normalize(torch.randn(rows, dim) * stdv, dim=1)

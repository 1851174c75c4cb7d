"""DML: deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018).

No frozen teacher: two students train together, each on its labels and on the other's
current prediction. With p_1 = softmax(z_1 / T), p_2 = softmax(z_2 / T) from logits
z_1, z_2 (N, K):

    L_1 = CE(z_1, y) + weight * T^2 * mean_n KL(p_2 || p_1)      (p_2 detached)
    L_2 = CE(z_2, y) + weight * T^2 * mean_n KL(p_1 || p_2)      (p_1 detached)

with T = 1 and weight = 1 in the paper. Both predictions come from the same batch before
either network steps (the simultaneous variant most implementations use; the paper's
Algorithm 1 re-runs network 1 after its step).

``MutualLearning`` is trainer-side: it holds the peer (network 2) and its optimizer. Per step,
the trainer computes the student's logits, calls ``mutual_term(images, labels, student_logit)``
(which runs, backpropagates and steps the peer) and adds the returned KL term to the
student's CE before its own backward and step.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from kd_optuna.distill.baselines._base import InvalidBaseline


def mutual_kl(logit: torch.Tensor, peer_logit: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean_n KL(softmax(peer/T) || softmax(logit/T)); (N, K), (N, K) -> 0-dim.

    The peer's prediction is detached: the gradient reaches ``logit`` only.
    """
    target = F.log_softmax(peer_logit.detach().float() / temperature, dim=1)
    log_p = F.log_softmax(logit.float() / temperature, dim=1)
    return F.kl_div(log_p, target, reduction="batchmean", log_target=True) * temperature**2


def _logit(outputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(outputs, Mapping):
        if "logit" not in outputs:
            raise InvalidBaseline("dml: the peer's outputs have no 'logit'; tap it or return logits")
        return outputs["logit"]
    return outputs


class MutualLearning:
    """Trains ``peer`` beside the student; the student gets ``weight * T^2 * KL(p_peer || p_student)``.

    ``peer`` returns logits (N, K) or a knowledge dict with ``"logit"`` (a tapped model);
    ``optimizer`` steps the peer's parameters (the trainer's schedule may drive it too).
    """

    name = "dml"

    def __init__(
        self,
        peer: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        temperature: float = 1.0,
        weight: float = 1.0,
    ):
        if temperature <= 0:
            raise InvalidBaseline(f"dml: temperature={temperature}; choose a positive value")
        self.peer = peer
        self.optimizer = optimizer
        self.temperature = float(temperature)
        self.weight = float(weight)

    def peer_step(
        self, images: torch.Tensor, labels: torch.Tensor, student_logit: torch.Tensor
    ) -> torch.Tensor:
        """Run the peer on ``images`` (N, ...), backprop L_2 and step it; its logits, detached."""
        self.peer.train()
        peer_logit = _logit(self.peer(images))
        loss = F.cross_entropy(peer_logit, labels) + self.weight * mutual_kl(
            peer_logit, student_logit, self.temperature
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return peer_logit.detach()

    def mutual_term(
        self, images: torch.Tensor, labels: torch.Tensor, student_logit: torch.Tensor
    ) -> torch.Tensor:
        """Step the peer on this batch, then return the student's term of L_1 (0-dim, no CE)."""
        peer_logit = self.peer_step(images, labels, student_logit)
        return self.weight * mutual_kl(student_logit, peer_logit, self.temperature)

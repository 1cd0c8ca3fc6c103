"""The base-decayed sparsity objective: distillation from the dense teacher at the network output.

KL from the teacher at temperature T to a student whose log-probabilities (temperature 1) are divided by
tau_e = tau_start * tau_decay^e: a logarithm in base e^tau whose base decays over the epochs, so the loss
scale grows as the student approaches the teacher (the reference's `main.py: DistillKL`). Plain Hinton
KD at the same temperature is the paper's ablation. The formulas live in `ptsbench.toolkit.distill`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptsbench.settings import POSITIVE, Settings, option
from ptsbench.toolkit.distill import base_decayed_kl, kd_kl, tau_schedule

OBJECTIVES = ("base_decayed", "kl")

__all__ = ["OBJECTIVES", "ObjectiveSettings", "distillation_loss", "tau_schedule"]


@dataclass(frozen=True)
class ObjectiveSettings(Settings):
    """The `objective` node: base-decayed KL (the paper's) or plain Hinton KD (its ablation)."""

    # base_decayed | kl (plain Hinton KD, ablation); recorded as `objective`
    kind: str = option("base_decayed", OBJECTIVES, record="objective")
    temperature: float = option(4.0, POSITIVE)  # teacher softmax temperature T
    # tau_e = tau_start * tau_decay ** epoch divides the student's log-probabilities
    tau_start: float = option(8.0, POSITIVE)
    tau_decay: float = option(0.99, POSITIVE)


def distillation_loss(objective: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float, tau: float) -> torch.Tensor:
    """UniPTS's base-decayed KL, or plain Hinton KD at the same temperature (the ablation)."""
    if objective == "base_decayed":
        return base_decayed_kl(student_logits, teacher_logits, temperature, tau)
    return kd_kl(student_logits, teacher_logits, temperature)

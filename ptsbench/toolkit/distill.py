"""Knowledge-distillation losses shared by the reconstruction-based PTS methods, and block discovery.

* `kd_kl`: Hinton distillation, T^2 * KL(p_teacher^T || p_student^T) per sample (FCPTS's default at T=4).
* `base_decayed_kl`: UniPTS's objective, the student's log-probabilities at temperature 1 divided by tau.
* `BlockOutputs`: forward hooks that collect the outputs of residual / transformer blocks for block-wise
  MSE (FCPTS's optional layer loss, PTSBench's block reconstruction).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
          temperature: float = 4.0) -> torch.Tensor:
    """T^2 * sum_c p_t (log p_t - log p_s) / B with both softmaxes at temperature T."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def base_decayed_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
                    tau: float = 8.0) -> torch.Tensor:
    """UniPTS: (T^2 / B) * sum_b sum_c p_c (ln p_c - ln q_c / tau).

    p = softmax(teacher / T), q = softmax(student) at temperature 1; ln q / tau is the logarithm of q in
    base e^tau, and tau decays over training (tau_e = 8 * 0.99^e in the reference code).
    """
    t = float(temperature)
    log_p = F.log_softmax(teacher_logits / t, dim=1)
    log_q = F.log_softmax(student_logits, dim=1)
    per_sample = (log_p.exp() * (log_p - log_q / float(tau))).sum(dim=1)
    return per_sample.mean() * (t * t)


def tau_schedule(epoch: int, start: float = 8.0, decay: float = 0.99) -> float:
    """UniPTS's base schedule tau_e = start * decay^epoch."""
    return float(start) * float(decay) ** int(epoch)


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's blocks: the units that block-wise reconstruction matches.

    Found from the module structure rather than per-model names: the children of a `blocks`/`stages`/
    `layerN`-style container (ModuleList or Sequential) that themselves hold at least one Conv2d or
    Linear, i.e. residual blocks in ResNets, inverted-residual blocks in MobileNets and transformer
    blocks in ViTs. Falls back to the model's top-level children that hold weights.
    """
    def has_weights(m: nn.Module) -> bool:
        return any(isinstance(x, (nn.Conv2d, nn.Linear)) for x in m.modules())

    blocks: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                grand = list(child.named_children())
                if grand and all(isinstance(g, (nn.Sequential, nn.ModuleList)) for _, g in grand):
                    visit(f"{full}.", child)  # a container of stages
                elif len(grand) > 1 or (grand and not isinstance(grand[0][1], (nn.Conv2d, nn.Linear))):
                    blocks.extend(f"{full}.{g}" for g, m in grand if has_weights(m) and not _is_leaf_layer(m))
            # other children (stems, heads, norms) are not blocks

    visit("", model)
    if not blocks:
        blocks = [name for name, child in model.named_children() if has_weights(child)]
    return blocks


def _is_leaf_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm))


class BlockOutputs:
    """Context manager: forward hooks that keep the latest output of each named block."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> BlockOutputs:
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.outputs[name] = output if isinstance(output, torch.Tensor) else output[0]
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def block_mse(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of the mean squared difference between student and teacher block outputs."""
    losses = [F.mse_loss(student[name], teacher[name].detach()) for name in teacher]
    return torch.stack(losses).mean()

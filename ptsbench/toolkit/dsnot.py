"""DSnoT, dynamic sparse no training (Zhang et al., ICLR 2024): a training-free refinement of a pruned layer's
mask (`algorithm.refine=dsnot`) after any method that prunes layer by layer (Wanda, SparseGPT, RIA,
magnitude).

Specification (paper, and zyxxmu/DSnoT `lib/prune.py` `prune_DSnoT`, `lib/layerwrapper.py`):
* Each output row i of a pruned layer swaps weights between its pruned and its kept set, one pair per
  cycle, to shrink the error of its expected output e_i = sum_j (W_ij - W'_ij) E[x_j] (W dense, W'
  pruned). The row keeps its count and no weight value changes: DSnoT only moves the mask.
* Growing: with e_i > 0 the pruned weight with the largest W_ij E[x_j] / Var(x_j)^p comes back, with
  e_i < 0 the one with the smallest (p = `--pow_of_var_regrowing`, 1): of two weights that correct the
  mean equally, the one on the quieter input adds less variance to the output.
* Pruning: a kept weight whose contribution W'_ij E[x_j] has the sign opposite to e_i, the lowest Wanda
  score |W'_ij| ||x_j|| first. Under N:M: the kept weight with the lowest score in the grown weight's group
  of M, so that every group keeps N.
* After a swap of q out and r in, e_i += W'_iq E[x_q] - W_ir E[x_r]. A row stops for good once |e_i| is at
  most the update threshold (0.1) or after `--max_cycle_time` (50) cycles. Both lists are fixed at the start
  and walked once each.
* Under N:M a swap must also keep the sign of the row's initial error. The unstructured path has that check
  behind `--without_same_sign`, an argparse `type=bool` flag that is True whatever value it is given, so
  unstructured swaps never check the sign; neither do ours.
* Statistics per input feature: E[x] and Var(x) over the calibration tokens; E[x] enters as the sum over one
  sample's tokens averaged over samples (`sum_metric_row`), which sets the scale the threshold acts on.

Vision adaptation and our choices:
* Rows are a Linear's outputs, or a Conv2d's output channels reading the unfolded input (c, ky, kx); a
  grouped or depthwise conv's row reads only its own group's inputs. A sample is one calibration image, so
  E[x] enters as the per-image sum over positions, the reference's scale with an image for a sequence.
* Var(x) is the variance over every position of every image. The reference averages per-sample variances,
  which is zero for a classifier (one position per image) and would divide by zero. An input with zero
  variance ranks 0 when it never fires (0/0) and first when it is constant (c/0).
* A row stops when its lists have no candidate left on the side it needs, and a stopped row is left alone.
  The reference's growing list holds every weight (kept ones rank 0 in its middle) and its sign-split
  pruning list reads on into the other sign; past their useful entries it grows weights that are already
  kept or prunes kept weights of the wrong sign. It also applies its mask scatter to stopped rows, whose
  pointers walk on and prune the kept weights they reach. Rows of an LLM (4096 inputs) never get there in
  50 cycles; ViT-Tiny's fc1 rows (192) do: 80 of its 127 rows that start below the threshold lose weights
  (results/README.md).
* The reference's default `--skip_layer mlp` leaves LLaMA's MLP layers out; here every pruned layer is
  refined.
* On SparseGPT the refinement starts from its pruned and updated weights (the paper refines "on top of"
  the pruned model): e uses the updated values and the pruning order their Wanda scores, and a grown weight
  comes back at its dense value. The reference's `--initial_method sparsegpt` takes only SparseGPT's
  saliency mask, computed once from the dense weights, and keeps no weight update. Under N:M the pruning
  order is Wanda's for every method; the reference uses the initial method's own score there.
* The calibration protocol is the method's (`algorithm.calib_protocol`); the reference is sequential.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ptsbench.data import CalibrationSet
from ptsbench.errors import ConfigError, unknown_choice
from ptsbench.settings import COUNT, NON_NEGATIVE, Settings, node, option
from ptsbench.toolkit.layerwise import InputMoments, calibrated_prune, layer_groups
from ptsbench.toolkit.patterns import Pattern
from ptsbench.toolkit.sparsity import PrunableLayer

REFINEMENTS = ("none", "dsnot")


@dataclass(frozen=True)
class DSnoTSettings(Settings):
    """`algorithm.dsnot`: the reference's defaults."""

    max_cycles: int = option(50, COUNT)  # --max_cycle_time: swaps per row at most
    update_threshold: float = option(0.1, NON_NEGATIVE)  # a row stops once |e_i| is at most this
    variance_power: float = option(1.0, NON_NEGATIVE)  # --pow_of_var_regrowing: p in W E[x] / Var(x)^p

    def options(self) -> dict[str, Any]:
        return {f"dsnot_{k}": v for k, v in super().options().items()}


@dataclass(frozen=True)
class RefinementSettings(Settings):
    """The refinement keys of a method that may move its masks with DSnoT after pruning (its settings
    dataclass inherits them); neither is in a config unless given."""

    refine: str = option("none", REFINEMENTS, schema=False)
    dsnot: DSnoTSettings | None = node(DSnoTSettings, optional=True)

    def refinement(self) -> DSnoTSettings | None:
        return read_refinement(self.refine, self.dsnot)

    def check_together(self, key: str) -> None:
        self.refinement()  # dsnot's node without refine=dsnot
        super().check_together(key)


def read_refinement(refine: str, dsnot: DSnoTSettings | Mapping[str, Any] | None) -> DSnoTSettings | None:
    """`algorithm.refine` and its settings node: DSnoT's settings, or None for no refinement."""
    if refine not in REFINEMENTS:
        raise unknown_choice("algorithm.refine", refine, REFINEMENTS)
    if refine == "none":
        if dsnot is not None:
            raise ConfigError("algorithm.dsnot sets DSnoT's options, but algorithm.refine=none; use "
                              "algorithm.refine=dsnot or drop algorithm.dsnot.")
        return None
    return DSnoTSettings.read(dsnot, "algorithm.dsnot")


def _front(order: torch.Tensor, take: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the columns of `order` where `take` holds, moved to the front in order, and their count."""
    chosen = take.gather(1, order)
    front = torch.sort((~chosen).to(torch.uint8), dim=1, stable=True).indices
    return order.gather(1, front), chosen.sum(dim=1)


@torch.no_grad()
def dsnot_rows(dense: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor,
               var: torch.Tensor, norms: torch.Tensor, settings: DSnoTSettings,
               m: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """DSnoT on independent rows, all (rows, cols): `dense` and `weight` (the pruned one, zeros where pruned),
    `keep` (bool), and each row's inputs: `mean` (E[x] as a per-sample sum), `var`, `norms` (||x||).
    `m` > 0: every group of m consecutive columns keeps its count (N:M). Returns the new weight, keep and
    the number of swaps."""
    weight, keep = weight.clone(), keep.clone()
    rows, cols = weight.shape
    row = torch.arange(rows, device=weight.device)
    grown = dense * mean  # what a pruned weight adds back to the row's mean output
    held = weight * mean  # what a kept weight takes away when it goes
    error = (grown - held).sum(dim=1)
    rank = torch.where(keep, torch.zeros_like(grown), grown / var.pow(settings.variance_power))
    rank = torch.where(rank.isnan(), torch.zeros_like(rank), rank)
    growing, n_grow = _front(torch.sort(rank, dim=1, stable=True).indices, ~keep)
    low, high = torch.zeros_like(n_grow), n_grow - 1  # next to grow when e < 0, when e > 0
    score = torch.where(keep, weight.abs() * norms, torch.full_like(weight, float("inf")))
    if m == 0:
        by_score = torch.sort(score, dim=1, stable=True).indices
        negatives, n_neg = _front(by_score, keep & (held < 0))
        positives, n_pos = _front(by_score, keep & (held > 0))
        next_neg, next_pos = torch.zeros_like(n_neg), torch.zeros_like(n_pos)
    initial_sign = error.sign()
    active = torch.ones(rows, dtype=torch.bool, device=weight.device)
    swaps = 0
    for _ in range(settings.max_cycles):
        up = error > 0
        active &= (error.abs() > settings.update_threshold) & (low <= high)
        r = growing[row, torch.where(up, high, low).clamp(0, cols - 1)]
        if m == 0:
            active &= torch.where(up, next_neg < n_neg, next_pos < n_pos)
            q = torch.where(up, negatives[row, next_neg.clamp(max=cols - 1)],
                            positives[row, next_pos.clamp(max=cols - 1)])
            next_neg += up.long()
            next_pos += (~up).long()
        else:
            start = r - r % m
            q = start + score.gather(1, start[:, None] + torch.arange(m, device=r.device)).argmin(dim=1)
            active &= score[row, q].isfinite()  # a kept weight not chosen before
            active &= (error + held[row, q] - grown[row, r]).sign() == initial_sign
            score[row, q] = float("inf")  # the reference rules a candidate out whether or not it swaps
        high -= up.long()
        low += (~up).long()
        if not bool(active.any()):
            break
        a = active.nonzero().squeeze(1)
        qa, ra = q[a], r[a]
        error[a] += held[a, qa] - grown[a, ra]
        weight[a, qa] = 0.0
        keep[a, qa] = False
        weight[a, ra] = dense[a, ra]
        keep[a, ra] = True
        swaps += a.numel()
    return weight, keep, swaps


def dsnot_layer(layer: PrunableLayer, dense: torch.Tensor, mask: torch.Tensor, moments: InputMoments,
                images: int, pattern: Pattern, settings: DSnoTSettings) -> tuple[torch.Tensor, int]:
    """Refine a pruned layer in place: its weight holds the pruned values, `dense` the weight before pruning,
    `mask` the {0,1} mask, `moments` its inputs over `images` calibration images. Returns the new mask and
    the number of swaps."""
    w = layer.module.weight
    rows = w.shape[0]
    per_group = rows // layer_groups(layer)
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32

    def by_row(stat: torch.Tensor) -> torch.Tensor:
        return stat.to(dtype).repeat_interleave(per_group, dim=0)

    new, keep, swaps = dsnot_rows(dense.reshape(rows, -1).to(dtype), w.detach().reshape(rows, -1).to(dtype),
                                  mask.reshape(rows, -1) != 0, by_row(moments.sum / images),
                                  by_row(moments.variance()), by_row(moments.squares.sqrt()), settings,
                                  pattern.m if pattern.is_nm else 0)
    w.data.copy_(new.view(w.shape).to(w.dtype))
    return keep.view(w.shape).to(w.dtype), swaps


def refine_masks(model: torch.nn.Module, layers: list[PrunableLayer], masks: Mapping[str, torch.Tensor],
                 calib: CalibrationSet, device: torch.device, progress: bool, protocol: str, batch_size: int,
                 pattern: Pattern, settings: DSnoTSettings) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """DSnoT on masks chosen without calibration data (magnitude): each layer is pruned in place under the
    calibration protocol, then refined. Returns the refined masks and the pass's statistics."""
    refined = dict(masks)
    swaps = 0

    def finish(layer: PrunableLayer, moments: InputMoments) -> None:
        nonlocal swaps
        dense = layer.weight.detach().clone()
        layer.module.weight.data.mul_(masks[layer.name])
        refined[layer.name], n = dsnot_layer(layer, dense, masks[layer.name], moments, len(calib),
                                             pattern, settings)
        swaps += n

    todo = [ly for ly in layers if bool((masks[ly.name] == 0).any())]
    passes, bn_passes = (0, 0) if not todo else calibrated_prune(
        protocol, model, todo, calib, batch_size, InputMoments, finish, device, progress, "DSnoT")
    return refined, {"calib_passes": passes + bn_passes, "dsnot_swaps": swaps}

"""SparseGPT: one-shot pruning with an approximate OBS weight update (Frantar, Alistarh, ICML 2023).

Specification (paper, and IST-DASLab/sparsegpt `sparsegpt.py`, `opt.py`), for a layer y = W x with W of
shape (rows, cols) and calibration inputs X (cols x n):
* Hessian H = (2/n) X X^T, accumulated batch by batch. An input that never fires (H_jj = 0) gets
  H_jj = 1. Dampening: H += lambda * mean(diag H) * I (lambda = `percdamp`, 0.01).
* U = upper Cholesky factor of H^-1; U_jj^2 is the OBS denominator [H_F^-1]_jj of column j once the
  columns before it are frozen, and row j of U (over j..) is the direction that compensates its removal.
* Columns are processed in blocks of B (`blocksize`, 128). At the start of a block (unstructured) the
  block's mask is chosen over all its rows and columns from the saliency w^2 / U_jj^2 of the current,
  already updated weights. Under N:M, at every column j with j % M == 0, each row keeps the N highest
  saliencies of columns j .. j+M-1.
* Column j of the block: q = w_j with masked entries set to 0, err = (w_j - q) / U_jj, the block's later
  columns get W[:, k] -= err * U_jk; after the block the rest of the layer gets W[:, end:] -= Err @ U[block,
  end:] (lazy batch update, exact). With one block this is the exact sequential OBS update of each removed
  weight in column order (tests/test_sparsegpt.py checks it against a textbook implementation).
* Layers are pruned in module order, a block at a time, each calibrated on the outputs of the blocks
  already pruned and updated (`ptsbench.toolkit.layerwise`, as `opt_sequential` does).

Vision adaptation and count rules (our choices):
* Conv2d: H comes from the unfolded input (patch column (c, ky, kx) over all positions and images); W is
  flattened to (out, in/groups x kh x kw). The reference flattens the weight but does not unfold the input,
  so its convolution Hessian is only right if the caller unfolds; we unfold. Grouped and depthwise convs
  are `groups` independent layers with their own Hessians, processed together as a batch.
* Exact counts: the reference prunes every saliency <= the value at index int(p * block size), one weight
  (or more with ties) over p per block. Here block b of a (sub-)layer with k zeros over C columns loses
  round(k * end_b / C) - round(k * start_b / C) weights, so the layer loses exactly its allocation's count.
* Inputs that never fire are not zeroed up front, as the reference does, since that could exceed the
  count; their saliency is set to 0 so they are the first to go, and keeping one costs nothing on the data.
* The per-layer rate comes from the allocation axis (uniform in the paper; ERK, global, global-L2 or a
  learned allocation from another job's allocation.csv here), N:M from the top-level `pattern` key. Under
  N:M the block size is rounded down to a multiple of M (at least M): only the unstructured block mask
  depends on it.
* Arithmetic in float32 (float64 layers stay float64), on the layer's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.oneshot import LayerwiseOneShot, OneShotSettings
from ptsbench.errors import PtsbenchError
from ptsbench.settings import COUNT, POSITIVE, option
from ptsbench.toolkit.layerwise import grouped_weight, layer_groups
from ptsbench.toolkit.patterns import Pattern
from ptsbench.toolkit.sparsity import PrunableLayer

BLOCKSIZE = 128
PERCDAMP = 0.01


class Hessian:
    """Sum of x x^T per group over all calibration positions; `matrix()` is (2/n) X X^T."""

    def __init__(self, layer: PrunableLayer):
        w = layer.module.weight
        cols = w[0].numel()
        self.sum = torch.zeros(layer_groups(layer), cols, cols, dtype=compute_dtype(w), device=w.device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.to(self.sum.dtype)
        self.sum.baddbmm_(x, x.transpose(1, 2))
        self.n += x.shape[-1]

    def matrix(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.n, 1))


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dampened H -> (U, dead): U the upper Cholesky factor of H^-1, dead the inputs that never fired."""
    h = hessian.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean(dim=-1, keepdim=True)
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info.max()) > 0:
        raise PtsbenchError(f"The dampened Hessian is not positive definite (percdamp={percdamp}); "
                            "raise algorithm.percdamp.")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True), dead


def block_zero_counts(zeros: torch.Tensor, cols: int, starts: list[int]) -> torch.Tensor:
    """Zeros per (group, column block) that add up exactly to each group's count: cumulative rounding."""
    edges = torch.tensor(starts + [cols], dtype=torch.float64)
    cumulative = torch.round(zeros.to(torch.float64)[:, None] * edges[None, :] / cols).long()
    return cumulative.diff(dim=1)


def lowest_per_group(saliency: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean (G, R, B): the `counts[g]` lowest saliencies of group g over its whole block, ties by position.

    Linear time (a k-th value, then the tied entries in position order): a stable sort of every block
    would cost more than the block's updates.
    """
    flat = saliency.reshape(saliency.shape[0], -1)
    counts = counts.to(flat.device)
    if int(counts.max()) == 0:
        return torch.zeros_like(saliency, dtype=torch.bool)
    sorted_values = None if bool((counts == counts[0]).all()) else torch.sort(flat, dim=1).values
    if sorted_values is None:
        threshold = torch.kthvalue(flat, int(counts[0]), dim=1).values
    else:
        threshold = sorted_values.gather(1, (counts - 1).clamp_min(0)[:, None]).squeeze(1)
    below = flat < threshold[:, None]
    tied = flat == threshold[:, None]
    missing = counts - below.sum(dim=1)
    drop = below | (tied & (tied.cumsum(dim=1) <= missing[:, None]))
    drop[counts == 0] = False
    return drop.view_as(saliency)


@torch.no_grad()  # updates in place: never part of an autograd graph, whatever its inputs require
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, zeros: torch.Tensor | None = None,
                    pattern: Pattern | None = None, blocksize: int = BLOCKSIZE,
                    percdamp: float = PERCDAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and update a batch of independent layers: weight (G, R, C), hessian (G, C, C).

    `zeros[g]` weights of group g go (unstructured), or every M-group of a row keeps N (`pattern` N:M).
    Returns the updated weights (masked entries exactly 0) and the boolean mask of removed entries.
    """
    nm = pattern is not None and pattern.is_nm
    w = weight.clone()
    groups, rows, cols = w.shape
    u, dead = inverse_cholesky(hessian.to(w.dtype), percdamp)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    if nm:
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    starts = list(range(0, cols, blocksize))
    per_block = None if nm else block_zero_counts(zeros.reshape(groups), cols, starts)
    any_dead = bool(dead.any())  # inputs that never fired: their weights have saliency 0
    for b, i1 in enumerate(starts):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, :, i1:i2].clone()
        u1 = u[:, i1:i2, i1:i2]
        diag1 = u1.diagonal(dim1=-2, dim2=-1)
        denom = diag1.pow(2)[:, None, :]
        dead1 = dead[:, None, i1:i2] if any_dead else None
        errors = torch.zeros_like(w1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if not nm:
            saliency = w1.pow(2) / denom
            mask1 = lowest_per_group(saliency if dead1 is None else saliency.masked_fill(dead1, 0.0),
                                     per_block[:, b])
        for i in range(i2 - i1):
            if nm and i % pattern.m == 0:
                span = slice(i, i + pattern.m)
                saliency = w1[:, :, span].pow(2) / denom[:, :, span]
                if dead1 is not None:
                    saliency = saliency.masked_fill(dead1[..., span], 0.0)
                lowest = torch.topk(saliency, pattern.m - pattern.n, dim=-1, largest=False).indices
                mask1[:, :, span].scatter_(-1, lowest, True)
            col, drop = w1[:, :, i], mask1[:, :, i]
            err = col * drop / diag1[:, i, None]  # (w - q) / U[i, i], q the column with its pruned entries 0
            # the rank-1 update in place: no (G, R, B) temporary per column
            w1[:, :, i + 1:].baddbmm_(err[:, :, None], u1[:, i:i + 1, i + 1:], alpha=-1.0)
            col.masked_fill_(drop, 0.0)
            errors[:, :, i] = err
        w[:, :, i1:i2] = w1
        pruned[:, :, i1:i2] = mask1
        if i2 < cols:
            w[:, :, i2:] -= torch.bmm(errors, u[:, i1:i2, i2:])
    return w, pruned


def group_zero_counts(n_zero: int, groups: int) -> torch.Tensor:
    """A layer's count split over its groups as evenly as whole numbers allow (exact total)."""
    return torch.tensor([(n_zero * (g + 1)) // groups - (n_zero * g) // groups for g in range(groups)])


def prune_layer(layer: PrunableLayer, hessian: torch.Tensor, n_zero: int, pattern: Pattern,
                blocksize: int = BLOCKSIZE, percdamp: float = PERCDAMP) -> torch.Tensor:
    """SparseGPT on one Conv2d/Linear in place; returns its {0,1} mask in the weight's shape."""
    weight = layer.module.weight
    grouped = grouped_weight(layer).to(compute_dtype(weight))
    zeros = group_zero_counts(n_zero, grouped.shape[0])
    new, pruned = sparsegpt_prune(grouped, hessian, zeros, pattern, blocksize, percdamp)
    weight.data.copy_(new.reshape(weight.shape).to(weight.dtype))
    return (~pruned).reshape(weight.shape).to(weight.dtype)


@dataclass(frozen=True)
class SparseGPTSettings(OneShotSettings):
    blocksize: int = option(BLOCKSIZE, COUNT)  # columns per lazy-update block (the reference default)
    percdamp: float = option(PERCDAMP, POSITIVE)  # lambda x mean(diag H) added to the Hessian diagonal


class SparseGPT(LayerwiseOneShot):
    name = "sparsegpt"
    statistic = Hessian
    settings = SparseGPTSettings  # the reference's protocol, the base's default: the pruned, updated prefix

    def prune_layer(self, layer: PrunableLayer, stat: Hessian, n_zero: int) -> torch.Tensor:
        return prune_layer(layer, stat.matrix(), n_zero, self.pattern, self.config.blocksize,
                           self.config.percdamp)

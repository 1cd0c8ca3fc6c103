"""Benchmarks that print figures (`pytest -m bench -s tests/test_bench_oneshot.py`); excluded by default.

Our SparseGPT and Wanda per layer (statistics from the inputs, then the mask and update) against bare
reimplementations of the published algorithms on the same tensors: one Hessian or norm pass, the
threshold rules of the reference code, no exact counts and no grouped-conv batching. The same for the
post-2023 additions: RIA's layer-wide threshold, DSnoT's swap loop as its reference walks it (both lists
read from both ends, no candidate checks) and OWL's rates with the reference's plain mean, on equal-sized
layers where that mean is ours. Runs of the reference code itself, from outside the project, are in
results/README.md ("One-shot additions against their reference code").
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from algorithms.ria import ria_mask
from algorithms.sparsegpt import Hessian, prune_layer
from algorithms.wanda import InputNorms, wanda_mask
from ptsbench.toolkit.dsnot import DSnoTSettings, dsnot_layer
from ptsbench.toolkit.layerwise import InputMoments, unfold_input
from ptsbench.toolkit.owl import owl_rates, owl_ratios
from ptsbench.toolkit.patterns import UNSTRUCTURED
from ptsbench.toolkit.sparsity import PrunableLayer, counts_from_rates

SPARSITY = 0.5


def bare_sparsegpt(w: torch.Tensor, xs: list[torch.Tensor], p: float, block: int = 128) -> torch.Tensor:
    """The published algorithm in its plainest form; xs are (cols, n) input batches."""
    w = w.clone()
    cols = w.shape[1]
    h = sum(x @ x.T for x in xs) * (2.0 / sum(x.shape[1] for x in xs))
    h += 0.01 * h.diagonal().mean() * torch.eye(cols)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1)
        sal = w1.pow(2) / u.diagonal()[i1:i2].pow(2)
        mask = sal <= sal.flatten().sort().values[int(sal.numel() * p)]
        for i in range(i2 - i1):
            q = w1[:, i] * ~mask[:, i]
            err = (w1[:, i] - q) / u[i1 + i, i1 + i]
            w1[:, i:] -= err[:, None] * u[i1 + i, i1 + i:i2][None]
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w


def bare_wanda(w: torch.Tensor, xs: list[torch.Tensor], p: float) -> torch.Tensor:
    score = w.abs() * torch.sqrt(sum(x.pow(2).sum(1) for x in xs))
    mask = torch.ones_like(w)
    mask.scatter_(1, score.sort(dim=1).indices[:, :int(w.shape[1] * p)], 0.0)
    return mask


def layers_to_time() -> list[tuple[str, nn.Module, list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("vit_tiny mlp.fc1 (192->768, 64x197 tokens)", nn.Linear(192, 768),
         [torch.randn(16, 197, 192, generator=g) for _ in range(4)]),
        ("resnet18 layer3 conv (256x3x3->256, 256 images 4x4)", nn.Conv2d(256, 256, 3, padding=1, bias=False),
         [torch.relu(torch.randn(64, 256, 4, 4, generator=g)) for _ in range(4)]),
    ]


def best_of(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.bench
@pytest.mark.parametrize("case", range(2))
def test_one_shot_per_layer_against_bare_reimplementations(case):
    name, module, batches = layers_to_time()[case]
    w0 = module.weight.detach().clone()
    layer = PrunableLayer("layer", module, "x")
    n_zero = round(SPARSITY * w0.numel())

    def ours(statistic, finish):
        module.weight.data.copy_(w0)
        stat = statistic(layer)
        for x in batches:
            stat.add(unfold_input(module, x))
        return finish(stat)

    def bare(method):
        return method(w0.flatten(1), [unfold_input(module, x)[0] for x in batches], SPARSITY)

    figures = {
        "sparsegpt": (best_of(lambda: ours(Hessian,
                                           lambda s: prune_layer(layer, s.matrix(), n_zero, UNSTRUCTURED))),
                      best_of(lambda: bare(bare_sparsegpt))),
        "wanda": (best_of(lambda: ours(InputNorms,
                                       lambda s: wanda_mask(layer, s.squares, n_zero, UNSTRUCTURED))),
                  best_of(lambda: bare(bare_wanda))),
    }
    for method, (t_ours, t_bare) in figures.items():
        print(f"\n{method} {name}: ours {t_ours * 1e3:.1f} ms, bare {t_bare * 1e3:.1f} ms, "
              f"ratio {t_ours / t_bare:.2f}")
        assert t_ours < 3 * t_bare  # a regression guard, loose for a shared CPU


def bare_ria(w: torch.Tensor, xs: list[torch.Tensor], p: float, a: float = 0.5) -> torch.Tensor:
    """Relative importance times the input norm to the a; every score <= the one at index int(n p) goes."""
    norm = sum(x.pow(2).sum(1) for x in xs).sqrt()
    score = (w.abs() / w.abs().sum(0) + w.abs() / w.abs().sum(1, keepdim=True)) * norm ** a
    return (score > score.flatten().sort().values[int(score.numel() * p)]).float()


def bare_dsnot(w: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, norm: torch.Tensor,
               cycles: int = 50, threshold: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """DSnoT's loop as the reference walks it: the growing list over every weight (kept ones rank 0), the kept
    weights' negatives (lowest Wanda first) then positives (highest first), each read from both ends, no
    check that an entry is still a candidate (rows that stopped are left alone: the reference's scatter goes
    on changing them). Returns the mask and the rows whose every swap was a real one (a pruned weight grown, a
    kept weight of the opposite sign pruned)."""
    rows, cols = w.shape
    row = torch.arange(rows)
    c = w * mean
    start = keep.clone()
    error = (c * ~keep).sum(1)
    growing = torch.sort(torch.where(keep, 0.0, c / var), dim=1, stable=True).indices
    n_keep = int(keep[0].sum())  # the bare Wanda start keeps the same number in every row
    kept = torch.sort(torch.where(keep, w.abs() * norm, float("inf")), dim=1, stable=True).indices[:, :n_keep]
    position = torch.arange(n_keep).expand(rows, n_keep)
    layout = torch.where(c.gather(1, kept) < 0, position, 2 * n_keep - position)
    pruning = kept.gather(1, layout.argsort(dim=1))
    low, high = torch.zeros(rows, dtype=torch.long), torch.full((rows,), cols - 1)
    p_low, p_high = torch.zeros(rows, dtype=torch.long), torch.full((rows,), n_keep - 1)
    active = torch.ones(rows, dtype=torch.bool)
    regular = torch.ones(rows, dtype=torch.bool)
    for _ in range(cycles):
        active &= error.abs() > threshold
        if not active.any():
            break
        up = error > 0
        r = growing[row, torch.where(up, high, low)]
        q = pruning[row, torch.where(up, p_low, p_high)]
        wrong_sign = torch.where(up, c[row, q] >= 0, c[row, q] <= 0)
        regular &= ~active | ~(start[row, r] | wrong_sign)
        a = row[active]
        keep[a, q[active]] = False
        keep[a, r[active]] = True
        error[active] += c[a, q[active]] - c[a, r[active]]
        high -= up.long()
        low += (~up).long()
        p_low += up.long()
        p_high -= (~up).long()
    return keep.float(), regular


def iou_of_pruned(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(b.shape) == 0, b == 0
    return float((a & b).sum()) / float((a | b).sum())


@pytest.mark.bench
@pytest.mark.parametrize("case", range(2))
def test_ria_and_dsnot_per_layer_against_bare_restatements(case):
    name, module, batches = layers_to_time()[case]
    batches = [x + 0.3 for x in batches]  # inputs with a mean, as after a ReLU: DSnoT corrects the mean
    w0 = module.weight.detach().clone()
    layer = PrunableLayer("layer", module, "x")
    n_zero = round(SPARSITY * w0.numel())
    images = sum(len(x) for x in batches)

    def ours_ria():
        module.weight.data.copy_(w0)
        stat = InputNorms(layer)
        for x in batches:
            stat.add(unfold_input(module, x))
        return ria_mask(layer, stat.squares, n_zero, UNSTRUCTURED)

    def ours_dsnot():
        module.weight.data.copy_(w0)
        norms, moments = InputNorms(layer), InputMoments(layer)
        for x in batches:
            cols = unfold_input(module, x)
            norms.add(cols)
            moments.add(cols)
        mask = wanda_mask(layer, norms.squares, n_zero, UNSTRUCTURED)
        module.weight.data.mul_(mask)
        return dsnot_layer(layer, w0, mask, moments, images, UNSTRUCTURED, DSnoTSettings())[0]

    def bare_dsnot_layer():
        xs = [unfold_input(module, x)[0] for x in batches]
        w = w0.flatten(1)
        n = sum(x.shape[1] for x in xs)
        total = sum(x.sum(1) for x in xs)
        mean, var = total / images, sum(x.pow(2).sum(1) for x in xs) / n - (total / n) ** 2
        norm = sum(x.pow(2).sum(1) for x in xs).sqrt()
        keep = bare_wanda(w, xs, SPARSITY).bool()
        return bare_dsnot(w, keep, mean.expand_as(w), var.expand_as(w), norm.expand_as(w))

    def bare_ria_layer():
        return bare_ria(w0.flatten(1), [unfold_input(module, x)[0] for x in batches], SPARSITY)

    t_ria, t_bare_ria = best_of(ours_ria), best_of(bare_ria_layer)
    t_dsnot, t_bare_dsnot = best_of(ours_dsnot), best_of(bare_dsnot_layer)
    ria_iou = iou_of_pruned(ours_ria(), bare_ria_layer())
    bare_mask, regular = bare_dsnot_layer()
    ours = ours_dsnot().reshape(bare_mask.shape)
    dsnot_iou, regular_iou = iou_of_pruned(ours, bare_mask), iou_of_pruned(ours[regular], bare_mask[regular])
    print(f"\nria {name}: IoU {ria_iou:.5f}; ours {t_ria * 1e3:.1f} ms, bare {t_bare_ria * 1e3:.1f} ms, "
          f"ratio {t_ria / t_bare_ria:.2f}")
    print(f"dsnot {name}: IoU {dsnot_iou:.5f}, {regular_iou:.5f} on the {int(regular.sum())} of "
          f"{len(regular)} rows the reference walks on real candidates; ours {t_dsnot * 1e3:.1f} ms, "
          f"bare {t_bare_dsnot * 1e3:.1f} ms, ratio {t_dsnot / t_bare_dsnot:.2f}")
    assert ria_iou >= 0.99 and regular_iou >= 0.99
    assert t_ria < 3 * t_bare_ria and t_dsnot < 3 * t_bare_dsnot


@pytest.mark.bench
def test_owl_rates_and_masks_against_the_bare_rule():
    """Eight layers of one size (an LLM's blocks are): the reference's plain mean is the weighted one."""
    g = torch.Generator().manual_seed(1)
    layers, squares, xs = [], {}, []
    for i in range(8):
        fc = nn.Linear(192, 768, bias=False)
        with torch.no_grad():  # heavier tails in some layers: more outliers
            tails = torch.exp(0.3 * i * torch.randn(768, 192, generator=g))
            fc.weight.copy_(torch.randn(768, 192, generator=g) * tails)
        x = torch.randn(64 * 197, 192, generator=g) * (torch.rand(192, generator=g) + 0.1)
        layers.append(PrunableLayer(str(i), fc, "linear"))
        xs.append(x)
        squares[str(i)] = x.pow(2).sum(0)[None]
    target = 0.7

    def ours():
        ratios = owl_ratios(layers, squares, 5.0)
        rates = owl_rates({ly.name: ly.numel for ly in layers}, ratios, target, 0.08)
        counts = counts_from_rates(layers, rates, target)
        return rates, [wanda_mask(ly, squares[ly.name], counts[ly.name], UNSTRUCTURED) for ly in layers]

    def bare():
        scores = [ly.weight.detach().abs() * squares[ly.name].sqrt() for ly in layers]  # the same scores
        shares = [int((s > s.mean() * 5.0).sum()) / s.numel() for s in scores]
        ratios = torch.tensor(shares, dtype=torch.float64)
        d = (ratios - ratios.min()) / (ratios.max() - ratios.min()) * 0.16
        rates = (target - (d - d.mean())).tolist()
        return rates, [bare_wanda(ly.weight.detach(), [x.T], r)
                       for ly, x, r in zip(layers, xs, rates, strict=True)]

    t_ours, t_bare = best_of(ours), best_of(bare)
    (rates, masks), (bare_rates, bare_masks) = ours(), bare()
    diff = max(abs(rates[str(i)] - r) for i, r in enumerate(bare_rates))
    ious = [iou_of_pruned(m, b) for m, b in zip(masks, bare_masks, strict=True)]
    print(f"\nowl 8 x (192->768): rates {min(bare_rates):.4f}..{max(bare_rates):.4f}, max difference "
          f"{diff:.2e}, mask IoU min {min(ious):.5f}; ours {t_ours * 1e3:.1f} ms, "
          f"bare {t_bare * 1e3:.1f} ms, ratio {t_ours / t_bare:.2f}")
    assert diff < 1e-6 and min(ious) >= 0.99 and max(bare_rates) - min(bare_rates) > 0.1
    assert t_ours < 3 * t_bare

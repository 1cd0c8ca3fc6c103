"""Benchmarks that print figures (`pytest -m bench -s tests/test_bench_oneshot.py`); excluded by default.

Our SparseGPT and Wanda per layer (statistics from the inputs, then the mask and update) against bare
reimplementations of the published algorithms on the same tensors: one Hessian or norm pass, the
threshold rules of the reference code, no exact counts and no grouped-conv batching.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from algorithms.sparsegpt import Hessian, prune_layer
from algorithms.wanda import InputNorms, wanda_mask
from ptsbench.layerwise import unfold_input
from ptsbench.patterns import UNSTRUCTURED
from ptsbench.sparsity import PrunableLayer

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
        "sparsegpt": (best_of(lambda: ours(Hessian, lambda s: prune_layer(layer, s.matrix(), n_zero, UNSTRUCTURED))),
                      best_of(lambda: bare(bare_sparsegpt))),
        "wanda": (best_of(lambda: ours(InputNorms, lambda s: wanda_mask(layer, s.squares, n_zero, UNSTRUCTURED))),
                  best_of(lambda: bare(bare_wanda))),
    }
    for method, (t_ours, t_bare) in figures.items():
        print(f"\n{method} {name}: ours {t_ours * 1e3:.1f} ms, bare {t_bare * 1e3:.1f} ms, ratio {t_ours / t_bare:.2f}")
        assert t_ours < 3 * t_bare  # a regression guard, loose for a shared CPU

"""The bridge function of FCPTS: from a layer's threshold t to its sparsity S(t), with a usable slope.

S(t) = #{|w| <= t} / n is a step function, so gradient descent could not steer it. The bridge keeps the
exact count in the forward pass and uses the density of |w| at t as dS/dt in the backward pass. Two
density estimators: a Gaussian KDE (the paper) and the released code's 100-bin histogram.
"""

from __future__ import annotations

import math

import torch

from ptsbench.toolkit.compiled import maybe_compiled
from ptsbench.toolkit.sparsity import flat_view

BRIDGES = ("kde", "histogram")
BANDWIDTHS = ("silverman", "scott")
HISTOGRAM_BINS = 100  # the released code's bridge histogram
KDE_BINS = 8192  # binned KDE grid over [-max|w|, max|w|]; bin width is a small fraction of the bandwidth


def histogram_density(weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Density of |w| at t from the released code's estimator: f(t) + f(-t), f a 100-bin histogram of the
    signed weights over [min w, max w] normalised to integrate to one (zero outside that range)."""
    w = flat_view(weight.detach()).float()
    lo, hi = (float(v) for v in torch.aminmax(w))
    if hi <= lo:
        return torch.zeros((), device=w.device)
    width = (hi - lo) / HISTOGRAM_BINS
    counts = torch.histc(w, bins=HISTOGRAM_BINS, min=lo, max=hi)
    density = counts / (w.numel() * width)

    def at(x: torch.Tensor) -> torch.Tensor:
        inside = (x >= lo) & (x <= hi)
        idx = ((x - lo) / width).floor().clamp(0, HISTOGRAM_BINS - 1).long()
        return torch.where(inside, density[idx], torch.zeros_like(x))

    t = t.detach().float()
    return at(t) + at(-t)


def kde_bandwidth(weight: torch.Tensor, rule: str, counts: torch.Tensor, edges_lo: float,
                  width: float) -> float:
    """Gaussian-kernel bandwidth from the layer's signed weights.

    silverman: 0.9 * min(std, IQR / 1.349) * n^(-1/5), robust to the heavy tails of trained weights;
    scott: 1.059 * std * n^(-1/5). The quartiles are read off the binned CDF (`counts`), which is exact
    to within one bin, far below the bandwidth, and avoids two O(n) selections per layer and step.
    """
    n = weight.numel()
    std = float(weight.std()) if n > 1 else 0.0
    if rule == "scott":
        return 1.059 * std * n ** -0.2
    cdf = counts.cumsum(0)

    def quantile(q: float) -> float:
        j = int(torch.searchsorted(cdf, torch.tensor(q * n, device=cdf.device)).clamp(max=len(cdf) - 1))
        below = float(cdf[j - 1]) if j > 0 else 0.0
        inside = float(counts[j])
        frac = (q * n - below) / inside if inside > 0 else 0.5
        return edges_lo + (j + frac) * width

    iqr = quantile(0.75) - quantile(0.25)
    spread = min(std, iqr / 1.349) if iqr > 0 else std
    return 0.9 * spread * n ** -0.2


def kde_density(weight: torch.Tensor, t: torch.Tensor, bandwidth: str = "silverman") -> torch.Tensor:
    """Density of |w| at t from a Gaussian KDE of the signed weights: f(t) + f(-t).

    Summed over the signed weights this is the KDE of |w| reflected at zero, so there is no boundary
    bias near t = 0. The kernel sum runs over a fine histogram (binned KDE): O(n) per layer and step
    with one pass, instead of n kernel evaluations.
    """
    w = weight.detach().reshape(-1).float()
    lo, hi = (float(v) for v in torch.aminmax(w))
    m = max(-lo, hi)
    if m == 0.0:
        return torch.zeros((), device=w.device)
    width = 2 * m / KDE_BINS
    counts = torch.histc(w, bins=KDE_BINS, min=-m, max=m)
    h = kde_bandwidth(w, bandwidth, counts, -m, width)
    if h <= 0:
        return torch.zeros((), device=w.device)
    centres = -m + width * (torch.arange(KDE_BINS, device=w.device, dtype=torch.float32) + 0.5)
    t = t.detach().float()
    norm = w.numel() * h * math.sqrt(2 * math.pi)
    kernel = torch.exp(-0.5 * ((t - centres) / h) ** 2) + torch.exp(-0.5 * ((t + centres) / h) ** 2)
    return (counts * kernel).sum() / norm


def abs_weight_density(weight: torch.Tensor, t: torch.Tensor, bridge: str,
                       bandwidth: str = "silverman") -> torch.Tensor:
    """dS/dt for one layer: the density of |w| at the threshold, by the chosen estimator."""
    if bridge == "kde":
        return kde_density(weight, t, bandwidth)
    return histogram_density(weight, t)


def count_at_or_below(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """#{|w| <= t}, exact. count_nonzero reads the booleans as they are; a sum, even with dtype=int32,
    first copies them into a weight-sized integer tensor."""
    return torch.count_nonzero(weight.abs() <= threshold)


class BridgeSparsity(torch.autograd.Function):
    """S(t) = #{|w| <= t} / n in the forward pass, dS/dt = density of |w| at t in the backward pass.

    The weights receive no gradient through this path: the bridge only tells each threshold how fast
    its layer's sparsity moves with it.
    """

    @staticmethod
    def forward(ctx, threshold: torch.Tensor, weight: torch.Tensor, bridge: str, bandwidth: str,
                compiled: bool) -> torch.Tensor:
        w = weight.detach()
        ctx.save_for_backward(threshold.detach(), w)
        ctx.bridge, ctx.bandwidth = bridge, bandwidth
        return (maybe_compiled(count_at_or_below, compiled)(w, threshold.detach()).to(threshold.dtype)
                / w.numel())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        threshold, w = ctx.saved_tensors
        slope = abs_weight_density(w, threshold, ctx.bridge, ctx.bandwidth)
        return grad * slope.to(grad.dtype), None, None, None, None


def bridge_sparsity(threshold: torch.Tensor, weight: torch.Tensor, bridge: str = "kde",
                    bandwidth: str = "silverman", compiled: bool = False) -> torch.Tensor:
    """The layer sparsity at `threshold`, differentiable in the threshold through the bridge."""
    return BridgeSparsity.apply(threshold, weight, bridge, bandwidth, compiled)

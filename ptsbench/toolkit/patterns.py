"""The pattern axis: which zero layouts a mask may have, and the audit that checks a model follows one.

* `unstructured`: any weights may be zero; each layer's count comes from the allocation axis.
* `N:M`: in every row of a layer's weight flattened to (out, in/groups x kh x kw) in PyTorch's (c, kh, kw)
  order (a Linear's row as stored), each group of M consecutive weights keeps at most N nonzeros: the
  layout sparse tensor cores run (2:4 on NVIDIA Ampere and later). N is the number *kept*, so the
  sparsity of a layer is 1 - N/M (2:4 and 4:8 are 0.5). The reference Wanda/SparseGPT code counts the
  *pruned* weights instead (its `prune_n`); for 2:4 and 4:8 both readings agree.

Rules chosen here, and why:
* A layer whose row length is not a multiple of M (a depthwise 3x3 conv: 9 weights per row; the first
  conv of a one-channel 7x7 stem: 49) cannot hold the pattern. It is left dense and listed in the record
  (`pattern_dense_layers`), never silently: padding a row would give hardware groups that straddle
  output channels.
* The pattern fixes each layer's rate, so the global target is not free: `sparsity` must equal 1 - N/M
  to the 4 decimals a user types (0.6667 for 1:3, checked before any work), and the job's target is then
  1 - N/M exactly, which the layers the pattern applies to meet to the weight. The achieved sparsity over
  all prunable weights is a little lower when some layers stay dense; the record and the audit name them.
* Allocation strategies that vary per-layer rates (ERK, global, learned, from a file) contradict N:M and
  are refused with that reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ptsbench.errors import ConfigError, PtsbenchError
from ptsbench.toolkit.sparsity import PrunableLayer

PRESETS = ("unstructured", "2:4", "4:8")
TARGET_DECIMALS = 4  # sparsity=0.6667 stands for 1:3's 2/3; a value that rounds elsewhere is refused


class PatternViolation(PtsbenchError):
    """A pruned layer's zeros do not follow the job's N:M pattern."""


@dataclass(frozen=True)
class Pattern:
    """`n` kept of every `m` consecutive weights of a row; n = m = 0 means unstructured."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        """The sparsity of a layer that takes the pattern."""
        return 1.0 - self.n / self.m if self.is_nm else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def fits(self, layer: PrunableLayer) -> bool:
        """True when the layer's rows split into whole groups of M."""
        return self.is_nm and row_length(layer.weight) % self.m == 0


UNSTRUCTURED = Pattern()


def parse_pattern(value: object) -> Pattern:
    """`unstructured` or `N:M` with 0 < N < M (2:4 and 4:8 are the presets)."""
    text = str(value).strip().lower()
    if text == "unstructured":
        return UNSTRUCTURED
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if match is None:
        # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124.
        hint = (" In a YAML file quote it (pattern: '2:4'): unquoted, YAML reads 2:4 as 124."
                if text.isdigit() else "")
        raise ConfigError(f"pattern={value!r} is not a sparsity pattern. Allowed: unstructured, or N:M with "
                          "0 < N < M (N weights kept in every M consecutive ones), e.g. "
                          f"{', '.join(PRESETS[1:])}."
                          + hint)
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"pattern={value!r}: N:M needs 0 < N < M (N = weights kept of every M); got N={n}, "
                          f"M={m}.")
    return Pattern(n, m)


def check_pattern_target(pattern: Pattern, target: float) -> float:
    """The job's target: `target` itself, or under N:M exactly 1 - N/M, which `target` must give to
    TARGET_DECIMALS decimals (with N:M the sparsity is not a free choice)."""
    if not pattern.is_nm:
        return target
    typed = round(pattern.sparsity, TARGET_DECIMALS)
    if abs(target - pattern.sparsity) > 0.5 * 10.0 ** -TARGET_DECIMALS + 1e-12:
        raise ConfigError(f"pattern={pattern} keeps {pattern.n} of every {pattern.m} weights, i.e. sparsity "
                          f"1 - {pattern.n}/{pattern.m} = {typed:g} in every layer it applies to, but "
                          f"sparsity={target}. Set sparsity={typed:g} (or use pattern=unstructured).")
    return pattern.sparsity


def row_length(weight: torch.Tensor) -> int:
    """Weights per output row: in/groups x kh x kw for a conv, in_features for a Linear."""
    return weight[0].numel()


def nm_zero_counts(layers: list[PrunableLayer], pattern: Pattern) -> dict[str, int]:
    """Zeros per layer under N:M: (M - N) per group where the rows fit, none where they do not."""
    return {ly.name: ly.numel // pattern.m * (pattern.m - pattern.n) if pattern.fits(ly) else 0
            for ly in layers}


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """{0,1} mask keeping the `n` highest scores of every `m` consecutive entries of each row.

    `scores` has the weight's shape; rows are flattened as the pattern defines. Ties keep the earlier
    position (stable sort), so the same scores always give the same mask.
    """
    groups = scores.detach().reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups)
    mask.scatter_(1, order[:, :n], 1.0)
    return mask.view_as(scores)


def nm_violations(weight: torch.Tensor, pattern: Pattern) -> int:
    """Groups of M consecutive weights in a row with more than N nonzeros."""
    nonzero = (weight.detach().reshape(weight.shape[0], -1) != 0).reshape(-1, pattern.m).sum(dim=1)
    return int((nonzero > pattern.n).sum())


def audit_pattern(layers: list[PrunableLayer], pattern: Pattern) -> dict[str, object]:
    """Check every group of every layer that takes the pattern; raise PatternViolation on a broken one.

    Returns the record's pattern fields: the pattern and, for N:M, the layers left dense by the rule.
    """
    if not pattern.is_nm:
        return {"pattern": str(pattern)}
    broken = {ly.name: v for ly in layers if pattern.fits(ly) and (v := nm_violations(ly.weight, pattern))}
    if broken:
        listing = ", ".join(f"{name} ({v} groups)" for name, v in list(broken.items())[:8])
        raise PatternViolation(f"pattern={pattern}: groups of {pattern.m} consecutive weights with more than "
                               f"{pattern.n} nonzeros in {len(broken)} layer(s): {listing}.")
    dense = [ly.name for ly in layers if not pattern.fits(ly)]
    return {"pattern": str(pattern), "pattern_dense_layers": dense,
            "pattern_dense_params": sum(ly.numel for ly in layers if not pattern.fits(ly))}

"""The calibration passes shared by the one-shot methods (Wanda, SparseGPT, RIA, DSnoT, OWL's statistics).

A layer computes y = W x. For a Linear, x is a token (a ViT's tokens, or one vector per image); for a
Conv2d the input is unfolded into patches, so a weight (o, c, ky, kx) multiplies the patch entry
j = (c, ky, kx) at every output position: W is (out, in/groups x kh x kw) and the layer's "inputs" are the
patch columns over all positions and calibration images, split per group (a depthwise conv is `groups`
layers of kh x kw inputs each). Stride, padding and dilation come from the conv; padding zeros enter as
zeros. Statistics are accumulated batch by batch, so no layer's full input is ever stored.

Order, as in the reference code (locuslab/wanda `prune_wanda`, IST-DASLab/sparsegpt `opt_sequential`):
layers are pruned in module order, a block at a time. The calibration set runs through the model whose
earlier blocks are already pruned (and, for SparseGPT, updated); hooks collect the statistics of every
prunable layer of the current block in that one pass, which stops as soon as they have all fired; the
block's layers are then pruned together. Layers outside blocks (stem, classifier) are blocks of their own.
Running the network from its input for each block is our choice: it needs no knowledge of how a timm
model wires its blocks together, at the cost of recomputing the pruned prefix once per block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ptsbench.data import CalibrationSet
from ptsbench.errors import ConfigError, unknown_choice
from ptsbench.toolkit.bn import recalibrate_batchnorm
from ptsbench.toolkit.distill import find_blocks
from ptsbench.toolkit.sparsity import PrunableLayer

# Which network a layer's calibration inputs come from (algorithms/oneshot.py says why each exists).
CALIB_PROTOCOLS = ("dense", "sequential", "sequential+bn")


def check_protocol(key: str, value: str | None) -> None:
    """A `calib_protocol` key: one of CALIB_PROTOCOLS, or None for the method's own default."""
    if value is not None and value not in CALIB_PROTOCOLS:
        raise unknown_choice(key, value, CALIB_PROTOCOLS)


def check_protocol_bn(key: str, protocol: str | None, bn_recalibration: bool) -> None:
    """`sequential+bn` re-estimates BatchNorm along the pass, which only a method that re-estimates it
    (`bn_recalibration`) does; `key` names the method's node."""
    if protocol == "sequential+bn" and not bn_recalibration:
        raise ConfigError(f"{key}.calib_protocol=sequential+bn re-estimates BatchNorm along the sequential "
                          f"pass and needs {key}.bn_recalibration=true (the statistics after the last "
                          "block); without it use calib_protocol=sequential or dense.")


class InputStatistic(Protocol):
    """What a method accumulates about a layer's inputs: `add` takes one batch as (groups, cols, n)."""

    def add(self, x: torch.Tensor) -> None: ...


class InputNorms:
    """Squared L2 norm of each (group, input feature) over all calibration positions (Wanda's statistic)."""

    def __init__(self, layer: PrunableLayer):
        w = layer.module.weight
        g = layer_groups(layer)
        self.squares = torch.zeros(g, w[0].numel(), dtype=torch.float32, device=w.device)

    def add(self, x: torch.Tensor) -> None:
        self.squares += x.float().pow(2).sum(dim=-1)


class InputMoments:
    """Sum and sum of squares of each (group, input feature) over all calibration positions, and their count:
    the mean and variance DSnoT reads. Each batch is summed in float32 and accumulated in float64, so the
    variance (E[x^2] - E[x]^2) keeps its digits over many batches."""

    def __init__(self, layer: PrunableLayer):
        w = layer.module.weight
        shape = (layer_groups(layer), w[0].numel())
        self.sum = torch.zeros(shape, dtype=torch.float64, device=w.device)
        self.squares = torch.zeros(shape, dtype=torch.float64, device=w.device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.sum += x.sum(dim=-1)
        self.squares += x.pow(2).sum(dim=-1)
        self.n += x.shape[-1]

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    def variance(self) -> torch.Tensor:
        """The population variance over every position of every calibration image."""
        return (self.squares / max(self.n, 1) - self.mean().pow(2)).clamp_min(0.0)


class StatisticPair:
    """Two statistics of the same layer fed from one pass (a method's own and its refinement's)."""

    def __init__(self, first: InputStatistic, second: InputStatistic):
        self.first, self.second = first, second

    def add(self, x: torch.Tensor) -> None:
        self.first.add(x)
        self.second.add(x)


class _AllFired(Exception):
    """Raised by a hook once every layer of the block has seen the batch: the rest of the forward is waste."""


def check_supported(layers: list[PrunableLayer]) -> None:
    """Refuse layers whose input cannot be unfolded from the module's own settings (before any work)."""
    for ly in layers:
        module = ly.module
        if isinstance(module, nn.Conv2d):
            # timm's Conv2dSame pads inside its own forward, so the hooked input lacks that padding.
            if type(module).forward is not nn.Conv2d.forward or module.padding_mode != "zeros":
                raise ConfigError(f"Layer {ly.name} ({type(module).__name__}, "
                                  f"padding_mode={module.padding_mode!r}) pads its input itself; the "
                                  "one-shot methods unfold plain zero-padded Conv2d only.")
            if isinstance(module.padding, str) and module.padding != "valid":
                raise ConfigError(f"Layer {ly.name} uses padding={module.padding!r}; give explicit padding "
                                  "sizes.")
        elif not isinstance(module, nn.Linear):
            raise ConfigError(f"Layer {ly.name} is a {type(module).__name__}; the one-shot methods take "
                              "Conv2d and Linear.")


def layer_groups(layer: PrunableLayer) -> int:
    return layer.module.groups if isinstance(layer.module, nn.Conv2d) else 1


def grouped_weight(layer: PrunableLayer) -> torch.Tensor:
    """The weight as (groups, out/groups, in/groups x kh x kw): one matrix per independent sub-layer."""
    w = layer.module.weight.detach()
    g = layer_groups(layer)
    return w.reshape(g, w.shape[0] // g, -1)


def unfold_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as (groups, cols per group, n): column j of group g is what weight column j reads."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
    padding = 0 if module.padding == "valid" else module.padding
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    b, cols, positions = patches.shape
    g = module.groups
    return patches.view(b, g, cols // g, positions).permute(1, 2, 0, 3).reshape(g, cols // g, b * positions)


def block_passes(model: nn.Module, layers: list[PrunableLayer]) -> list[list[PrunableLayer]]:
    """Consecutive prunable layers of the same block, in module order; a layer outside blocks is alone."""
    blocks = find_blocks(model)

    def owner(name: str) -> str:
        return next((b for b in blocks if name.startswith(b + ".")), name)

    passes: list[list[PrunableLayer]] = []
    last = None
    for ly in layers:
        key = owner(ly.name)
        if passes and key == last:
            passes[-1].append(ly)
        else:
            passes.append([ly])
        last = key
    return passes


def collect(model: nn.Module, block: list[PrunableLayer], calib: CalibrationSet, batch_size: int,
            begin: Callable[[PrunableLayer], InputStatistic]) -> dict[str, InputStatistic]:
    """Run the calibration set through `model` up to the last layer of `block`, accumulating each layer's
    unfolded inputs into the statistic `begin` makes for it."""
    stats = {ly.name: begin(ly) for ly in block}
    waiting: set[str] = set()

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            stats[name].add(unfold_input(module, args[0].detach()))
            waiting.discard(name)
            if not waiting:
                raise _AllFired

        return hook

    handles = [ly.module.register_forward_hook(hook_for(ly.name)) for ly in block]
    device = block[0].module.weight.device
    try:
        with torch.no_grad():
            for images, _ in calib.batches(batch_size):
                waiting.update(ly.name for ly in block)
                with contextlib.suppress(_AllFired):
                    model(images.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def sequential_prune(model: nn.Module, layers: list[PrunableLayer], calib: CalibrationSet, batch_size: int,
                     begin: Callable[[PrunableLayer], InputStatistic],
                     finish: Callable[[PrunableLayer, InputStatistic], None],
                     progress: bool = False, desc: str = "one-shot pruning",
                     before_block: Callable[[], Any] | None = None) -> int:
    """Prune `layers` block by block with `finish(layer, statistic)`, each block calibrated on the outputs
    of the blocks already pruned; `before_block` runs before every block's pass but the first (BatchNorm
    re-estimation of the pruned prefix). Returns the number of calibration passes (one per block)."""
    passes = block_passes(model, layers)
    was_training = model.training
    model.eval()
    try:
        for i, block in enumerate(tqdm(passes, desc=desc, disable=not progress)):
            if before_block is not None and i > 0:
                before_block()
                model.eval()
            stats = collect(model, block, calib, batch_size, begin)
            for ly in block:
                finish(ly, stats[ly.name])
    finally:
        model.train(was_training)
    return len(passes)


def collect_in_eval(model: nn.Module, layers: list[PrunableLayer], calib: CalibrationSet, batch_size: int,
                    begin: Callable[[PrunableLayer], InputStatistic]) -> dict[str, InputStatistic]:
    """`collect` in one pass with the model in eval mode (BatchNorm on its running statistics), its mode
    restored after."""
    was_training = model.training
    model.eval()
    try:
        return collect(model, layers, calib, batch_size, begin)
    finally:
        model.train(was_training)


def dense_prune(model: nn.Module, layers: list[PrunableLayer], calib: CalibrationSet, batch_size: int,
                begin: Callable[[PrunableLayer], InputStatistic],
                finish: Callable[[PrunableLayer, InputStatistic], None],
                progress: bool = False, desc: str = "one-shot pruning") -> int:
    """Prune `layers` with `finish(layer, statistic)`, every statistic taken from the dense network: one
    calibration pass collects them all before the first layer is pruned. Returns the passes (one)."""
    stats = collect_in_eval(model, layers, calib, batch_size, begin)
    for ly in tqdm(layers, desc=desc, disable=not progress):
        finish(ly, stats.pop(ly.name))  # each statistic freed once its layer is pruned
    return 1


def calibrated_prune(protocol: str, model: nn.Module, layers: list[PrunableLayer], calib: CalibrationSet,
                     batch_size: int, begin: Callable[[PrunableLayer], InputStatistic],
                     finish: Callable[[PrunableLayer, InputStatistic], None],
                     device: torch.device | str = "cpu", progress: bool = False,
                     desc: str = "one-shot pruning") -> tuple[int, int]:
    """Prune `layers` under a calibration protocol (`CALIB_PROTOCOLS`). Returns (statistics passes, BatchNorm
    re-estimation passes along the way); `sequential+bn` re-estimates the pruned prefix's BatchNorm before
    every block's pass but the first."""
    if protocol == "dense":
        return dense_prune(model, layers, calib, batch_size, begin, finish, progress=progress, desc=desc), 0
    bn_passes = 0

    def reestimate() -> None:
        nonlocal bn_passes
        bn_passes += int(recalibrate_batchnorm(model, calib, device, batch_size) > 0)

    passes = sequential_prune(model, layers, calib, batch_size, begin, finish, progress=progress, desc=desc,
                              before_block=reestimate if protocol == "sequential+bn" else None)
    return passes, bn_passes


def dense_input_norms(model: nn.Module, layers: list[PrunableLayer], calib: CalibrationSet,
                      batch_size: int) -> dict[str, torch.Tensor]:
    """Every layer's squared input norms (`InputNorms.squares`) from the dense network, in one pass."""
    stats = collect_in_eval(model, layers, calib, batch_size, InputNorms)
    return {name: stat.squares for name, stat in stats.items()}

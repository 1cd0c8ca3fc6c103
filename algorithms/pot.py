"""POT: post-training pruning with layer-wise calibration (Lazarevich, Kozlov, Malinin, ICCVW 2021).

OpenVINO's post-training weight sparsity, the baseline both FCPTS and UniPTS compare against, as
msbench reproduces it (configs/pst_res18_sp50_pot.yaml):

1. **Fold BatchNorm** into the preceding convolutions, so allocation and correction see the weights the
   network effectively uses (`ptsbench.toolkit.bnfold`).
2. **Allocate** with one global threshold on |w| / ||W_l||_2 (global L2-normalised magnitude): per-layer
   rates emerge instead of being set by a rule.
3. **Weight correction**: per output channel, the kept weights are rescaled by std(W) / std(W * M) and
   shifted by the mean difference, as msbench does (`weight_correction=msbench`, the default);
   `exact_moments` solves for the dense channel's exact mean and second moment instead, `none` skips it.
4. **Bias correction**: each layer's mean output error on calibration data is folded into its bias.
5. **Layer-wise calibration**: each pruned layer (conv + bias) is tuned with Adam (1e-5 weights, 1e-4
   biases) so its output matches the dense layer's on the dense model's inputs; pruned weights stay zero.

Reference budgets (msbench): 10,240 calibration images, 20,000 Adam steps of batch 64 per layer. The
steps after folding are shared with the technique matrix (`ptsbench.toolkit.reconstruct`), so `pot` with
`reconstruction=block` or `recon_inputs=sparse` is msbench's `_pot_erk_layer_sparseinp`-style variant.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from ptsbench.errors import ConfigError
from ptsbench.settings import Settings, budget_option, count_text, node, option, read_budget, scaled
from ptsbench.toolkit.allocations import ALLOCATIONS, allocate
from ptsbench.toolkit.bnfold import find_conv_bn_pairs, fold_batchnorm
from ptsbench.toolkit.reconstruct import (
    RECONSTRUCTION_STREAM,
    REFERENCE_STEPS,
    WEIGHT_CORRECTIONS,
    ReconstructionSettings,
    correct_weights,
    make_units,
    process_units,
    reconstruction_budget,
    reconstruction_tags,
    summarise,
)
from ptsbench.toolkit.sparsity import (
    PrunableLayer,
    apply_masks,
    bake_masks,
    magnitude_masks,
    rates,
)


def legacy_weight_correction(value: str | bool) -> str | bool:
    """Older configs' boolean weight_correction: true meant "corrected", i.e. msbench's."""
    if isinstance(value, bool):
        return "msbench" if value else "none"
    return value


@dataclass(frozen=True)
class POTSettings(Settings):
    """The whole `algorithm` node of POT: every default lives here (msbench's); conf/algorithm/pot*.yaml
    start from it (Hydra's ConfigStore, `schema/algorithm/pot`) and hold only what a preset changes."""

    fold_bn: bool = True  # fold BatchNorm into the preceding convolutions first
    allocation: str = option("global_l2norm", ALLOCATIONS)  # a weight-only allocation
    # msbench: scale std(W)/std(W*M), shift by the mean difference | exact_moments | none (true/false: older
    # configs' msbench / none)
    weight_correction: str = option("msbench", WEIGHT_CORRECTIONS)
    bias_correction: bool = True  # mean output error on calibration data folded into the bias
    # msbench's reconstruction settings (conf/reconstruction/msbench.yaml), one layer at a time
    reconstruction: ReconstructionSettings = node(ReconstructionSettings,
                                                  ReconstructionSettings(mode="layer"))
    budget: float | str = budget_option()  # factor on the calibration steps per layer (reference = 1: 20,000)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_correction", legacy_weight_correction(self.weight_correction))


class POT(PTSAlgorithm):
    name = "pot"
    settings = POTSettings  # the constructor's keys

    def __init__(self, **config: Any):
        given = POTSettings.read(config, "algorithm")
        self.fold_bn = bool(given.fold_bn)
        self.allocation = given.allocation
        self.weight_correction = str(given.weight_correction)
        self.bias_correction = bool(given.bias_correction)
        self.budget_scale = read_budget(given.budget)
        recon = given.reconstruction
        self.recon = recon.replace(iterations=scaled(recon.iterations, self.budget_scale, minimum=0))
        self.config = given.replace(reconstruction=self.recon)

    def options(self) -> dict[str, Any]:
        """POTSettings's recorded fields (the reconstruction's as `reconstruction`, `recon_*`), and the budget
        by name."""
        return {"budget": self.budget, **self.config.options()}

    @property
    def budget(self) -> str:
        """'reference' (msbench's 20,000 Adam steps per layer), 'quick' (pot_quick's 200) or 'custom'."""
        return reconstruction_budget(self.recon)

    @property
    def budget_fraction(self) -> float:
        return self.recon.iterations / REFERENCE_STEPS

    def budget_work(self) -> str:
        steps = count_text(self.recon.iterations)
        return f"{steps} calibration steps per {self.recon.mode} (reference: {REFERENCE_STEPS:,})"

    def budget_tags(self) -> list[str]:
        """Nothing at msbench's 20,000 steps per layer, 'quick' at pot_quick's 200, else the steps (and
        rates)."""
        return reconstruction_tags(self.recon)

    @property
    def family(self) -> str:
        parts = ["pot"]
        if self.allocation != "global_l2norm":
            parts.append(self.allocation)
        if self.recon.mode != "layer":
            parts.append(f"{self.recon.mode}recon")
        if self.recon.inputs != "dense" and self.recon.mode != "none":
            parts.append("sparseinp")
        corrected = self.weight_correction != "none"
        if not (corrected and self.bias_correction):
            if not (corrected or self.bias_correction):
                parts.append("nocorr")
            else:
                parts.append("nowc" if not corrected else "nobc")
        if self.weight_correction == "exact_moments":
            parts.append("exactwc")
        return "-".join(parts)

    def prune_and_correct(self, model: nn.Module, layers: list[PrunableLayer], target: float,
                          ctx: PruneContext
                          ) -> tuple[nn.Module, dict[str, int], dict[str, torch.Tensor], dict[str, str]]:
        """Steps 1-3 on the model in eval mode: the folded dense model (the targets of 4 and 5), the counts,
        the masks (attached), and which folded BatchNorm carries each convolution's bias."""
        # 1. Fold BatchNorm into the convolutions (found on one calibration batch).
        carriers: dict[str, str] = {}
        if self.fold_bn:
            example = ctx.calib.data.images[:2].to(ctx.device)
            pairs = find_conv_bn_pairs(model, example)
            fold_batchnorm(model, pairs)
            carriers = {p.conv: p.bn for p in pairs}
        dense = copy.deepcopy(model).requires_grad_(False)

        # 2. Allocation and masks on the folded weights.
        counts = allocate(layers, target, self.allocation)
        masks = magnitude_masks(layers, counts)

        # 3. Weight correction, then the masks as parametrizations (zeros stay zero from here on).
        with torch.no_grad():
            for ly in layers:
                if self.weight_correction != "none":
                    ly.weight.copy_(correct_weights(ly.weight, masks[ly.name], self.weight_correction))
        apply_masks(layers, masks)
        return dense, counts, masks, carriers

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float,
              ctx: PruneContext) -> PruneResult:
        was_training = model.training
        model.eval()
        stats: dict[str, Any] = {}
        dense, counts, masks, carriers = self.prune_and_correct(model, layers, target, ctx)
        stats["bn_folded"] = len(carriers)

        # 4 + 5. Bias correction and layer-wise (or block-wise) calibration, unit by unit. Bias correction
        # is per layer: with block units it gets its own pass over the layers first.
        reports = []
        if len(ctx.calib) < 1:
            raise ConfigError("POT needs calibration images (calib.n >= 1).")
        passes = []
        if self.recon.mode in ("none", "layer"):
            if self.bias_correction or self.recon.mode == "layer":
                units = make_units("layer", model, layers, carriers)
                passes.append((units, self.recon, self.bias_correction))
        else:
            if self.bias_correction:
                only_bias = dataclasses.replace(self.recon, mode="none")
                passes.append((make_units("layer", model, layers, carriers), only_bias, True))
            passes.append((make_units(self.recon.mode, model, layers, carriers), self.recon, False))
        for units, settings, bias in passes:
            reports += process_units(model, dense, units, ctx.calib, settings, ctx.device,
                                     ctx.generator(RECONSTRUCTION_STREAM),
                                     bias_correction=bias, progress=ctx.progress, desc="POT calibration")
        del dense
        bake_masks(model)
        model.train(was_training)

        table, recon_stats = summarise(reports)
        stats.update(recon_stats)
        return PruneResult(model=model, allocation=rates(layers, counts), masks=masks, stats=stats,
                           tables={"reconstruction": table} if len(table) else {})

"""Pruning by a score: split the global target across layers (an allocation), then remove each layer's
lowest-scoring weights, optionally re-estimating BatchNorm statistics on the calibration set.

The methods built on it (magnitude, the random control) differ only in their default score; any score of
the registry (`ptsbench.toolkit.scores`) can be chosen with `algorithm.score`. A score that reads calibration
statistics (`wanda`, `ria`) takes the dense network's input norms from one pass and compares the whole
layer, unlike the layer-wise methods of those names (`algorithms.oneshot`). With `pattern=N:M` (top-level
key) every row of a layer keeps the N highest scores of each M consecutive weights
(`ptsbench.toolkit.patterns`), and the allocation is the pattern's. `reconstruction=layer|block` adds
PTSBench's reconstruction axis (`ptsbench.toolkit.reconstruct`): each layer or block is tuned to reproduce the
dense one's output, so any allocation (including another job's, `allocation=from_file`) can be combined with
any reconstruction. `allocation=owl` takes OWL's rates from the dense network's Wanda scores
(`ptsbench.toolkit.owl`), as the OWL code's magnitude variant, and `refine=dsnot` moves each layer's mask
with DSnoT (`ptsbench.toolkit.dsnot`) on calibration statistics gathered under `calib_protocol`, as the DSnoT
code's magnitude start.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from ptsbench.errors import ConfigError
from ptsbench.settings import COUNT, Settings, budget_option, count_text, node, option, read_budget, scaled
from ptsbench.toolkit.allocation import AllocationSettings, pattern_masks
from ptsbench.toolkit.bn import recalibrate_batchnorm
from ptsbench.toolkit.dsnot import RefinementSettings, refine_masks
from ptsbench.toolkit.layerwise import check_protocol, check_protocol_bn, check_supported, dense_input_norms
from ptsbench.toolkit.reconstruct import (
    RECONSTRUCTION_STREAM,
    REFERENCE_STEPS,
    ReconstructionSettings,
    make_units,
    process_units,
    reconstruction_budget,
    summarise,
)
from ptsbench.toolkit.scores import get_score
from ptsbench.toolkit.sparsity import (
    PrunableLayer,
    apply_masks,
    bake_masks,
    rates,
)


def check_score(key: str, value: str | None) -> None:
    if value is not None:
        get_score(str(value), key)


@dataclass(frozen=True)
class ScoreSettings(AllocationSettings, RefinementSettings):
    """The `algorithm` node of pruning by a score: the allocation axis, DSnoT's refinement, PTSBench's
    reconstruction axis and the keys below; conf/algorithm/magnitude.yaml starts from it
    (`schema/algorithm/magnitude`)."""

    bn_recalibration: bool = False  # re-estimate BatchNorm statistics on the calibration set
    bn_batch_size: int = option(64, COUNT)
    budget: float | str = budget_option()  # factor on the reconstruction steps (reference = 1)
    reconstruction: ReconstructionSettings = node(ReconstructionSettings)  # mode none: off
    # the score when not the method's own (the class's `default_score`); absent from the shipped configs
    score: str | None = option(None, check_score, schema=False)
    # where DSnoT's statistics come from (with refine=dsnot); None: sequential (+bn with BN re-estimation)
    calib_protocol: str | None = option(None, check_protocol, schema=False)

    def check_together(self, key: str) -> None:
        if self.refine == "none" and self.calib_protocol is not None:
            raise ConfigError(f"{key}.calib_protocol says where DSnoT's statistics come from; the score "
                              "reads the dense network's inputs, if any. Use it with algorithm.refine=dsnot, "
                              "or drop it.")
        check_protocol_bn(key, self.calib_protocol, self.bn_recalibration)
        super().check_together(key)


class ScorePruning(PTSAlgorithm):
    supports_nm_pattern = True
    settings: ClassVar[type[Settings]] = ScoreSettings
    # the score when `algorithm.score` is not given: a class default rather than a yaml key, so the
    # shipped configs keep their config hashes
    default_score: ClassVar[str]

    def __init__(self, **config: Any):
        given = ScoreSettings.read(config, "algorithm")
        self.score = get_score(self.default_score if given.score is None else given.score)
        self.alloc = given.allocation_choice()
        self.bn_recalibration = bool(given.bn_recalibration)
        self.bn_batch_size = int(given.bn_batch_size)
        self.budget_scale = read_budget(given.budget)
        recon = given.reconstruction
        self.recon = recon.replace(iterations=scaled(recon.iterations, self.budget_scale, minimum=0))
        self.dsnot = given.refinement()
        protocol = given.calib_protocol
        self.calib_protocol = self.default_protocol() if protocol is None else protocol

    def default_protocol(self) -> str:
        # DSnoT's reference refines each block on the pruned prefix; BN networks re-estimate BN along it
        return "sequential+bn" if self.bn_recalibration else "sequential"

    def options(self) -> dict[str, Any]:
        score = {} if self.score.name == self.default_score else {"score": self.score.name}
        opts: dict[str, Any] = {**score, **self.alloc.options(), "bn_recalibration": self.bn_recalibration}
        if self.recon.mode != "none":
            opts.update(self.recon.options(), budget=reconstruction_budget(self.recon))
        if self.dsnot is not None:
            opts.update(refine="dsnot", **self.dsnot.options(), calib_protocol=self.calib_protocol)
        return opts

    @property
    def budget_fraction(self) -> float | None:
        return self.recon.iterations / REFERENCE_STEPS if self.recon.mode != "none" else None

    def budget_work(self) -> str | None:
        if self.recon.mode == "none":
            return None
        steps = count_text(self.recon.iterations)
        return f"{steps} reconstruction steps per {self.recon.mode} (reference: {REFERENCE_STEPS:,})"

    def budget_tags(self) -> list[str]:
        return [f"x{self.budget_scale:g}"] if self.recon.mode != "none" and self.budget_scale != 1.0 else []

    @property
    def family(self) -> str:
        # a calibrated score compares whole layers on dense statistics here: not the layer-wise method
        # of the same name, so not its label
        method = f"{self.score.name}_score" if self.score.needs_calibration else self.score.name
        method += "" if self.dsnot is None else "+dsnot"
        tags = {"dense": "-dense", "sequential": "-seq", "sequential+bn": "-seqbn"}
        protocol = "" if self.calib_protocol == self.default_protocol() else tags[self.calib_protocol]
        bn = "+bn" if self.bn_recalibration else ""
        label = f"{method}-{self.alloc.describe(self.pattern)}{protocol}{bn}"
        if self.recon.mode != "none":
            label += f"+{self.recon.mode}" + ("-sparseinp" if self.recon.inputs == "sparse" else "")
        return label

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        if self.score.needs_calibration:  # its input norms come from each layer's unfolded input
            check_supported(layers)
        self.alloc.validate(layers, target, self.pattern)

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float,
              ctx: PruneContext) -> PruneResult:
        # 1. Allocation: how many weights each layer loses (fixed by the pattern under N:M); OWL's from the
        # dense network's Wanda scores, one calibration pass, which a calibrated score shares.
        norms_pass = self.alloc.needs_calibration or self.score.needs_calibration
        norms = dense_input_norms(model, layers, ctx.calib, self.bn_batch_size) if norms_pass else None
        counts = self.alloc.counts(layers, target, self.pattern, norms)
        # 2. Masks: the lowest scores of each layer (of each group of M under N:M).
        dense = copy.deepcopy(model).requires_grad_(False) if self.recon.mode != "none" else None
        # one stream for any score that draws (the random control), under its historical label
        generator = ctx.generator("random.scores")
        scores = {ly.name: self.score(ly, norms[ly.name] if self.score.needs_calibration else None, generator)
                  for ly in layers}
        masks = pattern_masks(layers, counts, self.pattern, scores)
        stats: dict[str, Any] = {}
        passes = int(norms_pass)
        # 2b. Optional DSnoT: swaps within rows towards each layer's mean output, on calibration statistics.
        if self.dsnot is not None:
            masks, refine_stats = refine_masks(model, layers, masks, ctx.calib, ctx.device, ctx.progress,
                                               self.calib_protocol, self.bn_batch_size,
                                               self.pattern, self.dsnot)
            passes += refine_stats.pop("calib_passes")
            stats.update(refine_stats)
        apply_masks(layers, masks)
        tables = {}
        # 3. Optional reconstruction of each layer's or block's dense output.
        if dense is not None:
            reports = process_units(model, dense, make_units(self.recon.mode, model, layers), ctx.calib,
                                    self.recon, ctx.device, ctx.generator(RECONSTRUCTION_STREAM),
                                    progress=ctx.progress, desc=f"{self.recon.mode}-wise reconstruction")
            tables["reconstruction"], recon_stats = summarise(reports)
            stats.update(recon_stats)
        # 4. Optional BatchNorm re-estimation on the calibration images, last: reconstruction brings each
        # layer's output back towards the dense one, so statistics taken before it would no longer fit
        # (results/README.md, "Measurements behind the defaults").
        bn_layers = 0
        if self.bn_recalibration:
            bn_layers = recalibrate_batchnorm(model, ctx.calib, ctx.device, self.bn_batch_size)
        stats.update(bn_layers_recalibrated=bn_layers, calib_passes=passes + int(self.bn_recalibration))
        bake_masks(model)
        return PruneResult(model=model, allocation=rates(layers, counts), masks=masks, stats=stats,
                           tables=tables)

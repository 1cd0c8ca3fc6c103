"""FCPTS as a package: `bridge` (threshold -> sparsity, with a density as its slope), `thresholds` (the
learnable per-layer thresholds, the controllable loss, the exact final correction), `calibration` (the
augmented calibration stream) and `method` (the FCPTS class, which reads like the paper's method)."""

from algorithms.fcpts.method import FCPTS

__all__ = ["FCPTS"]

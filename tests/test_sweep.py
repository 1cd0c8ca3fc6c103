"""The sweep filters that cut a benchmark grid: per-model discriminating sparsities, N:M-only variants."""

from __future__ import annotations

from omegaconf import OmegaConf

from ptsbench.sweep import DiscriminatingFor, ModelSparsities, NMOnlyWhere
from tests.conftest import compose_config


def kept(model: str, sparsity: float) -> bool:
    cfg = compose_config([f"model={model}", f"sparsity={sparsity}"])
    config = OmegaConf.to_container(cfg, resolve=False)  # the sweeper hands filters plain containers
    return not ModelSparsities(config, "unused").filter()


def test_each_model_keeps_only_its_discriminating_range():
    assert kept("resnet18", 0.99) and kept("resnet18", 0.95) and not kept("resnet18", 0.7)
    assert kept("mobilenetv2", 0.7) and not kept("mobilenetv2", 0.99)
    assert kept("vit_tiny", 0.5) and not kept("vit_tiny", 0.98)
    assert kept("resnet18", 0.995) and kept("mobilenetv2", 0.94)  # the discriminating cells are swept too


def test_expensive_methods_run_only_at_the_discriminating_sparsities():
    def runs(algorithm: str, model: str, sparsity: float) -> bool:
        cfg = compose_config([f"model={model}", f"algorithm={algorithm}", f"sparsity={sparsity}"])
        flt = DiscriminatingFor(OmegaConf.to_container(cfg, resolve=False), "unused")
        return not flt.filter(algorithms=["fcpts", "unipts", "pot"])

    assert runs("fcpts_quick", "resnet18", 0.995) and not runs("fcpts_quick", "resnet18", 0.9)
    assert runs("pot_quick", "mobilenetv2", 0.94) and not runs("unipts_quick", "mobilenetv2", 0.5)
    assert runs("magnitude_erk_bn", "resnet18", 0.5)  # not named: every sparsity
    cfg = compose_config(["model=vit_tiny", "algorithm=fcpts_quick", "sparsity=0.5"])
    flt = DiscriminatingFor(OmegaConf.to_container(cfg, resolve=False), "unused")
    assert "discriminating sparsities [0.7, 0.8, 0.9, 0.925, 0.94]" in flt.reason(algorithms=["fcpts"])


def test_models_without_a_range_and_bad_values_are_not_cut():
    assert not ModelSparsities({"model": {"name": "x"}, "sparsity": 0.3}, "unused").filter()
    # not a number: the job runs and fails with ptsbench's own message
    assert not ModelSparsities({"model": {"sweep_sparsities": [0.5]}, "sparsity": "abc"}, "unused").filter()
    flt = ModelSparsities({"model": {"name": "resnet18", "sweep_sparsities": [0.9, 0.99]}, "sparsity": 0.5},
                          "unused")
    assert flt.filter() and flt.reason() == "resnet18 is swept at sparsity 0.9, 0.99"


def test_variants_with_batchnorm_run_only_with_nm_patterns():
    def skipped(algorithm: str, pattern: str) -> bool:
        cfg = compose_config([f"algorithm={algorithm}", f"pattern={pattern}", "sparsity=0.5"])
        return NMOnlyWhere(OmegaConf.to_container(cfg, resolve=False), "unused").filter(bn_recalibration=True)

    assert skipped("wanda_bn", "unstructured") and skipped("magnitude_recon_quick", "unstructured")
    assert not skipped("wanda_bn", "2:4") and not skipped("wanda", "unstructured") and \
        not skipped("sparsegpt", "4:8")
    flt = NMOnlyWhere({"algorithm": {"bn_recalibration": True}, "pattern": "unstructured"}, "unused")
    assert flt.reason(bn_recalibration=True) == \
        "algorithms with algorithm.bn_recalibration=True run only with N:M patterns in this sweep"

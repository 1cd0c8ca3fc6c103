"""The GPU path (`pytest -m gpu`, deselected by default, skipped without CUDA; scripts/gpu_check.sh runs
them): a tiny job end to end on cuda, a method whose tensors must stay on the device, and PyTorch's 2:4
semi-structured kernel behind the `measured:<backend>` speed label."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from algorithms.base import PruneContext
from algorithms.fcpts import FCPTS
from algorithms.ria import RIA
from algorithms.wanda import Wanda
from ptsbench.cost import count_macs, speed_label
from ptsbench.data import CalibrationSet, InMemoryImages
from ptsbench.runner import run_job
from ptsbench.toolkit.patterns import Pattern, nm_mask
from ptsbench.toolkit.sparsity import PrunableLayer, find_prunable_layers

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
# In elements: index vectors and scalars may live on the CPU, activations and weights not.
LARGE_CPU_TENSOR = 4096


class CpuWork(TorchDispatchMode):
    """Records every op that produces a large CPU tensor: work that left the GPU."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() >= LARGE_CPU_TENSOR:
                self.ops.append(f"{func} -> {tuple(t.shape)}")
        return out


def test_tiny_job_runs_end_to_end_on_cuda(tiny_cfg, tmp_path):
    record = run_job(tiny_cfg("device=cuda", "algorithm=magnitude_uniform_bn", "sparsity=0.8"),
                     tmp_path / "job")
    assert record["status"] == "ok", record["error"]
    assert record["device"].startswith("cuda")
    assert record["peak_memory_source"] == "cuda_max_memory_allocated" and record["peak_memory_mb"] > 0
    assert record["forward_passes"] == record["calib_images"] and record["backward_passes"] == 0
    assert abs(record["macs_sparse"] / record["macs_dense"] - 0.2) < 0.01
    assert record["speed"] == "none" and record["top1"] > 10.0


def test_fcpts_keeps_its_tensors_on_the_gpu(tiny_dense):
    dense, calib = tiny_dense
    model = copy.deepcopy(dense).to(CUDA)
    on_gpu = CalibrationSet(InMemoryImages(calib.data.images.to(CUDA), calib.data.labels.to(CUDA)),
                            calib.indices, calib.seed)
    ctx = PruneContext(calib=on_gpu, device=CUDA, seed=0, progress=False)
    with CpuWork() as cpu:
        result = FCPTS(optimization={"iterations": 4, "batch_size": 32}).prune(
            model, find_prunable_layers(model), 0.8, ctx)
    assert cpu.ops == [], cpu.ops[:10]
    tensors = list(result.model.parameters()) + list(result.model.buffers()) + list(result.masks.values())
    assert {t.device.type for t in tensors} == {"cuda"}


@pytest.mark.parametrize("make", [lambda: Wanda(allocation="owl", refine="dsnot", bn_recalibration=True),
                                  lambda: RIA(refine="dsnot", bn_recalibration=True)])
def test_owl_ria_and_dsnot_keep_their_tensors_on_the_gpu(tiny_dense, make):
    dense, calib = tiny_dense
    model = copy.deepcopy(dense).to(CUDA)
    on_gpu = CalibrationSet(InMemoryImages(calib.data.images.to(CUDA), calib.data.labels.to(CUDA)),
                            calib.indices, calib.seed)
    ctx = PruneContext(calib=on_gpu, device=CUDA, seed=0, progress=False)
    layers = find_prunable_layers(model)
    with CpuWork() as cpu:
        result = make().prune(model, layers, 0.8, ctx)
    assert cpu.ops == [], cpu.ops[:10]
    assert {m.device.type for m in result.masks.values()} == {"cuda"} and result.stats["dsnot_swaps"] > 0
    for ly in layers:
        assert int((result.masks[ly.name] == 0).sum()) == round(result.allocation[ly.name] * ly.numel)


def two_four_model(seed: int = 0) -> tuple[nn.Module, list[PrunableLayer], InMemoryImages]:
    """Two Linear layers pruned 2:4 along their inputs, on images labelled by the pruned model itself."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128))
    layers = [PrunableLayer("1", model[1], "linear"), PrunableLayer("3", model[3], "linear")]
    with torch.no_grad():
        for ly in layers:
            ly.module.weight.mul_(nm_mask(ly.module.weight.abs(), 2, 4))
    images = torch.randn(512, 1, 16, 16, generator=g)
    with torch.no_grad():
        labels = model(images).argmax(1)
    return model.to(CUDA).eval(), layers, InMemoryImages(images, labels)


def test_semi_structured_kernel_gives_a_measured_label_and_keeps_accuracy():
    model, layers, test = two_four_model()
    macs = count_macs(model, layers, test.images[:1].to(CUDA))
    assert macs["macs_sparse"] * 2 == macs["macs_dense"]
    out = speed_label(Pattern(2, 4), macs, model, layers, test, CUDA, batch_size=256)
    assert out["speed"].startswith("measured:"), out.get("speed_note")
    assert out["speed_layers"] == 2 and out["linear_dense_ms"] > 0 and out["linear_sparse_ms"] > 0
    assert out["top1_semi_structured"] >= 97.0  # fp16 sparse kernel against the fp32 model's own labels
    assert next(model.parameters()).dtype == torch.float32  # the job's model is left as it was


def test_vit_2to4_job_records_the_measured_kernel(tiny_cfg, tmp_path):
    record = run_job(tiny_cfg("device=cuda", "model=vit_tiny", "pattern=2:4", "sparsity=0.5",
                              "algorithm=magnitude"),
                     tmp_path / "job")
    assert record["status"] == "ok", record["error"]
    assert record["speed"].startswith("measured:"), record.get("speed_note")
    assert record["speed_layers"] >= 12 * 4  # qkv, proj, fc1, fc2 of every block
    assert abs(record["top1_semi_structured"] - record["top1"]) <= 1.0
    print(f"\nvit_tiny 2:4 on {torch.cuda.get_device_name()}: {record['speed']}, Linear layers "
          f"{record['linear_dense_ms']:.3f} ms dense vs {record['linear_sparse_ms']:.3f} ms sparse "
          f"(x{record['linear_speedup']:.2f}); whole fp16 model x{record['model_speedup']:.2f}; "
          f"top-1 {record['top1']:.2f} fp32 vs {record['top1_semi_structured']:.2f} semi-structured fp16")

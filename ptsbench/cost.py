"""What a pruning run costs and what the sparse model could save, measured by the harness, not reported
by the method.

* **Passes** (`PassCounter`): images sent forward and backward through the model's architecture during
  the prune. A global module hook (torch.nn.modules.module.register_module_forward_hook) is active only
  inside the context; it counts the outermost call of any module that is an instance of the model's
  class with the same number of Conv2d/Linear layers. That includes deep copies of the model (the frozen
  teachers of FCPTS, UniPTS, POT and reconstruction), which no per-instance hook on the model would see,
  and excludes calls of single blocks or layers (block-wise reconstruction on cached inputs, which is not
  a pass through the model). Backward passes are counted by a gradient hook on the output of each
  counted forward that requires grad: a backward that reaches the model's output counts its batch once.
* **Peak memory** (`PeakMemory`): on CUDA, torch.cuda.max_memory_allocated after a reset (tensors only,
  not the caching allocator's reserve); on CPU, the process's resident-set high-water mark, reset at the
  start by writing 5 to /proc/self/clear_refs (Linux >= 4.0) and read from VmHWM afterwards. That is the
  kernel's exact peak, with no sampling gaps and no extra dependency. Where the reset is impossible
  the lifetime peak (resource.getrusage ru_maxrss) is recorded and labelled as such: an upper bound.
* **MACs** (`count_macs`): torch.utils.flop_counter.FlopCounterMode on one evaluation image, per prunable
  layer (the counter's total before and after each layer's call). The counter counts every kernel tap
  of a convolution, taps that read padding included, as the dense kernel computes them; under that
  convention each weight of a conv or linear layer is used once per output position, so the sparse
  count, dense MACs x kept fraction, is exact for any stride, padding, dilation or groups. `macs_model`
  is the counter's whole-model total; it misses ops the counter has no formula for (on CPU, PyTorch's
  fused attention kernel, so a ViT's attention products are absent there).
* **Speed label** (`speed_label`): `none` for unstructured sparsity (no kernel runs it faster),
  `theoretical` for N:M without a kernel here (the MAC ratio is recorded), `measured:<backend>` for 2:4
  on a CUDA GPU, where PyTorch's semi-structured kernel replaces the eligible Linear weights of an fp16
  copy of the model and the latencies and top-1 of that copy are measured.
"""

from __future__ import annotations

import copy
import logging
import resource
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from ptsbench.data import iterate_batches
from ptsbench.evaluate import evaluate
from ptsbench.toolkit.patterns import Pattern, nm_violations, parse_pattern
from ptsbench.toolkit.sparsity import PrunableLayer

log = logging.getLogger(__name__)

CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")
SEMI_STRUCTURED = Pattern(2, 4)
TIMING_REPEATS = 20


# ------------------------------------------------------------------------------------------------ passes


def _first_tensor(values: Any) -> torch.Tensor | None:
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, (tuple, list)):
        for v in values:
            found = _first_tensor(v)
            if found is not None:
                return found
    if isinstance(values, dict):
        return _first_tensor(list(values.values()))
    return None


def _layer_count(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())


class PassCounter:
    """Counts images passed forward and backward through any copy of `model`'s architecture (see the
    module docstring); the global hooks exist only inside the `with` block."""

    def __init__(self, model: nn.Module):
        self.architecture = type(model)
        self.layers = _layer_count(model)
        self.forward_images = self.backward_images = 0
        self.forward_calls = self.backward_calls = 0
        self._depth = 0
        self._active = False
        self._is_copy: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _matches(self, module: nn.Module) -> bool:
        if not isinstance(module, self.architecture):
            return False
        if module not in self._is_copy:  # computed once per instance: deep copies are new instances
            self._is_copy[module] = _layer_count(module) == self.layers
        return self._is_copy[module]

    def _before(self, module: nn.Module, args: tuple) -> None:
        if self._matches(module):
            self._depth += 1

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._matches(module):
            return
        self._depth -= 1
        if self._depth > 0:  # a nested call
            return
        # A forward stopped by an exception (output None) still ran its images into the network: the
        # layer-wise methods (Wanda, SparseGPT) stop each calibration pass after the block they prune.
        batch = _first_tensor(args)
        out = _first_tensor(output) if output is not None else None
        shaped = batch if batch is not None and batch.ndim > 0 else out
        images = int(shaped.shape[0]) if shaped is not None else 0
        self.forward_calls += 1
        self.forward_images += images
        if out is not None and out.requires_grad:
            out.register_hook(self._backward_hook(images))

    def _backward_hook(self, images: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self._active:
                self.backward_calls += 1
                self.backward_images += images

        return hook

    def __enter__(self) -> PassCounter:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._active = True
        self._handles = [register_module_forward_pre_hook(self._before),
                         register_module_forward_hook(self._after, always_call=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def record(self) -> dict[str, int]:
        return {"forward_passes": self.forward_images, "backward_passes": self.backward_images,
                "forward_calls": self.forward_calls, "backward_calls": self.backward_calls}


# ------------------------------------------------------------------------------------------ peak memory


def _status_kib(field: str) -> int | None:
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _lifetime_rss_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory inside the `with` block: device tensors on CUDA, the process's resident set on CPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.values: dict[str, Any] = {}

    def __enter__(self) -> PeakMemory:
        self._rss_reset = _reset_rss_peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_kib("VmHWM") if self._rss_reset else None
        rss_mb = hwm / 2**10 if hwm is not None else _lifetime_rss_peak_mb()
        self.values = {"peak_rss_mb": rss_mb,
                       "peak_rss_source": "vmhwm_reset" if hwm is not None else "ru_maxrss_lifetime"}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.values.update(peak_memory_mb=torch.cuda.max_memory_allocated(self.device) / 2**20,
                               peak_memory_source="cuda_max_memory_allocated")
        else:
            self.values.update(peak_memory_mb=rss_mb,
                               peak_memory_source=f"rss:{self.values['peak_rss_source']}")


class PruneCost:
    """Passes and peak memory of the prune: `with PruneCost(model, device) as cost: prune(...)`."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.passes = PassCounter(model)
        self.memory = PeakMemory(device)

    def __enter__(self) -> PruneCost:
        self.memory.__enter__()
        self.passes.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.passes.__exit__(*exc)
        self.memory.__exit__(*exc)

    def record(self) -> dict[str, Any]:
        return {**self.passes.record(), **self.memory.values}


# ------------------------------------------------------------------------------------------------- MACs


def one_input(dataset: Dataset, device: torch.device) -> torch.Tensor:
    images, _ = next(iter(iterate_batches(dataset, 1)))
    return images.to(device)


def count_macs(model: nn.Module, layers: list[PrunableLayer], x: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of one forward on `x`: the whole model, the prunable layers dense, and the
    prunable layers over their non-zero weights. The model's train/eval mode is restored."""
    dense: dict[str, int] = {}
    with FlopCounterMode(display=False) as counter:
        def before(module: nn.Module, args: tuple, name: str) -> None:
            dense[name] = dense.get(name, 0) - counter.get_total_flops()

        def after(module: nn.Module, args: tuple, output: Any, name: str) -> None:
            dense[name] += counter.get_total_flops()

        handles = []
        for ly in layers:
            handles.append(ly.module.register_forward_pre_hook(lambda m, a, n=ly.name: before(m, a, n)))
            handles.append(ly.module.register_forward_hook(lambda m, a, o, n=ly.name: after(m, a, o, n)))
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(x)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        total = counter.get_total_flops()
    macs_dense = macs_sparse = 0
    for ly in layers:
        layer_macs = dense.get(ly.name, 0) // 2  # the counter counts a multiply-add as two FLOPs
        w = ly.module.weight
        per_weight, rest = divmod(layer_macs, w.numel())
        if rest:  # not one use per weight per output position: not a plain conv/linear call
            raise ValueError(f"layer {ly.name}: {layer_macs} MACs is not a multiple of its {w.numel()} "
                             "weights")
        macs_dense += layer_macs
        macs_sparse += per_weight * int(torch.count_nonzero(w.detach()))
    return {"macs_model": total // 2, "macs_dense": macs_dense, "macs_sparse": macs_sparse}


# ------------------------------------------------------------------------------------------ speed label


def is_semi_structured(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive inputs of each output row: what the 2:4 kernel needs."""
    return weight.ndim == 2 and weight.shape[1] % 4 == 0 and nm_violations(weight, SEMI_STRUCTURED) == 0


class _HalfInputs(nn.Module):
    """Runs an fp16 model on float32 evaluation batches and returns float32 logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def _latency_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median wall time of `fn` over TIMING_REPEATS calls after warm-up, synchronised with the GPU."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(TIMING_REPEATS):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000.0 * sorted(times)[len(times) // 2]


def _linear_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.setdefault(n, a[0].detach())) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def measure_semi_structured(model: nn.Module, layers: list[PrunableLayer], test: Dataset,
                            device: torch.device,
                            batch_size: int) -> dict[str, Any]:
    """Convert the 2:4 Linear weights of an fp16 copy of `model` to PyTorch's semi-structured kernel; time
    those layers and the whole model against the dense fp16 copy on one evaluation batch, and evaluate
    the converted copy. Raises if no layer converts."""
    from torch.sparse import to_sparse_semi_structured

    dense = copy.deepcopy(model).half().eval()
    names = [ly.name for ly in layers if isinstance(ly.module, nn.Linear)
             and is_semi_structured(dense.get_submodule(ly.name).weight)]
    x = next(iter(iterate_batches(test, batch_size)))[0].to(device).half()
    inputs = _linear_inputs(dense, names, x)
    sparse = copy.deepcopy(dense)
    converted, backend = [], None
    for name in names:
        linear = sparse.get_submodule(name)
        try:
            linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()),
                                         requires_grad=False)
            with torch.no_grad():
                linear(inputs[name])
        except (RuntimeError, ValueError) as exc:  # shape or dtype outside the kernel's constraints
            log.info("semi-structured: %s stays dense (%s)", name, exc)
            linear.weight = dense.get_submodule(name).weight
            continue
        converted.append(name)
        backend = (type(linear.weight).__name__.removeprefix("SparseSemiStructuredTensor").lower()
                   or "semi_structured")
    if not converted:
        raise RuntimeError("no prunable Linear layer is 2:4 along its inputs within the kernel's shape "
                           "limits")
    with torch.no_grad():
        lin_dense = sum(_latency_ms(lambda n=n: dense.get_submodule(n)(inputs[n]), device) for n in converted)
        lin_sparse = sum(_latency_ms(lambda n=n: sparse.get_submodule(n)(inputs[n]),
                                     device) for n in converted)
        model_dense = _latency_ms(lambda: dense(x), device)
        model_sparse = _latency_ms(lambda: sparse(x), device)
    ev = evaluate(_HalfInputs(sparse), test, device, batch_size=batch_size)
    return {"speed": f"measured:{backend}", "speed_layers": len(converted), "speed_batch": int(x.shape[0]),
            "linear_dense_ms": lin_dense, "linear_sparse_ms": lin_sparse,
            "linear_speedup": lin_dense / lin_sparse,
            "model_fp16_dense_ms": model_dense, "model_fp16_sparse_ms": model_sparse,
            "model_speedup": model_dense / model_sparse, "top1_semi_structured": ev.top1}


def speed_label(pattern: Pattern, macs: dict[str, int], model: nn.Module, layers: list[PrunableLayer],
                test: Dataset, device: torch.device, batch_size: int) -> dict[str, Any]:
    """`none` for unstructured; for N:M the MAC ratio, and a measurement where a 2:4 kernel runs here."""
    if not pattern.is_nm:
        return {"speed": "none"}
    sparse_macs = macs["macs_model"] - macs["macs_dense"] + macs["macs_sparse"]
    out: dict[str, Any] = {"speed": "theoretical",
                           "speedup_theoretical": macs["macs_model"] / max(1, sparse_macs)}
    if pattern != SEMI_STRUCTURED or device.type != "cuda":
        return out
    try:
        out.update(measure_semi_structured(model, layers, test, device, batch_size))
    except (RuntimeError, ValueError, ImportError) as exc:  # no kernel for this GPU, build or model
        out["speed_note"] = f"2:4 kernel not used: {type(exc).__name__}: {exc}"
        log.warning("speed stays theoretical: %s", out["speed_note"])
    return out


def inference_cost(model: nn.Module, layers: list[PrunableLayer], test: Dataset, device: torch.device,
                   pattern: Pattern | str = "unstructured", batch_size: int = 500) -> dict[str, Any]:
    """MACs on one evaluation image and the speed label of the sparse `model` (record keys)."""
    macs = count_macs(model, layers, one_input(test, device))
    return {**macs, **speed_label(parse_pattern(pattern), macs, model, layers, test, device, batch_size)}

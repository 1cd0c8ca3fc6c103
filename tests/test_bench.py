"""Benchmarks that print figures (`bash scripts/test.sh -m bench -s`); excluded from the default run.

Evaluation and dense-training throughput of the harness against plain loops over the same tensors.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import pytest
import timm
import torch
from omegaconf import OmegaConf

from ptsbench.data import build_data, iterate_batches
from ptsbench.evaluate import evaluate


def plain_loop(model, images, batch_size):
    correct = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            correct += int(model(images[i:i + batch_size]).argmax(1).eq(torch.zeros(1)).sum())
    return len(images) / (time.perf_counter() - start)


@pytest.mark.bench
@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", {}),
    ("mobilenetv2_100", {}),
    ("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 7}),
])
def test_eval_throughput_against_plain_loop(require_fmnist, tmp_path, name, kwargs):
    data = build_data(OmegaConf.create({"name": "fashion_mnist", "root": str(require_fmnist)}), tmp_path)
    model = timm.create_model(name, num_classes=10, in_chans=1, **kwargs).eval()
    images = data.test.images
    batch = 500
    evaluate(model, data.test, batch_size=batch)  # warm-up
    plain, harness, harness_cl = [], [], []
    for _ in range(3):  # interleaved, best of three each: CPU clock drift hits all three alike
        plain.append(plain_loop(model, images, batch))
        harness.append(evaluate(model, data.test, batch_size=batch).images_per_second)
        harness_cl.append(evaluate(model, data.test, batch_size=batch, channels_last=True).images_per_second)
    plain, harness, harness_cl = max(plain), max(harness), max(harness_cl)
    print(f"\n{name}: plain model(x) {plain:.0f} img/s; harness {harness:.0f} img/s "
          f"(ratio {harness / plain:.3f}); harness channels_last {harness_cl:.0f} img/s "
          f"(ratio {harness_cl / plain:.3f})")
    assert harness / plain > 0.8
    assert sum(1 for _ in iterate_batches(data.test, batch)) == 20


def plain_training(model, images, labels, batch_size):
    """A bare AdamW loop over the same batches in the same layout: images per second."""
    model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    start = time.perf_counter()
    for i in range(0, len(images) - batch_size + 1, batch_size):
        x = images[i:i + batch_size].contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(model(x), labels[i:i + batch_size])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(images) // batch_size * batch_size / (time.perf_counter() - start)


@pytest.mark.bench
def test_dense_training_throughput_against_plain_loop(require_fmnist, tmp_path):
    """The harness's dense recipe (shuffling, schedule, loss checks, progress bar) against a bare loop."""
    from ptsbench.train import train_dense

    data = build_data(OmegaConf.create({"name": "fashion_mnist", "root": str(require_fmnist),
                                        "limit_train": 2048}), tmp_path)
    train = data.train
    assert len(train) == 2048
    recipe = {"epochs": 1, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 0.1,
              "channels_last": True}
    plain, harness = [], []
    for _ in range(2):  # interleaved, best of two: clock drift hits both alike
        model = timm.create_model("resnet18", num_classes=10, in_chans=1)
        plain.append(plain_training(model, train.images, train.labels, 64))
        model = timm.create_model("resnet18", num_classes=10, in_chans=1)
        info = train_dense(model, train, recipe, seed=0, progress=False)
        harness.append(info["train_steps"] * 64 / info["train_seconds"])
    plain, harness = max(plain), max(harness)
    print(f"\nresnet18@28 dense training, batch 64, {torch.get_num_threads()} threads: plain loop "
          f"{plain:.0f} img/s; harness {harness:.0f} img/s (ratio {harness / plain:.3f})")
    assert harness / plain > 0.8


def random_calibration(n: int, size: int = 28):
    from ptsbench.data import CalibrationSet, InMemoryImages

    g = torch.Generator().manual_seed(0)
    data = InMemoryImages(torch.randn(n, 1, size, size, generator=g), torch.randint(10, (n,), generator=g))
    return CalibrationSet(data, list(range(n)), 0)


@pytest.mark.bench
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("bridge,threshold_grad", [("kde", "sparsity_only"), ("kde", "ste"),
                                                   ("histogram", "sparsity_only")])
def test_fcpts_time_per_iteration(bridge, threshold_grad, compiled):
    """FCPTS at the reference batch (64) on resnet18 at 28x28: seconds per iteration and where they go,
    projected to the reference 1,600 iterations, against the floor: one plain SGD step (forward, backward,
    update) of the dense model on the same batch, timed in the same process. `compiled` is the job's
    `compile=true` (fused threshold masks and bridge counts); the first 8 iterations (compilation) are
    left out of the per-iteration figures in both modes."""
    import algorithms.fcpts.method as fcpts_method
    from algorithms.base import PruneContext
    from algorithms.fcpts import FCPTS
    from ptsbench.toolkit.sparsity import find_prunable_layers

    warm, iterations = 8, 48
    seen: dict[str, int] = {}
    timed = fcpts_method.Stopwatch.time

    @contextmanager
    def after_warmup(self, phase):
        seen[phase] = seen.get(phase, 0) + 1
        with timed(self, phase) if seen[phase] > warm else nullcontext():
            yield

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    algo = FCPTS(optimization={"iterations": iterations},
                 bridge={"kind": bridge, "threshold_grad": threshold_grad})
    ctx = PruneContext(calib=random_calibration(1024), device=torch.device("cpu"), seed=0, progress=False,
                       compile=compiled)
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fcpts_method.Stopwatch, "time", after_warmup)
        result = algo.prune(model, find_prunable_layers(model), 0.8, ctx)
    total = time.perf_counter() - start
    s = result.stats
    per = {k[len("seconds_"):]: v / (iterations - warm) for k, v in s.items()
           if k.startswith("seconds_") and k != "seconds_per_iteration"}
    per_iteration = sum(per.values())
    plain = timm.create_model("resnet18", num_classes=10, in_chans=1).to(memory_format=torch.channels_last)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    x = ctx.calib.data.images[:64].contiguous(memory_format=torch.channels_last)
    y = plain(x).argmax(1).detach()
    for i in range(12):
        if i == 2:
            t0 = time.perf_counter()
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        sgd.step()
    step = (time.perf_counter() - t0) / 10
    print(f"\nFCPTS {bridge}/{threshold_grad} {'compiled' if compiled else 'eager'} resnet18@28, batch 64, "
          f"{torch.get_num_threads()} threads: {per_iteration:.3f} s/iteration ("
          + ", ".join(f"{k} {v:.3f}" for k, v in per.items())
          + f"); plain SGD step {step:.3f} s; ratio {per_iteration / step:.2f}x; whole prune {total:.1f} s "
          f"for {iterations} iterations; projected 1600 iterations: {per_iteration * 1600 / 60:.1f} min")
    assert per_iteration > 0


@pytest.mark.bench
def test_unipts_quick_time_per_candidate_and_epoch():
    """UniPTS with the quick preset's sizes on resnet18 at 28x28: time per search candidate and per epoch."""
    from algorithms.base import PruneContext
    from algorithms.unipts import UniPTS
    from ptsbench.toolkit.sparsity import find_prunable_layers

    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    algo = UniPTS(search={"population_size": 8, "generations": 5, "num_parents": 4, "fitness_set_size": 512},
                  training={"epochs": 5, "bn_recalibration": True})
    ctx = PruneContext(calib=random_calibration(1024), device=torch.device("cpu"), seed=0, progress=False)
    start = time.perf_counter()
    s = algo.prune(model, find_prunable_layers(model), 0.9, ctx).stats
    total = time.perf_counter() - start
    print(f"\nUniPTS quick resnet18@28, {torch.get_num_threads()} threads: {s['search_candidates_scored']} "
          f"candidates at {s['search_seconds_per_candidate']:.2f} s each ({s['search_seconds']:.1f} s "
          f"search), {s['train_seconds_per_epoch']:.1f} s per epoch of 1024 images; whole job {total:.1f} s")
    assert total > 0


@pytest.mark.bench
def test_unipts_fitness_evaluation_against_the_forward_passes_it_needs():
    """One UniPTS candidate costs a BN re-estimation pass (train mode) and an evaluation pass (eval mode)
    over the fitness set; the bare floor is those two `model(x)` loops. Prints floor / ours
    (target >= 0.9)."""
    from algorithms.unipts.search import CandidateProbe, draw_fitness_set
    from ptsbench.toolkit.allocations import allocate
    from ptsbench.toolkit.sparsity import find_prunable_layers

    model = timm.create_model("resnet18", num_classes=10, in_chans=1).to(memory_format=torch.channels_last)
    layers = find_prunable_layers(model)
    fitness = draw_fitness_set(random_calibration(1024), 512, torch.Generator().manual_seed(0))
    counts = allocate(layers, 0.9, "erk")
    images = fitness.data.images

    def bare() -> None:
        with torch.no_grad():
            model.train()
            for i in range(0, len(images), 64):
                model(images[i:i + 64])
            model.eval()
            for i in range(0, len(images), 500):
                model(images[i:i + 500])

    with CandidateProbe(model, layers, fitness, 64, 1e-6, torch.Generator().manual_seed(0)) as probe:
        probe(counts)  # warm-up
        bare()
        ours, floor = [], []
        for _ in range(3):
            start = time.perf_counter()
            probe(counts)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            bare()
            floor.append(time.perf_counter() - start)
    print(f"\nUniPTS fitness of one candidate, resnet18@28, 512 images, {torch.get_num_threads()} threads: "
          f"{min(ours):.3f} s; bare BN pass + eval pass {min(floor):.3f} s "
          f"(ratio {min(floor) / min(ours):.3f})")
    assert min(ours) > 0

"""Benchmarks against the reference implementations themselves
(`PTSBENCH_REFERENCE=DIR pytest -m bench -s tests/test_bench_reference.py`).

Each test runs a reference's own step function (ModelTC/FCPTS with ModelTC/msbench, msbench's advanced
PTS reconstruction, xjjxmu/UniPTS) and ours on the same model (the shipped Fashion-MNIST resnet18 at
56 px), the same batches (our augmentation, drawn once and fed to both), the same thread count, in one
process, interleaved, best of several rounds. The numerics are checked first (same start, first losses
within a stated tolerance, or equal masks), then the time; the ratio printed is ours / reference.

The reference code is not part of this project: PTSBENCH_REFERENCE names a folder with the checkouts
(FCPTS/, msbench/, UniPTS/) and a `pydeps/` folder for the packages they import that the harness does not
install (yacs, termcolor); `scripts/reference_checkouts.sh DIR` prepares it. Without it the tests skip.
What is stubbed is only what does not compute: `.cuda()` returns its object, torch.cuda.set_device,
synchronize and max_memory_allocated do nothing, the reference's data loaders and checkpoint readers are
replaced by our batches and our dense model, msbench's package __init__ gets the FCPTSFakeSparse export it
lacks and FCPTS's config the KD_loss its release never copies from the command line. Where a reference
draws its own batch order (msbench's np.random.randint, for the numerics check only) the stub walks ours.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import math
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from algorithms.base import PruneContext
from algorithms.fcpts import FCPTS
from algorithms.fcpts.calibration import calibration_stream
from algorithms.fcpts.method import AUGMENT_STREAM, DATA_STREAM
from algorithms.fcpts.thresholds import original_weight
from ptsbench.toolkit.sparsity import find_prunable_layers

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_ENV = "PTSBENCH_REFERENCE"


@pytest.fixture(scope="module")
def reference_root() -> Path:
    root = os.environ.get(REFERENCE_ENV)
    if not root or not Path(root).is_dir():
        pytest.skip(
            f"{REFERENCE_ENV} is not set to a folder of reference checkouts (FCPTS/, msbench/, UniPTS/, "
            f"pydeps/): `bash scripts/reference_checkouts.sh DIR` prepares one; the reference code is "
            f"never part of this project"
        )
    return Path(root)


@pytest.fixture(scope="module")
def shipped_resnet18(require_fmnist, tmp_path_factory):
    """The shipped dense resnet18 (56 px Fashion-MNIST) and 1,024 calibration images (seed 0), as jobs get
    them."""
    from ptsbench.data import sample_calibration
    from ptsbench.dense import build_model, load_data, load_dense_weights
    from tests.conftest import compose_config

    cache = tmp_path_factory.mktemp("reference-bench-cache")
    cfg = compose_config(["model=resnet18", "progress=false"], cache_dir=cache)
    data = load_data(cfg, cache)
    model = build_model(cfg, data)
    load_dense_weights(cfg, model, data, cache, torch.device("cpu"), progress=False)
    calib = sample_calibration(data.train, 1024, 0, 64)
    return model.eval(), calib


@contextlib.contextmanager
def reference_code(
    folders: list[Path], stub_modules: dict[str, types.ModuleType] | None = None
) -> Iterator[None]:
    """Import reference code from `folders` and run it on the CPU. `.cuda()` returns its object and the CUDA
    device and timing calls do nothing; they move and time, they do not compute. Modules imported from the
    folders are dropped on exit (the stubs restored), so two references with a `utils` or `main` of their
    own can run in one process one after the other."""
    before = set(sys.modules)
    mp = pytest.MonkeyPatch()
    for folder in reversed(folders):
        mp.syspath_prepend(str(folder))
    for name, module in (stub_modules or {}).items():
        mp.setitem(sys.modules, name, module)
    mp.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    mp.setattr(nn.Module, "cuda", lambda self, *args, **kwargs: self)
    mp.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    mp.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: 0)
    mp.setattr(torch.cuda, "set_device", lambda *args, **kwargs: None)
    try:
        yield
    finally:
        mp.undo()
        for name in set(sys.modules) - before:
            source = getattr(sys.modules[name], "__file__", None) or ""
            if any(Path(source).is_relative_to(folder) for folder in folders):
                del sys.modules[name]


def export_fcpts_fake_sparse() -> None:
    """msbench's fake_sparse/__init__.py omits the FCPTSFakeSparse its prepare.py imports; quieter logs."""
    import msbench.fake_sparse as fake_sparse
    from msbench.fake_sparse.sparse_base import FCPTSFakeSparse
    from msbench.utils.logger import set_log_level

    fake_sparse.FCPTSFakeSparse = FCPTSFakeSparse
    set_log_level(
        logging.WARNING
    )  # its per-call INFO lines ("start tuning by adasparse") would drown the figures


def best_round(fn: Callable[[], None], times: list[float]) -> None:
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)


def fixed_batches(calib, n: int, batch_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """n augmented calibration batches as FCPTS's stream draws them for a job of this seed."""
    ctx = PruneContext(calib=calib, device=torch.device("cpu"), seed=seed, progress=False)
    stream = calibration_stream(
        calib, batch_size, ctx.device, ctx.generator(DATA_STREAM), ctx.generator(AUGMENT_STREAM)
    )
    return [next(stream) for _ in range(n)]


# ============================================================================================== FCPTS


class ReferenceFCPTS:
    """ModelTC/FCPTS `main.py` with msbench's FCPTSFakeSparse, set up as its `main()` does for run.sh's
    arguments (KL at the logits, |S - P|, lambda 1, batch 64, lr 0.04 x 64/256, wd 3e-4, st_decay 0, 100
    epochs of 16 iterations, one warmup epoch); `train(batches)` is its own `train_one_epoch`."""

    def __init__(self, root: Path, dense: nn.Module, target: float, iterations_per_epoch: int):
        self.stubs = {"data": types.ModuleType("data")}  # the loaders (cv2, lmdb, ...): we feed our batches
        self.stubs["data"].build_loader = None
        self.folders = [root / "FCPTS", root / "msbench", root / "pydeps"]
        with self.code(), contextlib.redirect_stdout(io.StringIO()):  # its set-up prints every node and layer
            export_fcpts_fake_sparse()
            main = importlib.import_module("main")
            from msbench.scheduler import build_sparse_scheduler
            from msbench.utils.state import enable_sparsification
            from train.lr_scheduler import build_scheduler

            argv = [
                "main.py",
                "--arch",
                "resnet18",
                "--batch-size",
                "64",
                "--KD_loss",
                "KL",
                "--target_sparsity",
                str(target),
                "--sparsity_loss_type",
                "abs",
                "--sparsity_lambda",
                "1.0",
                "--opts",
                "TRAIN.EPOCHS",
                "100",
                "TRAIN.BASE_LR",
                "0.04",
                "TRAIN.WEIGHT_DECAY",
                "3e-4",
                "TRAIN.WARMUP_EPOCHS",
                "1",
                "EXTRA.st_decay",
                "0.0",
            ]
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(sys, "argv", argv)
                _, config = main.parse_option()
            config.defrost()  # main.py's __main__: linear lr scaling by batch x world size (1) / 256
            config.TRAIN.BASE_LR = config.TRAIN.BASE_LR * config.DATA.BATCH_SIZE / 256.0
            config.EXTRA.KD_loss = "KL"  # the release parses --KD_loss but never copies it into the config
            config.freeze()
            main.logger = logging.getLogger("fcpts-reference")
            # main(): the model and the teacher, with our dense weights in place of its checkpoint
            main.create_model_by_name = lambda _config: copy.deepcopy(dense)
            main.load_checkpoint_simple = lambda *_args: 0.0
            main.prepare_teacher(config)
            model = build_sparse_scheduler(
                {
                    "scheduler": {"type": "BaseScheduler"},
                    "mask_generator": {"type": "FCPTSMaskGenerator"},
                    "fake_sparse": {"type": "FCPTSFakeSparse"},
                }
            ).prepare_sparse_model(copy.deepcopy(dense))
            model.train()
            for name, layer in model.named_modules():
                if name in main.dense_block_node_names:
                    layer.register_forward_hook(main.get_sparse_activation(name))
            enable_sparsification(model)
            self.erk = main.get_sparsities_sparse_table_using_erk(model, config.EXTRA.target_sparsity)
            main.update_score_str_per_layer_v1_using_table(model, self.erk)
            self.main, self.config, self.model = main, config, model
            self.iterations_per_epoch = iterations_per_epoch
            self.build_scheduler = build_scheduler
            self.reset_optimizer()
            self.epoch = 0

    def code(self):
        return reference_code(self.folders, self.stubs)

    def reset_optimizer(self) -> None:
        """get_str_optimizer and build_scheduler as main() calls them (after any change to the scores)."""
        self.optimizer = self.main.get_str_optimizer(self.config, self.model)
        self.lr_scheduler = self.build_scheduler(self.config, self.optimizer, self.iterations_per_epoch)

    def sparse_modules(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.model.named_modules() if hasattr(m, "weight_fake_sparse")}

    def train(self, batches: list[torch.Tensor]) -> None:
        """The reference's train_one_epoch over `batches` (its epoch counter advances per call)."""
        labels = torch.zeros(len(batches[0]), dtype=torch.long)
        with self.code():
            self.main.train_one_epoch(
                self.config,
                self.model,
                None,
                [(x, labels) for x in batches],
                self.optimizer,
                self.epoch,
                None,
                self.lr_scheduler,
                model_ema=None,
            )
        self.epoch += 1

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[float, float]]]:
        """(KL loss, sparsity loss) of every iteration, read off the reference's own criterion calls."""
        seen: list[tuple[float, float]] = []
        kd, constrain = self.main.kd_criterion, self.main.sparsity_constrain
        pending: list[float] = []

        def kd_recorded(*args):
            loss = kd(*args)
            pending.append(loss.item())
            return loss

        def constrain_recorded(*args):
            loss = constrain(*args)
            seen.append((pending.pop(), loss.item()))
            return loss

        self.main.kd_criterion, self.main.sparsity_constrain = kd_recorded, constrain_recorded
        try:
            yield seen
        finally:
            self.main.kd_criterion, self.main.sparsity_constrain = kd, constrain


def untied_score(weight: torch.Tensor, score: torch.Tensor) -> float:
    """A score whose threshold lies halfway between sigmoid(score) and the next larger |w|: the same weights
    at or below it, and none on it. The shipped weights are fp16 values, so ties at a threshold are common,
    and there the two codes differ by definition (ours prunes |w| = t, the reference keeps 0.5 w and does not
    count it), not by their arithmetic."""
    a = weight.detach().abs().reshape(-1).double()
    t = float(torch.sigmoid(score.detach()))  # in the score's dtype, as the mask compares it
    above = a[a > t]
    t_mid = (t + float(above.min())) / 2 if above.numel() else t
    new = math.log(t_mid) - math.log1p(-t_mid)
    assert int((a <= t).sum()) == int((a <= float(torch.sigmoid(torch.tensor(new, dtype=score.dtype)))).sum())
    return new


def ours_fcpts_code_mode(dense: nn.Module, calib, target: float):
    """Our FCPTS in the released code's mode (histogram bridge, mask without gradient), as a job starts it."""
    model = copy.deepcopy(dense)
    layers = find_prunable_layers(model)
    algo = FCPTS(bridge={"kind": "histogram", "threshold_grad": "sparsity_only"})
    ctx = PruneContext(calib=calib, device=torch.device("cpu"), seed=0, progress=False)
    return algo, algo.start(model, layers, target, ctx), ctx


def run_ours(algo: FCPTS, run, ctx, batches: list[torch.Tensor]) -> None:
    """Our iteration loop (`FCPTS._optimise`: data, step, progress, trajectory) over `batches`."""
    algo.optim = algo.optim.replace(iterations=len(batches))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(algo, "_batches", lambda _ctx: iter(batches))
        algo._optimise(run, ctx)


def test_fcpts_step_against_reference(reference_root, shipped_resnet18):
    """One FCPTS iteration (teacher, student with the threshold masks, KL at T=4, the histogram bridge and
    |S - P|, SGD update and schedule): ours in the released code's mode against the reference's
    train_one_epoch, both from the same thresholds: ours at the job's ERK start, each moved off any tied
    |w| (`untied_score`, same pruned sets) and copied into the reference's scores.

    Numerics: the masked weights the forward passes use must be identical; the first two iterations run at
    lr 0 in both (warmup from 0; the reference updates the schedule after the step, one step behind ours),
    so their losses must agree to float rounding (the convolutions run NHWC in ours, NCHW in the
    reference). Then the time of 8 iterations, best of 3 rounds, ours / reference.
    """
    dense, calib = shipped_resnet18
    torch.set_num_threads(1)
    target = 0.98
    algo, run, ctx = ours_fcpts_code_mode(dense, calib, target)
    ref = ReferenceFCPTS(reference_root, dense, target, len(calib) // 64)
    modules = ref.sparse_modules()
    assert set(modules) == {ly.name for ly in run.layers}
    with torch.no_grad():
        erk_counts = {n: int(ref.erk[n] * m.weight.numel()) for n, m in modules.items()}
        ours_counts = {
            ly.name: int((original_weight(ly).abs() <= g.threshold()).sum())
            for ly, g in zip(run.layers, run.gates, strict=True)
        }
        for ly, g in zip(run.layers, run.gates, strict=True):
            g.score.copy_(untied_score(original_weight(ly), g.score))
            modules[ly.name].weight_fake_sparse.scores.data = g.score.detach().clone()
    ref.reset_optimizer()
    differ = sum(abs(erk_counts[n] - ours_counts[n]) for n in modules)

    with torch.no_grad():  # the masked weights each code's forward uses: bit for bit the same
        differ_masked = sum(
            int((ly.module.weight != modules[ly.name].weight_fake_sparse(modules[ly.name].weight)).sum())
            for ly in run.layers
        )
    assert differ_masked == 0

    batches = fixed_batches(calib, 2)
    with ref.recording() as ref_losses:
        ref.train(batches)
    ours_losses = []
    for i, x in enumerate(batches):
        last, _ = run.step(i, x)
        ours_losses.append((last["rec_loss"], last["sparsity_loss"]))
    for (o_rec, o_sp), (r_rec, r_sp) in zip(ours_losses, ref_losses, strict=True):
        assert o_rec == pytest.approx(r_rec, rel=1e-5)
        assert o_sp == pytest.approx(r_sp, abs=1e-7)

    rounds, per_round = 3, 8
    ours_t: list[float] = []
    ref_t: list[float] = []
    for r in range(rounds):
        batches = fixed_batches(calib, per_round, seed=r + 1)
        best_round(lambda b=batches: ref.train(b), ref_t)
        best_round(lambda b=batches: run_ours(algo, run, ctx, b), ours_t)
    ours_s, ref_s = min(ours_t) / per_round, min(ref_t) / per_round
    print(
        f"\nFCPTS step (code mode), shipped resnet18 @56 px, batch 64, {torch.get_num_threads()} thread(s): "
        f"ours {ours_s:.3f} s, reference {ref_s:.3f} s, ratio {ours_s / ref_s:.3f}; first losses "
        + "; ".join(
            f"{o[0]:.6f}/{r[0]:.6f} KL, {o[1]:.2e}/{r[1]:.2e} L_c"
            for o, r in zip(ours_losses, ref_losses, strict=True)
        )
        + f"; masks equal; the reference's own ERK start differs from ours by {differ} weights in all"
    )


# ================================================================================= POT reconstruction


class AttrDict(dict):
    """The config object msbench's reconstruction reads: `config.max_count` and `'bias_lr' in config`."""

    __getattr__ = dict.__getitem__


POT_UNITS = ("layer1.0.conv1", "layer3.0.conv2", "layer4.1.conv2")


class ReferencePOTUnits:
    """msbench's advanced PTS as configs/pst_res18_sp50_pot.yaml sets it up (BN fused, static magnitude masks
    with weight correction, `independent` units, dense inputs, keep_gpu false, Adam 1e-5 / 1e-4), for the
    units named: `pts_reconstruction`'s set-up, node by node, without the loop that tunes every unit.
    `steps(unit, n)` is its own subgraph_reconstruction with max_count = n."""

    def __init__(self, root: Path, dense: nn.Module, rates: dict[str, float], calib, units: tuple[str, ...]):
        self.folders = [root / "msbench"]
        with self.code():
            export_fcpts_fake_sparse()
            from msbench import advanced_pts
            from msbench.scheduler import build_sparse_scheduler
            from msbench.utils import deepcopy_graphmodule
            from msbench.utils.state import disable_sparsification, enable_sparsification

            scheduler = build_sparse_scheduler(
                {
                    "mask_generator": {"type": "NormalMaskGenerator", "kwargs": {"structured": False}},
                    "fake_sparse": {
                        "type": "DefaultFakeSparse",
                        "kwargs": {"mask_is_static": True, "weight_correction": True},
                    },
                    "scheduler": {"type": "BaseScheduler"},
                    "fuse_bn": True,
                }
            )
            dense_model = scheduler.prepare_sparse_model(copy.deepcopy(dense))
            for name, module in dense_model.named_modules():
                if hasattr(module, "weight_fake_sparse"):
                    module.weight_fake_sparse.mask_generator.sparsity = rates[name]
            dense_model.eval()
            sparse_model = deepcopy_graphmodule(dense_model)
            advanced_pts.before_run(sparse_model)
            sparse_model.eval()
            disable_sparsification(dense_model)
            enable_sparsification(sparse_model)
            cali_data = [images for images, _ in calib.batches(64)]
            dense_modules, sparse_modules = (
                dict(dense_model.named_modules()),
                dict(sparse_model.named_modules()),
            )
            nodes = list(sparse_model.graph.nodes)
            self.units = {}
            for node in nodes:
                if node.op == "call_module" and node.target in units:
                    extra = advanced_pts.append_extra_inputs(nodes, [node])
                    inps, oups = advanced_pts.save_inp_oup_data(
                        dense_model,
                        dense_modules[node.target],
                        dense_modules[node.target],
                        cali_data,
                        keep_gpu=False,
                    )
                    subgraph = advanced_pts.extract_subgraph(
                        sparse_modules, [node], node.all_input_nodes, extra, node
                    )
                    self.units[node.target] = (subgraph, sparse_modules[node.target], inps, oups)
            self.advanced_pts = advanced_pts
        self.config = AttrDict(max_count=0, weight_lr=1e-5, bias_lr=1e-4)

    def code(self):
        return reference_code(self.folders)

    def steps(self, unit: str, n: int, inputs=None, outputs=None) -> None:
        subgraph, _, inps, oups = self.units[unit]
        with self.code():
            self.advanced_pts.subgraph_reconstruction(
                subgraph, inputs or inps, outputs or oups, AttrDict(self.config, max_count=n)
            )


def ours_pot_units(dense: nn.Module, calib, target: float, names: tuple[str, ...]):
    """Our POT through step 3 (fold, allocate, correct, mask) and, per unit, what `process_units` does before
    tuning: dense inputs and targets, bias correction."""
    from algorithms.pot import POT
    from ptsbench.toolkit.reconstruct import collect_inputs, correct_bias, make_units, unit_outputs

    model = copy.deepcopy(dense).eval()
    layers = find_prunable_layers(model)
    algo = POT(reconstruction={"lr": 1e-5, "bias_lr": 1e-4})
    ctx = PruneContext(calib=calib, device=torch.device("cpu"), seed=0, progress=False)
    teacher, counts, masks, carriers = algo.prune_and_correct(model, layers, target, ctx)
    units = {}
    for unit in make_units("layer", model, layers, carriers):
        if unit.name in names:
            inputs = collect_inputs(teacher, unit.name, calib, 64, ctx.device)
            targets = unit_outputs(teacher, unit, inputs)
            correct_bias(model, unit, inputs, targets)
            units[unit.name] = (unit, inputs, targets)
    sizes = {ly.name: ly.numel for ly in layers}
    return algo, model, units, masks, {n: counts[n] / sizes[n] for n in counts}


def compare_pot_unit(
    name: str, algo, model: nn.Module, units: dict, masks: dict, ref: ReferencePOTUnits
) -> str:
    import ptsbench.toolkit.reconstruct as reconstruct

    unit, inputs, targets = units[name]
    _, module, _, _ = ref.units[name]
    ref_mask = module.weight_fake_sparse.mask_tensor
    mask_differs = int((ref_mask.bool() != masks[name].bool()).sum())
    ours_weight, ours_bias = unit.module(model).parametrizations.weight.original, unit.bias(model)
    with torch.no_grad():  # the reference's unit takes ours: same weights, mask and bias
        module.weight.data = ours_weight.detach().clone()
        module.weight_fake_sparse.mask_tensor = masks[name].to(module.weight.dtype).clone()
        module.bias.data = ours_bias.detach().clone()
    saved = [ours_weight.detach().clone(), ours_bias.detach().clone()]

    steps, seed = 10, 7
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randint(len(inputs), (64,), generator=g) for _ in range(steps)]
    ours_losses: list[float] = []
    ref_losses: list[float] = []
    lp_loss = ref.advanced_pts.lp_loss
    order = iter(range(steps))

    def ref_loss(pred, target):
        loss = lp_loss(pred, target)
        ref_losses.append(float(loss.detach()))
        return loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reconstruct, "ensure_finite", lambda value, *_: ours_losses.append(value) or value)
        mp.setattr(ref.advanced_pts, "lp_loss", ref_loss)
        mp.setattr(ref.advanced_pts.np.random, "randint", lambda *_: next(order))
        tune_unit = reconstruct.tune_unit
        tune_unit(
            model,
            unit,
            inputs,
            targets,
            algo.recon.replace(iterations=steps),
            torch.Generator().manual_seed(seed),
        )
        ref.steps(name, steps, [[inputs[i]] for i in draws], [targets[i] for i in draws])
    assert ours_losses == pytest.approx(ref_losses, rel=1e-5)
    with torch.no_grad():  # ours back at the start for the timing
        ours_weight.copy_(saved[0])
        ours_bias.copy_(saved[1])

    n, rounds = 30, 3
    settings = algo.recon.replace(iterations=n)
    ours_t: list[float] = []
    ref_t: list[float] = []
    for r in range(rounds):
        best_round(lambda: ref.steps(name, n), ref_t)
        best_round(
            lambda r=r: tune_unit(model, unit, inputs, targets, settings, torch.Generator().manual_seed(r)),
            ours_t,
        )
    ours_s, ref_s = min(ours_t) / n, min(ref_t) / n
    return (
        f"{name} {tuple(ours_weight.shape)} on {tuple(inputs.shape[1:])}: ours {ours_s * 1e3:.2f} ms, "
        f"reference {ref_s * 1e3:.2f} ms, ratio {ours_s / ref_s:.3f}; losses 1st "
        f"{ours_losses[0]:.6g}/{ref_losses[0]:.6g}, 10th {ours_losses[-1]:.6g}/{ref_losses[-1]:.6g}; "
        f"the reference's own mask differs in {mask_differs} "
        f"of {ref_mask.numel()}"
    )


def test_pot_unit_steps_against_reference(reference_root, shipped_resnet18):
    """Adam steps of one POT reconstruction unit (a conv with its folded-BN bias, masked weight, loss summed
    over channels and averaged, backward, update, early-stop test): ours (`tune_unit`) against msbench's
    `subgraph_reconstruction`, for three resnet18 convolutions at POT's global-L2 allocation of 0.98.

    Numerics: the reference's own static masks from our rates are compared with ours (they differ only
    where tied |w| straddle the count: its threshold prunes every tie); then both start from our unit
    (weights, mask, bias copied into the reference's module) and take 10 steps on the same batches (ours
    drawn, the reference's np.random.randint stubbed to walk them in order): losses within 1e-5 relative.
    Then 30 steps, best of 3 rounds, each on its own batch sampling (ours 64 random images, the reference a
    random cached batch of 64).
    """
    dense, calib = shipped_resnet18
    torch.set_num_threads(1)
    algo, model, units, masks, rates = ours_pot_units(dense, calib, 0.98, POT_UNITS)
    ref = ReferencePOTUnits(reference_root, dense, rates, calib, POT_UNITS)
    lines = [compare_pot_unit(name, algo, model, units, masks, ref) for name in POT_UNITS]
    print(
        f"\nPOT unit steps, shipped resnet18 @56 px, batch 64, {torch.get_num_threads()} thread(s), "
        "per step:\n  "
        + "\n  ".join(lines)
    )


# ============================================================================================== UniPTS


class ReferenceUniPTS:
    """xjjxmu/UniPTS `main.py` and `trainer.py` with configs/resnet18.yaml and run_r18.sh's arguments
    (`--multigpu 0 --prune_rate P`), on our resnet18: its convolutions become the reference's
    SparseWeightConv (GetWeightSubnet: a sort of |w| and a fresh mask at every forward, dense STE with
    SR-STE decay 5e-5), its classifier applies the same GetWeightSubnet through F.linear (the reference's
    ResNets make the classifier a 1x1 SparseWeightConv on the pooled map, which timm's Linear head is).
    `fitness(rates, batches)` is its `fitness_function(search=False)`; `train_epoch(batches, epoch)` its
    `train`, set up as `main_worker` sets it up (DistillKL(T), get_optimizer, build_scheduler)."""

    def __init__(self, root: Path, dense: nn.Module, target: float, iterations_per_epoch: int):
        self.folders = [root / "UniPTS", root / "pydeps"]
        self.stubs = {
            "data": types.ModuleType("data")
        }  # its ImageNet loaders (h5py ...): we feed our batches
        argv = [
            "main.py",
            "--config",
            str(root / "UniPTS" / "configs" / "resnet18.yaml"),
            "--multigpu",
            "0",
            "--prune_rate",
            str(target),
        ]
        with self.code(), pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
            mp.setattr(sys, "argv", argv)  # its args module parses the command line on import
            self.main = importlib.import_module("main")
            self.trainer = importlib.import_module("trainer")
            from args import args
            from utils.conv_type import GetWeightSubnet, SparseWeightConv
            from utils.lr_scheduler import build_scheduler
            from utils.util import get_optimizer

        class SparseWeightLinear(nn.Linear):
            prune_rate = 0
            getSparsity = SparseWeightConv.getSparsity
            set_prune_rate = SparseWeightConv.set_prune_rate

            def forward(self, x):
                return nn.functional.linear(x, GetWeightSubnet.apply(self.weight, self.prune_rate), self.bias)

        self.args, self.subnet = args, GetWeightSubnet
        self.get_optimizer, self.build_scheduler = get_optimizer, build_scheduler
        self.net = copy.deepcopy(dense).train()
        for parent in list(self.net.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Conv2d:
                    new = SparseWeightConv(
                        child.in_channels,
                        child.out_channels,
                        child.kernel_size,
                        child.stride,
                        child.padding,
                        child.dilation,
                        child.groups,
                        child.bias is not None,
                    )
                elif type(child) is nn.Linear:
                    new = SparseWeightLinear(child.in_features, child.out_features, child.bias is not None)
                else:
                    continue
                new.weight, new.bias = child.weight, child.bias
                setattr(parent, name, new)
        self.teacher = copy.deepcopy(dense).train()  # main_worker's fp_model, in train mode
        self.logger = logging.getLogger("unipts-reference")
        self.iterations_per_epoch = iterations_per_epoch
        with self.code(), contextlib.redirect_stdout(io.StringIO()):
            self.main.init(self.net, self.logger)  # the regrow budget, a global its get_sparisity reads

    def code(self):
        return reference_code(self.folders, self.stubs)

    def layers(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.net.named_modules() if hasattr(m, "prune_rate")}

    def set_rates(self, rates: list[float]) -> None:
        for module, rate in zip(self.layers().values(), rates, strict=True):
            module.set_prune_rate(rate)

    def masks(self) -> dict[str, torch.Tensor]:
        """What each layer keeps: the nonzero entries of GetWeightSubnet's masked weight (an exactly zero
        weight is among the smallest |w|, pruned by both codes at these sparsities)."""
        with torch.no_grad():
            return {n: self.subnet.apply(m.weight, m.prune_rate) != 0 for n, m in self.layers().items()}

    def fitness(self, rates: list[float], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        with (
            self.code(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            return self.main.fitness_function(rates, self.net, batches, self.logger, search=False)

    def start_training(self, rates: list[float]) -> None:
        self.set_rates(rates)
        with self.code(), contextlib.redirect_stdout(io.StringIO()):
            self.criterion = self.main.DistillKL(self.args.T)
            self.optimizer = self.get_optimizer(self.args, self.net)
            self.lr_scheduler = self.build_scheduler(self.args, self.optimizer, self.iterations_per_epoch)

    def train_epoch(self, batches: list[tuple[torch.Tensor, torch.Tensor]], epoch: int) -> None:
        with (
            self.code(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            self.trainer.train(
                batches,
                self.net,
                self.criterion,
                self.optimizer,
                epoch,
                self.args,
                self.logger,
                self.teacher,
                self.lr_scheduler,
            )


def same_up_to_ties(weight: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Two keep-masks of one layer remove the same magnitudes: equal counts and the same sorted |w|
    removed, so they can differ only in which of several equal |w| they keep (ours by position, the
    reference's sort in whatever order it leaves ties)."""
    a = weight.detach().abs().reshape(-1)
    removed_ours, removed_theirs = a[~ours.reshape(-1).bool()], a[~theirs.reshape(-1).bool()]
    return removed_ours.numel() == removed_theirs.numel() and torch.equal(
        removed_ours.sort().values, removed_theirs.sort().values
    )


def test_unipts_fitness_and_epoch_against_reference(reference_root, shipped_resnet18):
    """UniPTS at 0.9 (0.98 + its delta 0.05 is refused) with the quick preset's fitness set (512 draws
    from the calibration set): one candidate's fitness (its masks on the pretrained weights, BatchNorm
    re-estimated in train mode with input noise, top-1 in eval mode on the same images) and one epoch of
    dynamic sparse training (16 batches of 64: teacher, student with masks recomputed from |w| at every
    forward, base-decayed KL, SGD), ours against the reference's fitness_function and train, on the same
    batches.

    Numerics: the candidate's masks (the same counts) remove the same magnitudes in every layer (they may
    differ among tied |w|: the shipped weights are fp16 values); the fitness values differ by design (ours
    re-estimates BatchNorm as exact averages, the reference as a momentum average) and are printed. The
    training's first two losses (both at lr 0) must agree within 1e-4 relative.
    """
    from algorithms.unipts.decoding import decode_genome
    from algorithms.unipts.dst import TrainSettings, attach_dynamic_masks, current_masks, distill_sparse
    from algorithms.unipts.objective import ObjectiveSettings
    from algorithms.unipts.search import CandidateProbe, draw_fitness_set, magnitude_rank
    from ptsbench.data import InMemoryImages

    dense, calib = shipped_resnet18
    torch.set_num_threads(1)
    target = 0.9
    ctx = PruneContext(calib=calib, device=torch.device("cpu"), seed=0, progress=False)
    model = copy.deepcopy(dense).to(memory_format=torch.channels_last)  # as UniPTS.prune runs it
    layers = find_prunable_layers(model)
    fitness_set = draw_fitness_set(calib, 512, torch.Generator().manual_seed(1))
    counts = decode_genome(
        torch.rand(len(layers), generator=torch.Generator().manual_seed(2)), layers, target, 0.05
    )
    rates = [(counts[ly.name] + 0.5) / ly.numel for ly in layers]  # int(rate * n) is the count
    ref = ReferenceUniPTS(reference_root, dense, target, len(calib) // 64)
    assert list(ref.layers()) == [ly.name for ly in layers]

    # --- one candidate's fitness
    fit_batches = [(x, y) for x, y in fitness_set.batches(64)]
    ref.set_rates(rates)
    theirs = ref.masks()
    untied = sum(
        not same_up_to_ties(ly.weight, magnitude_rank(ly.weight) >= counts[ly.name], theirs[ly.name])
        for ly in layers
    )
    assert untied == 0
    tie_differences = sum(
        int(((magnitude_rank(ly.weight) >= counts[ly.name]) != theirs[ly.name]).sum()) for ly in layers
    )
    ours_t: list[float] = []
    ref_t: list[float] = []
    with CandidateProbe(model, layers, fitness_set, 64, 1e-6, torch.Generator().manual_seed(3)) as probe:
        ours_fit = probe(counts)
        ref_fit = 100 * ref.fitness(rates, fit_batches)
        for _ in range(2):
            best_round(lambda: ref.fitness(rates, fit_batches), ref_t)
            best_round(lambda: probe(counts), ours_t)
    fit_ours, fit_ref = min(ours_t), min(ref_t)

    # --- dynamic sparse training: the same batches, in the same order, to both
    stream = iter(calib.batches(64, shuffle=True, generator=torch.Generator().manual_seed(4), drop_last=True))
    epoch_batches = [next(stream)[0] for _ in range(len(calib) // 64)]
    labels = torch.zeros(64, dtype=torch.long)
    teacher = copy.deepcopy(model).requires_grad_(False)
    attach_dynamic_masks(layers, counts, 5e-5)
    ours_masks = current_masks(layers)
    ref.start_training(rates)
    theirs = ref.masks()
    assert all(
        same_up_to_ties(ly.module.parametrizations.weight.original, ours_masks[ly.name], theirs[ly.name])
        for ly in layers
    )
    settings = TrainSettings(epochs=1, lr=0.01, weight_decay=1e-4, augment=False)
    objective = ObjectiveSettings()
    import algorithms.unipts.dst as dst

    def ours_epoch(batches: list[torch.Tensor], record: list[float] | None = None) -> None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dst, "shuffled_epoch", lambda *_: iter(batches))
            if record is not None:
                mp.setattr(dst, "ensure_finite", lambda value, *_: record.append(value) or value)
            data = InMemoryImages(torch.cat(batches), torch.zeros(64 * len(batches), dtype=torch.long))
            one_epoch = type(calib)(data, list(range(len(data))), 0)
            distill_sparse(
                model,
                teacher,
                layers,
                one_epoch,
                settings,
                objective,
                ctx,
                torch.Generator().manual_seed(5),
                torch.Generator().manual_seed(6),
            )

    ours_losses: list[float] = []
    ref_losses: list[float] = []
    criterion = ref.criterion

    def ref_loss(*args):
        loss = criterion(*args)
        ref_losses.append(float(loss.detach()))
        return loss

    ours_epoch(epoch_batches[:2], ours_losses)
    ref.criterion = ref_loss
    ref.train_epoch([(x, labels) for x in epoch_batches[:2]], 0)
    ref.criterion = criterion
    assert ours_losses == pytest.approx(ref_losses, rel=1e-4)
    ours_e: list[float] = []
    ref_e: list[float] = []
    for _ in range(2):
        best_round(lambda: ref.train_epoch([(x, labels) for x in epoch_batches], 0), ref_e)
        best_round(lambda: ours_epoch(epoch_batches), ours_e)
    ep_ours, ep_ref = min(ours_e), min(ref_e)
    print(
        f"\nUniPTS, shipped resnet18 @56 px at 0.9, {torch.get_num_threads()} thread(s): fitness of one "
        f"candidate (512 images) ours {fit_ours:.2f} s, reference {fit_ref:.2f} s, ratio "
        f"{fit_ours / fit_ref:.3f} (top-1 "
        f"{ours_fit:.2f} / {ref_fit:.2f}; masks remove the same magnitudes, {tie_differences} entries differ "
        f"among ties); one epoch of 16 batches ours {ep_ours:.2f} s, reference {ep_ref:.2f} s, ratio "
        f"{ep_ours / ep_ref:.3f} (first losses {ours_losses[0]:.6f}/{ref_losses[0]:.6f}, "
        f"{ours_losses[1]:.6f}/{ref_losses[1]:.6f})"
    )

"""Sparse checkpoints, resume, non-finite values, job folders, record files and atomic result files."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from ptsbench.checkpoint import read_compact_form, save_compact_form
from ptsbench.errors import CheckpointError, ConfigError, NonFiniteLossError, ensure_finite
from ptsbench.results import write_json
from ptsbench.runner import JobFailed, run_job
from ptsbench.toolkit.sparsity import find_prunable_layers


def test_save_sparse_reloads_with_same_sparsity_and_accuracy(tiny_cfg, tmp_path):
    record = run_job(tiny_cfg("sparsity=0.9", "algorithm.allocation=global", "save_sparse=true"), tmp_path)
    assert record["status"] == "ok"
    assert record["reload_top1"] == record["top1"]
    assert record["reload_achieved_sparsity"] == record["achieved_sparsity"]
    assert record["compact_checkpoint_bytes"] < record["checkpoint_bytes"] / 5
    state = load_file(str(tmp_path / "sparse_model.safetensors"))
    zeros = sum(int((v == 0).sum()) for k, v in state.items() if k.endswith(".weight") and v.ndim > 1)
    assert zeros >= record["zero_weights"]


def test_compact_form_round_trip_and_corruption(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        model[0].weight[torch.rand_like(model[0].weight) < 0.8] = 0
    path = tmp_path / "m.safetensors"
    save_compact_form(model, ["0.weight"], path)
    state = read_compact_form(path)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    dense = tmp_path / "d.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(dense))
    with pytest.raises(CheckpointError, match="not a ptsbench compact checkpoint"):
        read_compact_form(dense)


@pytest.mark.slow
def test_resume_skips_finished_identical_config(tiny_cfg, tmp_path):
    cfg = tiny_cfg("sparsity=0.6", "resume=true")
    first = run_job(cfg, tmp_path / "0", resume_dirs=[tmp_path])
    mtime = (tmp_path / "0" / "result.json").stat().st_mtime_ns
    again = run_job(cfg, tmp_path / "1", resume_dirs=[tmp_path])
    assert again.get("skipped") is True and again["config_hash"] == first["config_hash"]
    assert not (tmp_path / "1" / "result.json").exists()
    assert (tmp_path / "0" / "result.json").stat().st_mtime_ns == mtime
    other = run_job(tiny_cfg("sparsity=0.7", "resume=true"), tmp_path / "2", resume_dirs=[tmp_path])
    assert not other.get("skipped") and (tmp_path / "2" / "result.json").exists()


@pytest.mark.slow
def test_resume_skips_a_config_the_committed_study_holds(tiny_cfg, tmp_path):
    from ptsbench.analysis.study import collect

    first = run_job(tiny_cfg("sparsity=0.6"), tmp_path / "runs" / "a")
    collect([tmp_path / "runs"], tmp_path / "study")
    (tmp_path / "runs" / "a" / "result.json").unlink()  # a fresh clone: only the collected study is left
    cfg = tiny_cfg("sparsity=0.6", "resume=true", f"resume_studies=[{tmp_path / 'study'}]")
    again = run_job(cfg, tmp_path / "fresh" / "a", resume_dirs=[tmp_path / "fresh"])
    assert again.get("skipped") is True and again["config_hash"] == first["config_hash"]
    assert again["top1"] == first["top1"] and not (tmp_path / "fresh" / "a").exists()
    other = run_job(tiny_cfg("sparsity=0.7", "resume=true", f"resume_studies=[{tmp_path / 'study'}]"),
                    tmp_path / "fresh" / "b", resume_dirs=[tmp_path / "fresh"])
    assert not other.get("skipped") and other["status"] == "ok"
    assert other["config_hash"] == run_job(tiny_cfg("sparsity=0.7", "resume=true"), tmp_path / "fresh" / "b",
                                           resume_dirs=[tmp_path / "fresh"])["config_hash"]  # not in the hash
    with pytest.raises(JobFailed, match="resume_studies: .* holds no records.jsonl"):
        run_job(tiny_cfg("sparsity=0.8", "resume=true", f"resume_studies=[{tmp_path / 'nowhere'}]"),
                tmp_path / "fresh" / "c")


def test_non_finite_loss_stops():
    assert ensure_finite(1.5, "loss") == 1.5
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 3"):
        ensure_finite(float("nan"), "loss", 3)
    with pytest.raises(NonFiniteLossError, match="inf"):
        ensure_finite(float("inf"), "loss")


def test_result_files_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json(path, {"status": "ok", "top1": 90.0})

    def broken_replace(src, dst):
        raise KeyboardInterrupt  # an interrupt between write and rename

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"status": "ok", "top1": 10.0})
    monkeypatch.undo()
    assert json.loads(path.read_text())["top1"] == 90.0  # the old record is intact
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left behind


def test_paths_never_leave_their_root(tmp_path):
    from ptsbench.errors import ConfigError
    from ptsbench.paths import safe_child, safe_subdir

    root = tmp_path / "cache"
    assert safe_subdir(root, "dense").is_dir()
    assert safe_child(root, "dense", "m.safetensors") == root / "dense" / "m.safetensors"
    with pytest.raises(ConfigError, match="would leave"):
        safe_child(root, "../escape")
    with pytest.raises(ConfigError, match="would leave"):
        safe_child(root, "/etc")
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside"):
        safe_child(root, "link", "file")


def test_presparse_checkpoint_is_the_allocations_floor_and_reported(tiny_dense, tiny_cfg, tmp_path):
    """Uniform 0.5 on a checkpoint whose layer1.0.conv1 is already 80% zeros: those zeros are that layer's
    floor (no miss of the method's), and the record says how many there were and where."""
    from ptsbench.models import save_state

    model = copy.deepcopy(tiny_dense[0])
    weight = model.get_submodule("layer1.0.conv1").weight
    with torch.no_grad():
        weight[torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) < 0.8] = 0
    zeros = int((weight == 0).sum())
    save_state(model, tmp_path / "presparse.safetensors")
    record = run_job(tiny_cfg(f"model.checkpoint={tmp_path / 'presparse.safetensors'}", "sparsity=0.5"),
                     tmp_path / "0")
    assert record["status"] == "ok" and record["error"] is None
    # the shipped fp16 weights hold a few zeros already, in other layers
    before = {ly.name: int((ly.weight == 0).sum()) for ly in find_prunable_layers(tiny_dense[0])}
    before = {name: count for name, count in before.items() if count} | {"layer1.0.conv1": zeros}
    assert record["dense_zero_weights"] == sum(before.values())
    assert dict(record["dense_zero_layers"]) == before
    assert record["achieved_sparsity"] > 0.5  # reported as achieved, above the target by those zeros


def test_shipped_checkpoint_at_sparsity_zero_is_the_dense_control(tiny_cfg, tmp_path):
    """The shipped fp16 resnet18 holds 4 exact zeros (2 in layer4.1.conv1): sparsity=0 is the dense
    control."""
    shipped = "model.checkpoint=pkg:ptsbench/zoo/resnet18-fashion_mnist.safetensors"
    record = run_job(tiny_cfg(shipped, "sparsity=0"), tmp_path / "control")
    assert record["status"] == "ok" and record["top1"] == record["dense_top1"]
    assert record["dense_zero_weights"] == 4 and ["layer4.1.conv1", 2] in record["dense_zero_layers"]


def test_missed_target_is_flagged_in_the_sweep(tiny_cfg, tmp_path, monkeypatch):
    """A method that hands back fewer zeros than it allocated ends target_missed, never ok; the aggregate
    flags it and the sweep exits non-zero."""
    from omegaconf import OmegaConf

    from algorithms.magnitude import MagnitudePruning
    from ptsbench.callbacks import AggregateResults

    real_prune = MagnitudePruning.prune

    def prune_then_regrow(self, model, layers, target, ctx):
        result = real_prune(self, model, layers, target, ctx)
        with torch.no_grad():
            result.model.get_submodule("layer1.0.conv1").weight.add_(1e-3)  # every pruned weight back
        return result

    monkeypatch.setattr(MagnitudePruning, "prune", prune_then_regrow)
    sweep = tmp_path / "sweep"
    record = run_job(tiny_cfg("sparsity=0.5"), sweep / "0")
    assert record["status"] == "target_missed"
    assert "layers layer1.0.conv1 have fewer zeros than their allocation" in record["error"]
    assert "below the target 0.5" in record["error"]
    assert json.loads((sweep / "0" / "result.json").read_text())["status"] == "target_missed"
    with pytest.raises(SystemExit) as exit_info:
        AggregateResults().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert exit_info.value.code == 1
    markdown = (sweep / "results.md").read_text()
    assert "1 jobs missed their sparsity target" in markdown and \
        "**target_missed**: Target missed" in markdown
    assert "target_missed" in (sweep / "results.csv").read_text()


def test_target_check_counts_zeros_per_layer_and_globally():
    from ptsbench.audit import audit_model, target_missed
    from ptsbench.toolkit.sparsity import find_prunable_layers

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    layers = find_prunable_layers(model)
    with torch.no_grad():
        model[0].weight.view(-1)[:32] = 0
        model[1].weight.view(-1)[:16] = 0
    plan = {"0": 0.5, "1": 0.5}
    assert target_missed(audit_model(model, layers, 0.5, plan), {}) is None
    with torch.no_grad():
        model[1].weight.view(-1)[:16] = 1.0  # the method's own count would still say 16: the audit does not
    message = target_missed(audit_model(model, layers, 0.5, plan), {})
    assert message is not None and "layers 1 have fewer zeros than their allocation" in message
    assert "16 weights below the target 0.5 (tolerance: 2 weights" in message
    with torch.no_grad():
        model[1].weight.view(-1)[:24] = 0  # 8 more zeros than the 16 allocated
    assert target_missed(audit_model(model, layers, 0.5, plan), {"1": 24}) is None  # dense zeros: the floor
    message = target_missed(audit_model(model, layers, 0.5, plan), {"1": 20})
    assert "layers 1 have more zeros than their allocation" in message
    assert "4 weights above the target 0.5 beyond the 4 zeros the dense weights already held" in message


def test_corrupt_dense_cache_entry_is_retrained(tmp_path, require_fmnist, caplog):
    from ptsbench.dense import build_model, load_data, load_dense_weights
    from tests.conftest import compose_config

    cfg = compose_config(["model.checkpoint=null", "data.limit_train=128", "data.limit_test=64",
                          "train.epochs=1", "progress=false", "model.train_overrides={}"], cache_dir=tmp_path)
    data = load_data(cfg, tmp_path)
    first = load_dense_weights(cfg, build_model(cfg, data), data, tmp_path, torch.device("cpu"),
                               progress=False)
    weights = tmp_path / "dense" / f"{first.key}.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a crash mid-write on another machine
    model = build_model(cfg, data)
    with caplog.at_level("WARNING"):
        again = load_dense_weights(cfg, model, data, tmp_path, torch.device("cpu"), progress=False)
    assert "is unreadable, retraining it" in caplog.text
    assert again.info["train_seconds"] > 0 and load_file(str(weights))  # retrained and cached again
    assert again.top1 == first.top1  # same recipe, same seed


def test_compact_checkpoint_loads_as_model_checkpoint(tmp_path, require_fmnist):
    from ptsbench.dense import build_model, load_data
    from ptsbench.models import load_checkpoint
    from tests.conftest import compose_config

    cfg = compose_config(["data.limit_train=64", "data.limit_test=64"], cache_dir=tmp_path)
    data = load_data(cfg, tmp_path)
    sparse = build_model(cfg, data)
    with torch.no_grad():
        sparse.fc.weight[sparse.fc.weight.abs() < sparse.fc.weight.abs().median()] = 0
    path = tmp_path / "sparse_model.compact.safetensors"
    save_compact_form(sparse, ["fc.weight"], path)
    cfg.model.checkpoint = str(path)
    fresh = build_model(cfg, data)
    torch.nn.init.zeros_(fresh.fc.weight)
    load_checkpoint(fresh, cfg.model)
    for key, value in sparse.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_empty_evaluation_set_is_an_error(tiny_cfg, tmp_path, monkeypatch):
    import ptsbench.runner as runner

    real_load = runner.load_data

    def without_test_images(cfg, cache_dir):
        data = real_load(cfg, cache_dir)
        data.test = data.test.subset(torch.arange(0))
        return data

    monkeypatch.setattr(runner, "load_data", without_test_images)
    with pytest.raises(JobFailed,
                       match=r"The evaluation set of data=fashion_mnist is empty.*data.limit_test"):
        run_job(tiny_cfg(), tmp_path)


def _checkpoint_with(tiny_dense, path, change) -> str:
    """The tiny dense model's state dict, changed by `change(state)`, written as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in tiny_dense[0].state_dict().items()}
    change(state)
    save_file(state, str(path))
    return str(path)


def _set(key, index, value):
    def change(state):
        state[key].view(-1)[index] = value
    return change


def _to_int8(key):
    def change(state):
        state[key] = state[key].mul(100).round().to(torch.int8)
    return change


@pytest.mark.parametrize("change,match", [
    (_set("layer1.0.conv1.weight", 7, float("nan")),
     r"NaN or infinite values in 1 tensor\(s\): layer1.0.conv1.weight \(1 NaN\)"),
    (_set("bn1.running_var", 3, float("inf")), r"bn1.running_var \(1 inf\)"),
    (_set("fc.weight", 0, float("-inf")), r"fc.weight \(1 inf\)"),
    (_to_int8("fc.weight"), r"non-float tensors .*: fc.weight \(torch.int8\)"),
], ids=["nan-conv", "inf-running-var", "inf-classifier", "int8-classifier"])
def test_non_finite_or_integer_checkpoint_is_refused_before_pruning(tiny_dense, tiny_cfg, tmp_path, change,
                                                                    match):
    checkpoint = _checkpoint_with(tiny_dense, tmp_path / "bad.safetensors", change)
    with pytest.raises(JobFailed, match=match):
        run_job(tiny_cfg(f"model.checkpoint={checkpoint}", "algorithm=sparsegpt"), tmp_path / "job")
    saved = json.loads((tmp_path / "job" / "result.json").read_text())
    assert saved["status"] == "failed" and "traceback" not in saved and "CheckpointError" in saved["error"]
    assert not (tmp_path / "job" / "allocation.csv").exists()  # nothing was pruned


def test_non_finite_output_in_evaluation_names_the_module(tiny_dense, tiny_cfg, tmp_path):
    """A finite but impossible statistic (a negative running variance) gives NaN activations."""
    negative = _set("layer2.0.bn1.running_var", 0, -1.0)
    checkpoint = _checkpoint_with(tiny_dense, tmp_path / "negvar.safetensors", negative)
    with pytest.raises(JobFailed, match=r"Evaluating the dense model resnet18: the logits of evaluation "
                                         r"batch 0 .*first module with a non-finite output is layer2.0.bn1 "
                                         r"\(BatchNorm2d\)"):
        run_job(tiny_cfg(f"model.checkpoint={checkpoint}"), tmp_path / "job")
    assert json.loads((tmp_path / "job" / "result.json").read_text())["status"] == "failed"


def test_non_finite_weight_after_pruning_fails_naming_the_layer(tiny_cfg, tmp_path, monkeypatch):
    from algorithms.magnitude import MagnitudePruning

    real_prune = MagnitudePruning.prune

    def prune_then_break(self, model, layers, target, ctx):
        result = real_prune(self, model, layers, target, ctx)
        with torch.no_grad():
            result.model.get_submodule("layer3.1.conv2").weight.view(-1)[5] = float("nan")
        return result

    monkeypatch.setattr(MagnitudePruning, "prune", prune_then_break)
    with pytest.raises(JobFailed, match=r"After the pruning step of magnitude-uniform, the model holds NaN "
                                         r"or inf in 1 tensor\(s\): layer3.1.conv2.weight \(1 NaN\)"):
        run_job(tiny_cfg("sparsity=0.5"), tmp_path / "job")
    saved = json.loads((tmp_path / "job" / "result.json").read_text())
    assert saved["status"] == "failed" and saved.get("top1") is None


@pytest.mark.parametrize("resume", ["true", "false"])
def test_bad_resume_studies_fail_inside_the_record_whatever_resume_says(tiny_cfg, tmp_path, resume):
    from omegaconf import OmegaConf

    from ptsbench.callbacks import AggregateResults

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "records.jsonl").write_text('{"config_hash": "abc", "status": "ok"}\n{"config_hash": "de\n')
    sweep = tmp_path / "sweep"
    for sub, study, match in (("0", tmp_path / "nowhere", r"resume_studies: '.*nowhere' holds no records"),
                              ("1", damaged, r"resume_studies: .*damaged/records.jsonl line 2 is not JSON")):
        with pytest.raises(JobFailed, match=match):
            run_job(tiny_cfg(f"resume={resume}", f"resume_studies=[{study}]"), sweep / sub,
                    resume_dirs=[sweep])
        saved = json.loads((sweep / sub / "result.json").read_text())
        assert saved["status"] == "failed" and "traceback" not in saved
        assert saved["method"] == "magnitude-uniform"
    with pytest.raises(SystemExit):  # the sweep's aggregate is still written, with both failures
        AggregateResults().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    table = (sweep / "results.csv").read_text()
    assert "holds no records.jsonl" in table and "line 2 is not JSON" in table


def _record(method, status="ok", top1=80.0):
    return {"model": "resnet18", "dataset": "fashion_mnist", "method": method, "algorithm": "magnitude",
            "target_sparsity": 0.5, "achieved_sparsity": 0.5, "seed": 0, "status": status, "top1": top1,
            "dense_top1": 90.0, "calib_images": 128, "prune_seconds": 1.0,
            "config_hash": f"h{method}{status}"}


def test_report_names_unreadable_records_and_exits_nonzero(tmp_path, capsys):
    from ptsbench.analysis.report import main as report_main

    study = tmp_path / "study"
    study.mkdir()
    (study / "records.jsonl").write_text(json.dumps(_record("magnitude-erk")) + "\n[1, 2]\n{broken\n")
    assert report_main([str(study), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "records.jsonl line 2 is not a record (a JSON object) but list" in err
    assert "records.jsonl line 3 is not JSON" in err and "2 records could not be read" in err
    assert "**2 records could not be read**" in (tmp_path / "out" / "results.md").read_text()
    assert "magnitude-erk" in (tmp_path / "out" / "results.md").read_text()  # the readable one is reported

    only = tmp_path / "runs" / "0"
    only.mkdir(parents=True)
    (only / "result.json").write_text("\x00\x01 not json")
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "out2")]) == 1
    assert "runs/0/result.json is not a readable result record" in capsys.readouterr().err


def test_report_method_filter_takes_records_without_a_method(tmp_path, capsys):
    from ptsbench.analysis.report import main as report_main

    for name, record in (("a", _record(None, status="failed")), ("b", _record("magnitude-uniform")),
                         ("c", _record("wanda-uniform"))):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "result.json").write_text(json.dumps(record))
    runs = str(tmp_path / "runs")
    assert report_main([runs, "--methods", "magnitude*", "--out", str(tmp_path / "out")]) == 0
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and "magnitude-uniform" in rows[1]
    assert report_main([runs, "--methods", "nothing*", "--out", str(tmp_path / "none")]) == 1
    assert "no result.json files matching" in capsys.readouterr().err


@pytest.mark.slow
def test_a_job_folder_holds_one_job(tiny_cfg, tmp_path):
    from ptsbench.errors import FolderTaken

    folder = tmp_path / "job"
    first = run_job(tiny_cfg("sparsity=0.5"), folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert json.loads(files["job_identity.json"])["config_hash"] == first["config_hash"]
    with pytest.raises(FolderTaken, match=rf"belongs to another job \(config hash {first['config_hash']};"):
        run_job(tiny_cfg("sparsity=0.7"), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == files  # nothing touched
    again = run_job(tiny_cfg("sparsity=0.5", "progress=true"), folder)  # the same job: progress is not in it
    assert again["status"] == "ok" and again["config_hash"] == first["config_hash"]
    legacy = tmp_path / "legacy"  # a folder from before identity files: its result.json names its job
    run_job(tiny_cfg("sparsity=0.5"), legacy)
    (legacy / "job_identity.json").unlink()
    with pytest.raises(FolderTaken):
        run_job(tiny_cfg("sparsity=0.6"), legacy)


def _with_hydra(overrides, cache_dir):
    """The full config Hydra's launcher resolves a job's folders from (its `hydra` node included)."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF, TINY

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"cache_dir={cache_dir}", *overrides],
                       return_hydra_config=True)


@pytest.mark.slow
def test_numbered_sweep_reordered_finds_its_finished_jobs(cache_dir, require_fmnist, tmp_path):
    """Hydra's sweep folder of a job is found by what the job is (config hash), as Hydra resolves it for the
    launcher: rerunning sparsity=0.5,0.7 as 0.6,0.5,0.7 skips both finished jobs and overwrites neither."""
    from omegaconf import OmegaConf, open_dict

    import ptsbench.cli  # noqa: F401  (registers the ptsbench.* resolvers, as the entry point does)

    sweep = tmp_path / "sweep"

    def launch(num, *overrides):
        cfg = _with_hydra([*overrides, f"hydra.sweep.dir={sweep}"], cache_dir)
        with open_dict(cfg):
            cfg.hydra.job.num = num
        sub = OmegaConf.select(cfg, "hydra.sweep.subdir")
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(sweep / sub)
        provenance = OmegaConf.select(cfg, "hydra.output_subdir")  # before the job runs, as Hydra does
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        return sub, run_job(task, sweep / sub, resume_dirs=[sweep]), provenance

    assert [launch(0, "sparsity=0.5")[0], launch(1, "sparsity=0.7")[0]] == ["0", "1"]
    finished = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    sub, record, provenance = launch(0, "sparsity=0.6", "resume=true")
    assert sub == f"0-{record['config_hash'][:8]}" and record["status"] == "ok" and provenance == ".hydra"
    for num, sparsity, where in ((1, 0.5, "0"), (2, 0.7, "1")):
        sub, record, provenance = launch(num, f"sparsity={sparsity}", "resume=true")
        assert (sub, record.get("skipped"), provenance) == (where, True, None)  # no .hydra rewritten either
    assert {p: p.read_bytes() for p in finished} == finished


def test_run_folder_errors_are_one_paragraph_before_hydra_writes(cache_dir, require_fmnist, tmp_path, capsys,
                                                                 monkeypatch):
    import errno

    from ptsbench.callbacks import JobFolders

    (tmp_path / "a_file").write_text("")
    cases = [(str(tmp_path / "a_file"), r"a file, not a folder, is already at that path"),
             (str(tmp_path / "a_file" / "sub"), r"a file, not a folder, is in the way on that path"),
             (str(tmp_path / ("x" * 300)), r"a name on that path is longer than the file system allows")]
    for run_dir, match in cases:
        with pytest.raises(SystemExit) as stop:
            JobFolders().on_run_start(_with_hydra([f"hydra.run.dir={run_dir}"], cache_dir))
        assert stop.value.code == 1
        err = capsys.readouterr().err
        assert re.search(rf"^ptsbench: hydra.run.dir='.*' cannot hold the job's files: {match}", err)
    with pytest.raises(SystemExit):
        JobFolders().on_multirun_start(_with_hydra([f"hydra.sweep.dir={tmp_path / 'a_file'}"], cache_dir))
    assert "hydra.sweep.dir=" in capsys.readouterr().err

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SystemExit):
        JobFolders().on_run_start(_with_hydra([f"hydra.run.dir={tmp_path / 'full'}"], cache_dir))
    assert "cannot hold the job's files: the disk is full (No space left" in capsys.readouterr().err
    monkeypatch.undo()

    JobFolders().on_run_start(_with_hydra(["sparsity=0.5", f"hydra.run.dir={tmp_path / 'run'}"], cache_dir))
    assert (tmp_path / "run" / "job_identity.json").is_file()  # claimed before Hydra writes anything there
    JobFolders().on_run_start(_with_hydra(["sparsity=0.5", f"hydra.run.dir={tmp_path / 'run'}"], cache_dir))
    with pytest.raises(SystemExit):
        JobFolders().on_run_start(_with_hydra(["sparsity=0.9", f"hydra.run.dir={tmp_path / 'run'}"],
                                              cache_dir))
    assert "hydra.run.dir=" in (err := capsys.readouterr().err) and "already belongs to another job" in err


def test_budget_far_above_the_reference_is_refused_with_the_work_it_asks(tiny_cfg, tmp_path):
    from ptsbench.jobspec import BudgetSpec, check_budget
    from ptsbench.runner import build_algorithm, config_hash

    with pytest.raises(JobFailed, match=r"algorithm.budget=1000000000.0 asks fcpts for 64,000,000,000 "
                                         r"optimisation iterations \(reference: 1,600\): 40,000,000 times "
                                         r"its reference budget, above max_budget=10\. Lower "
                                         r"algorithm.budget"):
        run_job(tiny_cfg("algorithm=fcpts_quick", "algorithm.budget=1e9"), tmp_path / "fcpts")
    assert not (tmp_path / "fcpts" / "calib_indices.json").exists()  # refused before any work
    with pytest.raises(JobFailed, match=r"asks unipts for 25,000 search generations of 8 candidates"):
        run_job(tiny_cfg("algorithm=unipts_quick", "algorithm.budget=5000"), tmp_path / "unipts")
    with pytest.raises(JobFailed, match=r"asks pot for 2e\+302 calibration steps per layer .*: 1e\+298"):
        run_job(tiny_cfg("algorithm=pot_quick", "algorithm.budget=1e300"), tmp_path / "pot")
    with pytest.raises(JobFailed, match=r"algorithm.budget=1e\+307 times the preset's 200 steps is not a"):
        run_job(tiny_cfg("algorithm=pot_quick", "algorithm.budget=1e307"), tmp_path / "pot_inf")
    allowed = tiny_cfg("algorithm=pot_quick", "algorithm.budget=150", "max_budget=2")  # 30,000 steps: 1.5x
    check_budget(build_algorithm(allowed), BudgetSpec.from_config(allowed))
    assert config_hash(allowed) == config_hash(tiny_cfg("algorithm=pot_quick", "algorithm.budget=150"))
    with pytest.raises(ConfigError, match=r"30,000 calibration steps per layer \(reference: 20,000\): 1.5 "
                                          r"times .* set max_budget=2 to run it as asked"):
        tight = tiny_cfg("algorithm=pot_quick", "algorithm.budget=150", "max_budget=1")
        check_budget(build_algorithm(tight), BudgetSpec.from_config(tight))

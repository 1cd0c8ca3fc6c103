"""The named random streams: every stream used is registered, the legacy ones draw what they always drew,
and different names draw differently."""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
from pathlib import Path

import pytest
import torch

from algorithms.base import PruneContext
from algorithms.fcpts import method as fcpts
from algorithms.unipts import method as unipts
from ptsbench.results import load_records
from ptsbench.streams import RNG_SCHEME_VERSION, STREAMS, stream_seed
from ptsbench.toolkit import reconstruct

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "algorithms").rglob("*.py")) + sorted((ROOT / "ptsbench").rglob("*.py"))
STREAM_CALLS = {"generator", "stream_seed", "stream_generator", "stream"}  # first argument: a stream name
FORWARDERS = {"ptsbench/streams.py", "algorithms/base.py"}  # pass their caller's name argument on
SEEDING_CALLS = {"manual_seed", "manual_seed_all", "seed"}  # must seed from a named stream

# How the streams were seeded before they had names: the offsets of the old ctx.generator(int) form ...
LEGACY_OFFSETS = {
    fcpts.DATA_STREAM: 1, fcpts.RNG_STREAM: 2, fcpts.AUGMENT_STREAM: 3,
    reconstruct.RECONSTRUCTION_STREAM: 31,
    unipts.STREAM_GENOME: 101, unipts.STREAM_FITNESS_SET: 102, unipts.STREAM_BN_NOISE: 103,
    unipts.STREAM_SHUFFLE: 104, unipts.STREAM_AUGMENT: 105,
}
# ... the labels of its hashed string form ...
LEGACY_LABELS = {"random.scores": "random scores"}
# ... and the seeds used as they are (calib.seed, train.seed, the job seed).
LEGACY_IDENTITY = {"calib.draw", "dense.init", "dense.train", "dense.train.torch", "job.torch"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def called(node: ast.Call) -> str | None:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def stream_names(path: Path) -> list[tuple[int, object]]:
    """(line, the stream name each call site passes, resolved through the module's constants)."""
    module = None
    found = []
    forwards = str(path.relative_to(ROOT)) in FORWARDERS
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and called(node) in STREAM_CALLS and node.args):
            continue
        arg = node.args[0]
        if isinstance(arg, ast.Constant):
            found.append((node.lineno, arg.value))
        elif isinstance(arg, ast.Name) and arg.id.isupper():  # a module constant, maybe imported
            module = module or importlib.import_module(module_name(path))
            found.append((node.lineno, getattr(module, arg.id)))
        elif not (forwards and isinstance(arg, ast.Name) and arg.id == "name"):
            found.append((node.lineno, ast.unparse(arg)))
    return found


def test_every_stream_used_is_registered_and_every_registered_stream_is_used():
    used, bad = set(), []
    for path in SOURCES:
        for line, name in stream_names(path):
            used.add(name)
            if name not in STREAMS:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name!r}")
    assert not bad, f"Call sites pass unregistered stream names (register them in ptsbench/streams.py): {bad}"
    assert used == set(STREAMS), f"registered but never used: {sorted(set(STREAMS) - used)}"


def test_every_seeding_call_seeds_from_a_named_stream():
    """torch.manual_seed(...) and generator.manual_seed(...) take their seed from a registered stream."""
    bad = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and called(node) in SEEDING_CALLS):
                continue
            inner = [n for arg in node.args for n in ast.walk(arg)
                     if isinstance(n, ast.Call) and called(n) in STREAM_CALLS]
            if not inner:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, f"Seeded outside the named streams (ptsbench/streams.py): {bad}"


def test_the_table_says_how_the_legacy_streams_were_seeded():
    assert set(LEGACY_OFFSETS) | set(LEGACY_LABELS) | LEGACY_IDENTITY == set(STREAMS)
    assert all(STREAMS[name].rule == "offset" and STREAMS[name].seed_key == "seed" for name in LEGACY_OFFSETS)
    assert all(STREAMS[name].rule == "identity" for name in LEGACY_IDENTITY)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_legacy_streams_draw_what_they_always_drew(seed):
    ctx = PruneContext(calib=None, device=torch.device("cpu"), seed=seed)
    draw = lambda g: torch.rand(8, generator=g)  # noqa: E731
    for name, offset in LEGACY_OFFSETS.items():
        old = torch.Generator().manual_seed(seed * 1_000_003 + offset)
        assert torch.equal(draw(ctx.generator(name)), draw(old)), name
    for name, label in LEGACY_LABELS.items():
        digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
        old = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
        assert torch.equal(draw(ctx.generator(name)), draw(old)), name
    for name in LEGACY_IDENTITY:
        assert stream_seed(name, seed) == seed, name


def test_a_new_stream_hashes_its_own_name():
    from ptsbench.streams import Stream

    new = Stream("example.new", "seed", "hashed", "a stream added after streams-v1")
    digest = hashlib.sha256(b"5:example.new").digest()
    assert new.seed_from(5) == int.from_bytes(digest[:8], "big") >> 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streams_are_independent(seed):
    ctx = PruneContext(calib=None, device=torch.device("cpu"), seed=seed)
    other = PruneContext(calib=None, device=torch.device("cpu"), seed=seed + 1)
    job_streams = [name for name, s in STREAMS.items() if s.seed_key == "seed"]
    draws = {name: torch.rand(16, generator=ctx.generator(name)) for name in job_streams}
    for i, a in enumerate(job_streams):
        assert torch.equal(draws[a], torch.rand(16, generator=ctx.generator(a)))  # seeded: the same again
        assert not torch.equal(draws[a], torch.rand(16, generator=other.generator(a)))  # another seed
        for b in job_streams[i + 1:]:
            assert not torch.equal(draws[a], draws[b]), (a, b)


def test_unknown_names_ints_and_harness_streams_are_refused():
    ctx = PruneContext(calib=None, device=torch.device("cpu"), seed=0)
    with pytest.raises(ValueError,
                       match=r"'reconstruction' is not a registered random stream.*ptsbench/streams.py"):
        ctx.generator("reconstruction")
    with pytest.raises(ValueError, match="31 is not a registered random stream"):
        ctx.generator(31)
    with pytest.raises(ValueError, match="seeded from calib.seed, not the job seed"):
        ctx.generator("calib.draw")


def test_records_carry_the_scheme_outside_the_job_identity(tiny_cfg, tmp_path):
    from ptsbench.jobspec import JobIdentity
    from ptsbench.record import JobRecord
    from ptsbench.runner import config_hash

    cfg = tiny_cfg()
    record = JobRecord(JobIdentity.from_config(cfg), None)
    assert record["rng_scheme"] == RNG_SCHEME_VERSION
    assert record["config_hash"] == config_hash(cfg) and "rng_scheme" not in cfg
    # records written before the field still load, next to new ones
    for name, rec in (("old", {"model": "resnet18", "status": "ok", "top1": 80.0}),
                      ("new", {"model": "resnet18", "status": "ok", "top1": 81.0,
                               "rng_scheme": RNG_SCHEME_VERSION})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(rec))
    table = load_records([tmp_path]).sort_values("top1")
    assert list(table["top1"]) == [80.0, 81.0]
    assert table["rng_scheme"].isna().tolist() == [True, False]

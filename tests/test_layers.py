"""The three layers of the tree, and who may import whom (ast, every import including those inside
functions): the toolkit methods may use, the job path, the analysis. No cycles."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What a method may import beside the contract: the toolkit package (the shared mechanics of pruning: masks,
# scores, allocations, patterns, BN, layer-wise calibration, reconstruction, refinement, distillation; a
# module added to it or to its registries needs no entry here) and, shared with the job path, the
# calibration set (data, with its file checks in paths), top-1 (evaluate, UniPTS's fitness), the training
# step (train), the named random streams, the settings base and the errors.
TOOLKIT_PACKAGES = ("ptsbench.toolkit",)
SHARED = {f"ptsbench.{m}" for m in ("errors", "settings", "data", "evaluate", "train", "paths", "streams")}
# the method interface, the layer-wise one-shot base and the score-then-allocation base
CONTRACT = {"algorithms.base", "algorithms.oneshot", "algorithms.scored"}
ANALYSIS_PREFIXES = ("ptsbench.analysis",)
CALLBACK = "ptsbench.callbacks"  # the end-of-sweep aggregation: the one door from the job path to analysis


def modules() -> dict[str, Path]:
    found = {}
    for path in [*ROOT.glob("ptsbench/**/*.py"), *ROOT.glob("algorithms/**/*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def in_toolkit(name: str) -> bool:
    return name in SHARED or any(name == p or name.startswith(f"{p}.") for p in TOOLKIT_PACKAGES)


def is_analysis(name: str) -> bool:
    return name.startswith(ANALYSIS_PREFIXES)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(modules()):
        if name not in state:
            visit(name, [name])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_imports_follow_the_layers():
    graph = import_graph()
    wrong = []
    for name, targets in graph.items():
        for target in targets:
            if name.startswith("algorithms."):
                package = name.rsplit(".", 1)[0]  # a method's own package (algorithms.fcpts.*)
                own = target.startswith(f"{name}.") or (package != "algorithms"
                                                         and target.startswith(package))
                allowed = in_toolkit(target) or target in CONTRACT or own
                if not allowed:
                    wrong.append(f"method {name} imports {target}")
            elif in_toolkit(name) and not in_toolkit(target):
                wrong.append(f"toolkit {name} imports {target}")
            elif not is_analysis(name) and name != CALLBACK and is_analysis(target):
                wrong.append(f"job path {name} imports analysis {target}")
    assert not wrong, wrong


def test_the_checker_sees_imports_inside_functions(tmp_path):
    tree = ast.parse("def f():\n    from ptsbench.cli import main\n")
    found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found == ["ptsbench.cli"]


def test_an_analysis_command_composes_configs_in_a_fresh_interpreter():
    """compose_job_config registers the schema itself: a command that never imports the cli still composes."""
    import subprocess
    import sys

    code = ("from ptsbench.config import compose_job_config; "
            "print(compose_job_config(['model=vit_tiny']).model.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "vit_tiny_patch16_224", out.stderr[-500:]

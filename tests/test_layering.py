"""The package imports only downward: its import graph has no cycle, and every module imports
alone, first, in a fresh interpreter.

A cycle papered over by an import inside a function works in one import order and breaks in
another, so the graph counts every import (module level or in a function body).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ctrl_ray

PACKAGE = Path(ctrl_ray.__file__).parent

IMPORT_ALONE = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "ctrl_ray" or m.startswith("ctrl_ray.")]:
        del sys.modules[loaded]  # third-party modules stay loaded: only the order of ours counts
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ":\\n" + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def module_names() -> list[str]:
    """Every module of the package, dotted (a package by its own name)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def module_path(name: str) -> Path:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(name: str, modules: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source."""
    path = module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` only mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = set(module_names())
    return {name: imports_of(name, modules) for name in sorted(modules)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None if it has none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_layered_graph():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_finds_module_level_and_delayed_imports():
    graph = import_graph()
    assert "ctrl_ray.distributed.driver" in graph["ctrl_ray.finetune"]  # module level
    assert "ctrl_ray.registry" in graph["ctrl_ray.preflight"]  # inside a function
    assert "ctrl_ray.tracking" in graph["ctrl_ray.registry"]  # `from ctrl_ray import tracking`


def test_no_module_imports_upward_in_a_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = [name for name in module_names() if name != "ctrl_ray"]
    done = subprocess.run([sys.executable, "-c", IMPORT_ALONE, *names], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


HEAVY = ("torch", "ray", "mlflow", "diffusers", "sklearn", "transformers", "peft")

REFUSE_IN_A_FRESH_INTERPRETER = """
import json, os, sys, tempfile
from pathlib import Path

from ctrl_ray.cli import main
from ctrl_ray.config import load_config
from ctrl_ray.config_changes import resolved_config
from ctrl_ray.finetune_config import FinetuneConfig
from ctrl_ray.run_lock import output_dir_lock

root = Path(tempfile.mkdtemp())
os.chdir(root)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/no-store/mlflow.db"
Path("empty.yaml").write_text("")
Path("base").mkdir()
checkpoint = Path("run/checkpoints/000001")     # a checkpoint of a run at gamma 1
checkpoint.mkdir(parents=True)
saved = resolved_config(load_config(FinetuneConfig, "empty.yaml", ["output_dir=run"]))
(checkpoint / "state.json").write_text(json.dumps({"config": saved}))
held = output_dir_lock("held")                   # a run holding its output folder
held.__enter__()
argvs = [
    ["finetune", "--config", "empty.yaml", "--set", "output_dir=run", "--resume",
     "--set", "objective.gamma=2"],
    ["finetune", "--config", "empty.yaml", "--set", "output_dir=held", "--overwrite"],
    ["finetune", "--config", "empty.yaml", "--set", "iterations=-1"],
    ["finetune", "--config", "empty.yaml", "--set", "mode=ppo", "--set",
     "objective.clip_range=0"],
    ["finetune", "--config", "empty.yaml", "--set", "output_dir=/proc/x"],
    ["finetune", "--config", "empty.yaml", "--set", "base_model=base"],
    ["evaluate", "--model", "missing", "--config", "empty.yaml"],
    ["sample", "--model", "base", "--c", "1", "--n", "0", "--out", "s.png"],
    ["pretrain", "--config", "empty.yaml", "--set", "training.steps=0"],
    ["reward", "train", "--config", "empty.yaml", "--set", "training.epochs=0"],
    ["tune", "--config", "empty.yaml", "--set", "search.num_samples=0"],
    ["baseline", "dps", "--config", "empty.yaml", "--set", "guidance_scale=-1"],
    ["data", "build-digits", "--out", "/proc/d.parquet"],
    ["data", "import", "--images", "missing", "--labels", "x.csv", "--out", "p.parquet"],
    ["registry", "list"],
    ["demo", "--set", "output_dir=/proc/x"],
    ["reward", "audit", "--base", "missing"],
    ["text2image", "build", "--config", "empty.yaml", "--set", "data.path=missing.parquet"],
    ["text2image", "tiny-pipeline", "--out", "/proc/t"],
    ["flow", "build", "--config", "empty.yaml", "--set", "latent_testbed=missing"],
]
codes = [main(argv) for argv in argvs]
print(json.dumps({"codes": codes, "heavy": [m for m in sys.argv[1:] if m in sys.modules]}))
"""


def test_a_refused_command_imports_no_heavy_library():
    """Loading and checking a config and the preflight's cheap checks import no torch, Ray,
    MLflow, diffusers or sklearn: a bad input is refused in well under a second (issue 26)."""
    import json

    done = subprocess.run([sys.executable, "-c", REFUSE_IN_A_FRESH_INTERPRETER, *HEAVY],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["codes"] == [2] * len(result["codes"]), done.stderr
    assert result["heavy"] == [], done.stderr
    assert "keys that change training: objective.gamma: 1.0 -> 2.0" in done.stderr
    assert "'held' is in use by another run" in done.stderr

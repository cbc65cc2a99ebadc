"""The import graph, drawn from the source: no module imports a layer above its own.

Layers, lowest first (a module may import its own unit and the units of lower layers only):
  data.synthetic   the built-in tasks (exercise families, verifier, reasoning format and
                   reward rules): a leaf that imports nothing else of phi4_jax
  errors           the base class of every user-facing error
  parallel         meshes and logical-axis sharding
  model            the transformer, attention, LoRA, model sizes
  losses           pure loss math
  sampling         decoding and scoring with the model
  data             sources, tokenizer, packing, pipeline, row builders
  evals | interop  evaluations; checkpoint conversion (neither imports the other)
  config_base      every key and the shared keys' checks
  train            the engine: state, step, loop, memory, the stage contract
  search | evals.harness   Pivotal Token Search and its job; the lm-eval backend (both
                   load a trained model through train's start-up pieces)
  stages           the stage modules and the registry
  main | export | evaluate | parallel.launch   entry points
"""

import ast
import pathlib

import pytest


PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "phi4_jax"
LAYERS = (("data.synthetic",), ("errors",), ("parallel",), ("model",), ("losses",),
          ("sampling",), ("data",), ("evals", "interop"), ("config_base", "config_args"), ("train",),
          ("search", "evals.harness"), ("stages",),
          ("main", "export", "evaluate", "parallel.launch"))
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: the longest listed prefix below phi4_jax."""
    parts = module.split(".")[1:]
    for size in range(len(parts), 0, -1):
        if ".".join(parts[:size]) in RANK:
            return ".".join(parts[:size])
    raise AssertionError(f"{module} belongs to no layer; add its unit to LAYERS")


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: pathlib.Path) -> set[str]:
    """The phi4_jax modules a file imports (`from phi4_jax.data import synthetic` names
    phi4_jax.data.synthetic; `from phi4_jax.data.chat import Counts` phi4_jax.data.chat)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("phi4_jax.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("phi4_jax"):
            for alias in node.names:
                named = f"{node.module}.{alias.name}"
                found.add(named if _is_module(named) else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module != "phi4_jax":
            graph[module] = _imports(path)
    return graph


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer, or of another unit of the same layer."""
    bad = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            a, b = _unit(module), _unit(target)
            if a != b and RANK[b] >= RANK[a]:
                bad.append(f"{module} ({a}) -> {target} ({b})")
    return bad


def test_no_module_imports_a_layer_above_it():
    assert upward_arrows(_graph()) == []


def test_the_built_in_tasks_import_nothing_else():
    tasks = {m: i for m, i in _graph().items() if _unit(m) == "data.synthetic"}
    assert len(tasks) > 5
    assert {t for i in tasks.values() for t in i if _unit(t) != "data.synthetic"} == set()


@pytest.mark.parametrize("module, imported, bad", [
    ("phi4_jax.data.pipeline", "phi4_jax.config_base", True),
    ("phi4_jax.config_base", "phi4_jax.search.verifiers", True),
    ("phi4_jax.evals.verifiable", "phi4_jax.interop.hf_checkpoint", True),
    ("phi4_jax.stages.dpo", "phi4_jax.data.preference", False),
])
def test_the_check_sees_an_upward_arrow(module, imported, bad):
    assert bool(upward_arrows({module: {imported}})) == bad


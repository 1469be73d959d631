"""The package's shape: imports point one way along the pipeline, inference never needs the training loop, and no
function or loop module outgrows a reader."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "cifar_jax"
MODULES = {f"cifar_jax.{path.stem}": path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def imported_modules(path: pathlib.Path) -> set[str]:
    """The cifar_jax modules a file imports anywhere, lazy imports inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cifar_jax"):
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("cifar_jax")}
    return {name for name in found if name in MODULES}


GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for module in GRAPH[todo.pop()]:
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return seen


def test_the_import_graph_is_read_from_the_sources():
    assert "cifar_jax.steps" in GRAPH["cifar_jax.train"] and "cifar_jax.rundir" in GRAPH["cifar_jax.train"]
    assert len(MODULES) > 20


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_one_that_imports_it_back(module):
    assert module not in reachable(module), f"{module} imports itself back through {sorted(reachable(module))}"


@pytest.mark.parametrize("module", ["cifar_jax.predict", "cifar_jax.evaluate", "cifar_jax.report", "cifar_jax.plots",
                                    "cifar_jax.steps"])
def test_inference_never_imports_the_training_loop(module):
    assert "cifar_jax.train" not in reachable(module)


def test_the_training_loop_stays_short():
    assert len((PACKAGE / "train.py").read_text().splitlines()) <= 350


def test_no_function_runs_over_sixty_lines():
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in MODULES.values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []

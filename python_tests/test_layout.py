"""The package's layers: core < surgery < methods < app. A module imports only from its own layer
or lower ones, never another module's private name, and stays small enough to read."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "easier_ext"
LAYERS = ["core", "surgery", "methods", "app"]
MAX_LINES = 420


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


def imported(tree: ast.Module):
    """(module, name) for every ``from easier_ext... import name`` and ``import easier_ext...``,
    also those inside functions."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "easier_ext":
            for alias in node.names:
                yield node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "easier_ext":
                    yield alias.name, None


def layer_of(dotted: str):
    parts = dotted.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_and_stay_public(path):
    own = LAYERS.index(path.relative_to(PACKAGE).parts[0])
    for module, name in imported(ast.parse(path.read_text())):
        target = layer_of(module if name is None or layer_of(f"{module}.{name}") is None else f"{module}.{name}")
        assert target is None or target <= own, f"{path.name} ({LAYERS[own]}) imports {module}.{name or ''} ({LAYERS[target]})"
        if module != "easier_ext":
            assert name is None or not name.startswith("_"), f"{path.name} imports the private {module}.{name}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (at most {MAX_LINES})"


def test_every_module_is_in_a_layer():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "_extension.py"], top


def test_old_module_paths_still_import_and_unpickle():
    """Models and checkpoints pickled before the subpackages name classes by their old paths."""
    import pickle

    import easier_ext as ee
    import easier_ext.costs
    import easier_ext.modules

    assert easier_ext.modules is ee.core.modules and easier_ext.costs.cost is ee.cost
    old = b"\x80\x02ceasier_ext.modules\nEntropyReLU\nq\x00."  # the class, pickled as 0.1.0 named it
    assert pickle.loads(old) is ee.EntropyReLU
    constant = b"\x80\x02ceasier_ext.train\n_constant\nq\x00."  # a LambdaLR's factor, as 0.1.0 pickled it
    assert pickle.loads(constant)(3) == 1.0
    with pytest.raises(ModuleNotFoundError):
        import easier_ext.no_such_module  # noqa: F401

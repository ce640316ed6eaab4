"""The import direction of DESIGN.md / STYLE.md §2.1, parsed from the source with `ast`."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "regionwatch"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"

# A module may import only from modules of a lower rank (rows above it in STYLE.md §2.1).
RANK = {
    "errors": 0,
    "version": 0,
    "atomic": 1,
    "metrics": 1,
    "schedule": 1,
    "revisions": 1,
    "corpus": 1,
    "palette": 1,
    "background": 1,
    "counting": 1,
    "decoder": 1,
    "dcp": 1,  # DCP folders read as data: torch only
    "access": 2,
    # DESIGN import order: errors → access · sampling · distributed → probes · engine
    "distributed": 2,
    "sampling": 2,
    "gguf_file": 2.5,  # checks a GGUF's architecture against access's table
    "loading": 3,
    "sizing": 1,
    "probes": 3,
    "engine": 3,
    "rows": 3.5,  # the generic engine path: uses engine's batching and FSDP split; plan uses it
    "stacks": 3.25,  # litgpt / OLMo-core / nanoGPT checkpoints: loading, dcp, decoder
    "checkpoints": 4,
    "results": 3,
    "wrappers": 3,
    "plan": 4,
    "measurement": 5,
    "reference": 6,
    "snapshot": 6,
    "store": 7,
    "mapfigure": 7,  # one region-map panel, drawn alike by TensorBoard and the report
    "onset": 7.5,  # a run's onset: reads its store and the live run's; read by report, monitor, cli
    "tensorboard": 8,
    "report": 8,
    "claim": 8,
    "sinks": 9,
    "monitor": 10,
    "lightning": 11,
    "hf": 11,
    "olmo_core": 11,
    "replaying": 11,
    "demo": 12,
    "cli": 13,
    "__main__": 14,
}
# Host frameworks stay in their drivers (STYLE.md §2.1).
HOST_IMPORTS = {
    "lightning": {"lightning", "demo"},
    "pytorch_lightning": {"lightning"},
    "olmo_core": {"olmo_core"},
}
# The HF Trainer's modules and names (Trainer, TrainerCallback, TrainingArguments, ...).
TRAINER_NAMES = ("transformers.trainer", "transformers.Trainer", "transformers.Training")


def modules() -> list[Path]:
    """Every module of the package, subpackages' modules included."""
    top = [p for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    return sorted(top + list(PACKAGE.glob("*/*.py")))


def concept(path: Path) -> str:
    """The layer a module belongs to: its own name, or its subpackage's."""
    return path.stem if path.parent == PACKAGE else path.parent.name


def imported(path: Path) -> set[str]:
    """Every absolute name imported anywhere in the file (also inside functions).

    `import a.b` gives "a.b"; `from a import b` gives "a" and "a.b", so that a name imported
    from a package (`from transformers import Trainer`) is seen as well as the package. The one
    exception: `from regionwatch import metrics` gives "regionwatch.metrics" only, since it reads
    the submodule, not the package root (which `import regionwatch` would).
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module != "regionwatch":
                names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_imported_names_include_from_imports(tmp_path: Path) -> None:
    """The parser sees the names of `from X import Y`, and a root import as such."""
    source = tmp_path / "example.py"
    source.write_text(
        "import regionwatch\n"
        "from transformers import Trainer\n"
        "from regionwatch import ConfigError, metrics\n"
        "def f():\n    from regionwatch.report.data import RunData\n"
    )
    assert imported(source) == {
        "regionwatch",
        "transformers",
        "transformers.Trainer",
        "regionwatch.ConfigError",
        "regionwatch.metrics",
        "regionwatch.report.data",
        "regionwatch.report.data.RunData",
    }
    assert [root_import(name) for name in sorted(imported(source))] == [
        True, True, False, False, False, False, False,
    ]  # fmt: skip


def root_import(name: str) -> bool:
    """Whether `name` reads the package root: `regionwatch` itself or a name it re-exports.

    The root (`regionwatch/__init__.py`) imports nearly every module, so for a module inside
    the package it is an upward import whatever the name.
    """
    parts = name.split(".")
    return parts[0] == "regionwatch" and (len(parts) < 2 or parts[1] not in RANK)


def test_every_module_has_a_rank() -> None:
    """A new module must be placed in the layering on purpose."""
    assert {concept(p) for p in modules()} <= set(RANK)


def label(path: Path) -> str:
    return str(path.relative_to(PACKAGE).with_suffix(""))


@pytest.mark.parametrize("path", modules(), ids=label)
def test_imports_flow_one_way(path: Path) -> None:
    """A module imports regionwatch modules of strictly lower rank only (or its own package's)."""
    own = concept(path)
    for name in imported(path):
        assert not root_import(name), f"{label(path)} imports the package root ({name})"
        parts = name.split(".")
        if parts[0] != "regionwatch" or parts[1] == own:
            continue
        assert RANK[parts[1]] < RANK[own], (
            f"{label(path)} (rank {RANK[own]}) imports {parts[1]} (rank {RANK[parts[1]]})"
        )


@pytest.mark.parametrize("path", modules(), ids=label)
def test_host_frameworks_stay_in_their_drivers(path: Path) -> None:
    """Only lightning.py imports lightning; the HF Trainer only appears in hf.py (and the demo)."""
    for name in imported(path):
        root = name.split(".")[0]
        if root in HOST_IMPORTS:
            assert concept(path) in HOST_IMPORTS[root], f"{label(path)} imports {name}"
        if name.startswith(TRAINER_NAMES):
            assert concept(path) in {"hf", "demo"}, f"{label(path)} imports {name}"


def test_library_never_imports_the_reference() -> None:
    """reference.py is for tests, benchmarks and users; the library itself never uses it."""
    for path in modules():
        assert "regionwatch.reference" not in imported(path), label(path)


def test_import_regionwatch_stays_light() -> None:
    """`import regionwatch` loads neither lightning nor the HF Trainer."""
    code = (
        "import sys, regionwatch; print(sorted(m for m in sys.modules"
        " if m == 'transformers.trainer'"
        " or m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def documented() -> dict[str, float]:
    """docs/architecture.md's table: module label -> rank."""
    row = r"^\|\s*(\d+(?:\.\d+)?)\s*\|\s*`([\w/]+)`\s*\|"
    rows = re.findall(row, ARCHITECTURE.read_text(), re.M)
    labels = [label for _, label in rows]
    assert len(labels) == len(set(labels)), "a module is listed twice"
    return {label: float(rank) for rank, label in rows}


def test_architecture_doc_lists_every_module_with_its_rank() -> None:
    """docs/architecture.md names every module once, at the rank this test enforces."""
    listed = documented()
    assert sorted(listed) == sorted(label(p) for p in modules())
    wrong = {label(p): (listed[label(p)], RANK[concept(p)]) for p in modules()}
    assert {k: v for k, v in wrong.items() if v[0] != v[1]} == {}


def test_architecture_doc_is_in_import_order() -> None:
    """The table reads top to bottom in import order: ranks never decrease."""
    ranks = list(documented().values())
    assert ranks == sorted(ranks)


def test_public_functions_are_not_shadowed_by_modules() -> None:
    """No module shares a name with a public name: `regionwatch.measure` stays the function."""
    import regionwatch

    for path in modules():
        if path.stem != "__main__":  # importing it runs the command line
            importlib.import_module(f"regionwatch.{label(path).replace('/', '.')}")
    assert not set(regionwatch.__all__) & {p.stem for p in PACKAGE.glob("*.py")}
    assert callable(regionwatch.measure)
    assert callable(regionwatch.replay)
    assert regionwatch.measure.__module__ == "regionwatch.measurement"
    assert regionwatch.replay.__module__ == "regionwatch.replaying"

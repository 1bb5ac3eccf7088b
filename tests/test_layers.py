"""Imports go one way: pipeline/ (paircurate) may import transforms/ (paircurate.transforms), never back.

Checked from the source: every import statement of every module under transforms/, those
inside functions included, is read with ast.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LOWER = "paircurate.transforms"


def imported_modules(source: str, package: str = LOWER):
    """(line, module) for every import in ``source`` (a module of ``package``), wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            if module == "paircurate":  # from paircurate import x: x is the module imported
                found += [(node.lineno, f"paircurate.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def upward(modules):
    """The imports that reach above the lower layer: paircurate, or paircurate.X outside transforms."""
    return [(line, name) for line, name in modules
            if (name == "paircurate" or name.startswith("paircurate."))
            and not (name == LOWER or name.startswith(LOWER + "."))]


def test_the_checker_sees_lazy_relative_and_package_imports():
    source = ("import os\n"
              "from paircurate.transforms.schema import Status\n"
              "def f():\n"
              "    from paircurate.progress import tally\n"
              "    from paircurate import run\n"
              "    from .. import config\n"
              "    from . import files\n")
    assert upward(imported_modules(source)) == [(4, "paircurate.progress"), (5, "paircurate.run"),
                                                (6, "paircurate.config")]


def lower_modules():
    return sorted((REPO / "transforms").glob("*.py"))


@pytest.mark.parametrize("path", lower_modules(), ids=lambda p: p.name)
def test_transforms_never_import_the_upper_layer(path):
    found = upward(imported_modules(path.read_text(encoding="utf-8")))
    assert not found, f"transforms/{path.name} imports the upper layer: " + ", ".join(
        f"{name} (line {line})" for line, name in found)


def test_every_lower_module_is_checked():
    assert {p.name for p in lower_modules()} >= {"schema.py", "beam_util.py", "files.py", "tally.py", "stage.py",
                                                 "settings.py"}

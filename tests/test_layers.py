"""The layout of src/offsite: layers that import only downward, and nothing loose at the top."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "offsite"


def test_imports_only_go_downward():
    """pyproject's import-linter contract holds, function-level imports included."""
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": str(lint.parent)})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_every_package_is_a_layer_of_the_contract():
    """A new top-level package must be placed in the contract, or the contract says nothing about it."""
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {part.strip().removeprefix("offsite.") for layer in layers for part in layer.split("|")}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == named


def test_top_level_holds_only_packages():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == []


# Modules that import an optional extra at their top (federate/strategy.py subclasses Flower's
# strategies): importing them inside a function keeps everything else working without the extra.
NEEDS_EXTRA = {"strategy"}


def test_offsite_imports_sit_at_the_top_outside_the_cli():
    """An import of offsite inside a function hides a dependency from the reader (and once hid cycles)."""
    import ast

    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue  # the CLI imports a command's workflow only when the command runs (start-up cost)
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{path.relative_to(PACKAGE)}:{node.lineno}" for node in ast.walk(fn)
                           if isinstance(node, ast.ImportFrom)
                           and (node.level > 0 or (node.module or "").split(".")[0] == "offsite")
                           and (node.module or "").rsplit(".", 1)[-1] not in NEEDS_EXTRA]
    assert hidden == []


def test_the_readme_support_table_is_the_generated_one():
    """README's family x capability table is what ``offsite families --support`` prints from the registries."""
    from offsite.cli.families import support_table

    readme = (ROOT / "README.md").read_text()
    start = readme.index("-->\n", readme.index("<!-- support table")) + 4
    assert readme[start:readme.index("\n<!-- end of support table -->")] == support_table()


def test_the_conformance_suite_runs_every_registered_method():
    """The table's method columns claim every family; the suite must build every method on every family."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from test_families import METHOD_SETTINGS

    from offsite.emulator import available_methods

    # uniform is the TestConformance class itself; gradot has its own conformance test
    assert set(METHOD_SETTINGS) | {"uniform", "gradot"} == set(available_methods())

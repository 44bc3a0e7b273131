"""What ships: the library, components and pipelines never import the demo and test helpers
(bincounter_demo: synthetic photos, local S3); only the CLI's demo commands load them."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from bincounter.cli import main

REPO = Path(__file__).resolve().parent.parent
SHIPPED = (REPO / "src" / "bincounter", REPO / "components", REPO / "pipelines")


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_shipped_code_never_imports_the_demo_package() -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(m for m in _imported_modules(path) if m.split(".")[0] == "bincounter_demo")
        for root in SHIPPED for path in root.rglob("*.py")
    }
    offenders = {path: modules for path, modules in offenders.items() if modules}
    assert not offenders, f"shipped modules import the demo helpers: {offenders}"


def test_the_demo_package_holds_the_helpers() -> None:
    assert not (REPO / "src" / "bincounter" / "synth.py").exists()
    assert not (REPO / "src" / "bincounter" / "s3server.py").exists()
    assert {"synth", "s3server", "demo"} <= {p.stem for p in (REPO / "src" / "bincounter_demo").glob("*.py")}


@pytest.mark.parametrize("argv", [["demo"], ["synth", "--out", "x"], ["s3-server", "--folder", "x"]])
def test_demo_commands_without_the_demo_package_say_how_to_get_it(argv, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [n for n in sys.modules if n.split(".")[0] == "bincounter_demo"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bincounter_demo", None)  # as if it were not installed
    with pytest.raises(SystemExit, match=r"bincounter_demo.*pip install '\.\[demo\]'"):
        main(argv)
    assert not (tmp_path / "x").exists()

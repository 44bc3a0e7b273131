"""What ships: the library, components and pipelines never import the demo and test helpers
(bincounter_demo: synthetic photos, local S3), which are a distribution of their own (demo/) that
adds its commands to the CLI through an entry point; the bincounter wheel does not hold them."""

from __future__ import annotations

import ast
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
    assert not (REPO / "src" / "bincounter_demo").exists()
    assert {"synth", "s3server", "demo", "commands"} <= {p.stem for p in (REPO / "demo" / "bincounter_demo").glob("*.py")}


@pytest.mark.parametrize("argv", [["demo"], ["synth", "--out", "x"], ["s3-server", "--folder", "x"]])
def test_demo_commands_without_the_demo_package_say_how_to_get_it(argv, monkeypatch, tmp_path) -> None:
    from bincounter import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "PLUGIN_GROUP", "bincounter.none-installed")  # as if only bincounter were
    with pytest.raises(SystemExit, match=r"comes with the demo package: pip install \./demo"):
        main(argv)
    assert not (tmp_path / "x").exists()

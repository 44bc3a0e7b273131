"""The image builds from what its build context holds: every path the Dockerfiles COPY is
there, and the package (bincounter, components, pipelines) and the demo's (bincounter_demo,
apart) install from exactly those files."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("image_build", REPO / "dockerfiles" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

# Each distribution's folder and the packages its wheel holds.
WHEELS = {"": ("src/bincounter", "components", "pipelines"), "demo": ("demo/bincounter_demo",)}
PACKAGES = tuple(package for packages in WHEELS.values() for package in packages)


@pytest.fixture(scope="module")
def context() -> list[str]:
    return build.context_files(REPO)


@pytest.mark.parametrize("dockerfile", sorted(build.DOCKERFILES.values()), ids=lambda p: p.name)
def test_every_copied_path_is_in_the_context(dockerfile: Path, context: list[str]) -> None:
    sources = build.dockerfile_copy_sources(dockerfile)
    # The serving image takes its modules from src/ by pyproject.toml's list; the others install the package.
    expected = ({"pyproject.toml", "src"} if dockerfile.name == "Dockerfile.serve" else
                {"pyproject.toml", "README.md", "src", "components", "pipelines", "demo", "manifests"})
    assert expected <= set(sources)
    for source in sources:
        assert any(f == source or f.startswith(source.rstrip("/") + "/") for f in context), (
            f"{dockerfile.name} copies {source!r}, which the build context (after .dockerignore) lacks")


def test_context_holds_the_sources_and_no_local_state(context: list[str]) -> None:
    tracked = subprocess.run(["git", "ls-files", *PACKAGES], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout:
        missing = [f for f in tracked.stdout.split() if f.endswith(".py") and f not in context]
        assert not missing, f"tracked sources the build would not see: {missing}"
    for f in context:
        assert not f.startswith((".git/", ".venv/", ".bincounter/", "tests/", "dockerfiles/")), f
        assert "__pycache__" not in f and ".egg-info/" not in f, f
        assert not f.endswith((".pyc", ".db", ".ckpt", ".pt")), f


def test_package_installs_from_exactly_the_context(tmp_path: Path, context: list[str]) -> None:
    copy = tmp_path / "context"
    for rel in context:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, copy / rel)
    for root, packages in WHEELS.items():
        # No build isolation: the test must not reach an index; the venv has setuptools.
        dist = tmp_path / "dist" / (root or "bincounter")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
             "--wheel-dir", str(dist), str(copy / root)],
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        (wheel,) = dist.glob("*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        assert tops == {Path(package).name for package in packages}, f"{wheel.name} holds {tops}"
        # Every module in the sources ships (a subpackage missing from pyproject would not).
        for package in packages:
            for path in (REPO / package).rglob("*.py"):
                if "__pycache__" in path.parts:
                    continue
                rel = path.relative_to(REPO / package).as_posix()
                assert f"{Path(package).name}/{rel}" in names, f"{package}/{rel} is not in {wheel.name}"
        entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
        assert ("bincounter = bincounter.cli:main" if not root else "demo = bincounter_demo.commands:COMMANDS") in (
            entry_points.decode())
    assert "bincounter/serving/static/index.html" in set(zipfile.ZipFile(next(
        (tmp_path / "dist" / "bincounter").glob("*.whl"))).namelist())


@pytest.mark.parametrize(
    ("pattern", "path", "excluded"),
    [
        (".venv", ".venv/bin/python", True),
        ("**/__pycache__", "src/bincounter/__pycache__/x.pyc", True),
        ("**/*.py[cod]", "a/b/c.pyc", True),
        ("**/*.egg-info", "src/bincounter.egg-info/PKG-INFO", True),
        ("*.egg-info", "src/bincounter.egg-info/PKG-INFO", False),  # '*' does not cross '/'
        ("tests", "src/tests/x.py", False),  # rooted at the context, as in Docker
        ("data", "src/bincounter/data/dataset.py", False),
    ],
)
def test_dockerignore_matching(pattern: str, path: str, excluded: bool) -> None:
    regexes = [(True, build.re.compile(build._glob_to_regex(pattern)))]
    assert build._excluded(path, regexes) is excluded


def test_dockerignore_exception() -> None:
    patterns = [(True, build.re.compile(build._glob_to_regex("*.md"))),
                (False, build.re.compile(build._glob_to_regex("README.md")))]
    assert build._excluded("NOTES.md", patterns) and not build._excluded("README.md", patterns)


@pytest.mark.parametrize("dockerfile", sorted(build.DOCKERFILES.values()), ids=lambda p: p.name)
def test_pip_settings_reach_only_the_build_stages(dockerfile: Path) -> None:
    """Every pip that reads an index gets the build secrets; the runtime stage gets none."""
    text = build.re.sub(r"\\\n", " ", dockerfile.read_text())
    stages = build.re.split(r"^FROM ", text, flags=build.re.M)[1:]
    runtime = next(s for s in stages if " AS runtime" in s.splitlines()[0])
    assert "type=secret" not in runtime and "pip.conf" not in runtime.replace("/etc/pip.conf", "")
    if dockerfile.name == "Dockerfile.serve":  # copies the finished venv: no pip at all
        assert "pip " not in runtime and "COPY --from=app /opt/venv" in runtime
    else:
        assert "--no-index" in runtime  # the package wheel installs offline from the wheel stage
    for stage in stages:
        for line in stage.splitlines():
            if line.startswith("RUN") and build.re.search(r"\bpip (install|wheel)\b", line) and "--no-index" not in line:
                for secret in build.SECRET_IDS:
                    assert f"id={secret}" in line, f"{dockerfile.name}: a pip step lacks the {secret} secret: {line[:80]}"



@pytest.fixture
def open_folder():
    """A folder anyone can enter (pytest's own tmp_path is mode 700)."""
    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_the_mounted_test_is_readable_by_the_image_user_from_a_private_clone(open_folder: Path) -> None:
    # A clone in `mktemp -d` (mode 700) is closed to uid 10001: mount a readable copy instead.
    private = open_folder / "clone"
    private.mkdir(mode=0o700)
    assert build.closed_to_others(private) == private
    assert build.closed_to_others(open_folder) is None
    with build.mounted_sources() as src:
        assert build.closed_to_others(src / "dockerfiles") is None
        mounted = src / "dockerfiles" / "image_test.py"
        assert mounted.stat().st_mode & 0o004, oct(mounted.stat().st_mode)
        assert mounted.read_bytes() == (REPO / "dockerfiles" / "image_test.py").read_bytes()
    assert not src.exists()


def test_a_private_temporary_folder_is_refused_with_the_reason(open_folder: Path, monkeypatch) -> None:
    private = open_folder / "tmp"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(build.tempfile, "tempdir", str(private))
    with pytest.raises(SystemExit, match=r"/tmp is not searchable by other users \(mode 700\).*TMPDIR"):
        with build.mounted_sources():
            pass
    assert list(private.iterdir()) == []

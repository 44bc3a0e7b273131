"""The serving image's two lists (pyproject.toml's [tool.bincounter.serving-image]) against the code:
the modules it copies are exactly those the server imports, and what it installs covers every
package they import, pinned as the project pins it."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import grimp
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = PYPROJECT["tool"]["bincounter"]["serving-image"]
# The distribution that provides each top-level package the server imports.
PROVIDERS = {"PIL": "pillow", "yaml": "pyyaml", "prometheus_client": "prometheus-client", "mlflow": "mlflow-skinny",
             "onnxruntime": "onnxruntime", "numpy": "numpy", "fastapi": "fastapi", "starlette": "fastapi",
             "anyio": "fastapi", "uvicorn": "uvicorn", "pydantic": "pydantic", "tyro": "tyro", "boto3": "boto3",
             "multipart": "python-multipart"}


def served_modules() -> tuple[set[str], set[str]]:
    """(our modules, external top-level packages) the server reaches, leaving out the imports the
    torch-free contract allows (the torch backend's, the ONNX export's: refused in the image)."""
    graph = grimp.build_graph("bincounter", include_external_packages=True)
    contract = next(c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if "holds no torch" in c["name"])
    for edge in contract["ignore_imports"]:
        importer, imported = (side.strip() for side in edge.split("->"))
        graph.remove_import(importer=importer, imported=imported)
    seen: set[str] = set()
    todo = [m for m in graph.modules if m.startswith("bincounter.serving")]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.find_modules_directly_imported_by(module)
    ours = {m for m in seen if m.split(".")[0] == "bincounter"}
    external = {m for m in seen - ours if m.split(".")[0] not in sys.stdlib_module_names}
    return ours, external


def copied(module: str) -> bool:
    path = module.replace(".", "/")
    return any(path + suffix == m or path.startswith(m.rstrip("/") + "/") or path == m
               for m in IMAGE["modules"] for suffix in (".py", "/__init__.py"))


def test_the_image_copies_every_module_the_server_imports_and_no_other():
    ours, _ = served_modules()
    missing = sorted(m for m in ours if not copied(m))
    assert not missing, f"the serving image lacks {missing}: add them to [tool.bincounter.serving-image] modules"
    for entry in IMAGE["modules"]:
        assert (ROOT / "src" / entry).exists(), entry
        module = entry.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        assert module in ours or any(m.startswith(module + ".") for m in ours), f"{entry} is copied but never imported"


def test_the_image_installs_what_the_server_imports_pinned_as_the_project_pins_it():
    _, external = served_modules()
    requirements = {Requirement(r).name: Requirement(r) for r in IMAGE["requirements"]}
    unprovided = sorted(p for p in external if PROVIDERS.get(p) not in requirements)
    assert not unprovided, f"nothing in the serving image's requirements provides {unprovided}"
    pins = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    for name, req in requirements.items():
        same = pins["mlflow"] if name == "mlflow-skinny" else pins.get(name)
        assert same is not None, f"{name} is not a dependency of the project"
        assert str(req.specifier) == str(same.specifier), f"{req} differs from the project's {same}"
    assert not {"torch", "torchvision", "kfp", "mlflow"} & set(requirements)

"""Run one task of a compiled pipeline (its IR YAML) the way a KFP backend's launcher would: the
executor's own command and args, an executor input resolved from the pipeline's parameter
defaults (through dsl.If branches), artifacts given as local folders. A test helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


class Compiled:
    """A compiled pipeline: its spec and, when it has one, its kfp-kubernetes platform spec."""

    def __init__(self, path: Path):
        docs = list(yaml.safe_load_all(Path(path).read_text()))
        self.text = Path(path).read_text()
        self.spec = docs[0]
        self.platform = (docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
                         if len(docs) > 1 else {})

    @property
    def parameters(self) -> dict[str, Any]:
        """The pipeline's parameters and their compiled defaults."""
        return {name: d.get("defaultValue") for name, d in self.spec["root"]["inputDefinitions"]["parameters"].items()}

    def tasks(self) -> dict[str, tuple[dict, dict]]:
        """Every task, including those inside dsl.If / ParallelFor groups: name -> (task, its DAG's
        component inputs)."""
        out = {}
        for component in [self.spec["root"], *self.spec["components"].values()]:
            for name, task in component.get("dag", {}).get("tasks", {}).items():
                out[name] = (task, component)
        return out

    def executors(self) -> dict[str, dict]:
        """Executor label (``exec-<task>``) -> container."""
        return {k: v["container"] for k, v in self.spec["deploymentSpec"]["executors"].items()}

    def executor_of(self, task_name: str) -> tuple[str, dict, dict]:
        """(executor label, container, component definition) of a task."""
        task, _ = self.tasks()[task_name]
        component = self.spec["components"][task["componentRef"]["name"]]
        label = component["executorLabel"]
        return label, self.executors()[label], component

    def resolve(self, binding: dict) -> Any:
        """A task input's value from the pipeline's defaults: a constant, or a parameter passed down
        (``pipelinechannel--<name>`` inside groups)."""
        if "runtimeValue" in binding:
            return binding["runtimeValue"]["constant"]
        name = binding["componentInputParameter"].removeprefix("pipelinechannel--")
        return self.parameters[name]


def run_task(compiled: Compiled, task_name: str, work: Path, *, artifacts: dict[str, dict] | None = None,
             overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None,
             timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    """Run ``task_name``'s executor as its compiled command; ``artifacts`` maps input names to
    ``{"uri": folder, "metadata": {...}}``. Returns the process and the output artifacts'
    metadata (empty when it failed)."""
    task, _ = compiled.tasks()[task_name]
    _, container, component = compiled.executor_of(task_name)
    values = {name: compiled.resolve(binding) for name, binding in task.get("inputs", {}).get("parameters", {}).items()}
    values.update(overrides or {})
    inputs: dict[str, Any] = {}
    for name, definition in component.get("inputDefinitions", {}).get("artifacts", {}).items():
        given = (artifacts or {}).get(name)
        if given is not None:
            inputs[name] = {"artifacts": [{"name": name, "type": definition["artifactType"], "uri": str(given["uri"]),
                                           "metadata": given.get("metadata", {})}]}
    outputs = {name: {"artifacts": [{"name": name, "type": d["artifactType"], "uri": str(work / name), "metadata": {}}]}
               for name, d in component.get("outputDefinitions", {}).get("artifacts", {}).items()}
    work.mkdir(parents=True, exist_ok=True)
    executor_input = {"inputs": {"parameterValues": values, "artifacts": inputs},
                      "outputs": {"artifacts": outputs, "outputFile": str(work / "executor_output.json")}}
    args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
    # The image's python3 is this environment's; nothing else of its folder (kubectl) joins PATH.
    shim = work / "python-shim"
    shim.mkdir(exist_ok=True)
    (shim / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (shim / "python3").chmod(0o755)
    path = os.pathsep.join([str(shim), (env or os.environ).get("PATH", os.environ["PATH"])])
    proc = subprocess.run([*container["command"], *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {}), "PATH": path})
    produced: dict[str, dict] = {}
    if proc.returncode == 0:
        written = json.loads((work / "executor_output.json").read_text()).get("artifacts", {})
        produced = {name: written[name]["artifacts"][0].get("metadata", {}) for name in written}
    return proc, produced

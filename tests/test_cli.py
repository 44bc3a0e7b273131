import subprocess
import sys

import pytest

from bincounter.cli import COMMANDS, main

SUBCOMMANDS = [k for k, v in COMMANDS.items() if not isinstance(v, dict)] + ["pipeline run", "pipeline compile", "pipeline submit",
                                                                          "pipeline schedule"]


def test_top_level_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ("ingest", "preprocess", "train", "evaluate", "register", "deploy", "predict", "pipeline-run"):
        assert name in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_stage_parameters_show_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for option in ("--backbone", "--epochs", "--lr", "--freeze-early", "--label-smoothing"):
        assert option in out


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "bincounter.cli", "pipeline", "compile", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Kubeflow" in proc.stdout


def test_predict_counts_local_images(model_dir, synth_dir, capsys):
    from bincounter.config import RegisterConfig
    from bincounter.registry.register import register
    from tests.judges import always

    register(RegisterConfig(), model_dir, {"accuracy": 0.5}, judge=always())
    main(["predict", str(synth_dir / "bin-images" / "00001.jpg"), str(synth_dir / "bin-images" / "00002.jpg")])
    lines = [l for l in capsys.readouterr().out.splitlines() if "count=" in l]
    assert len(lines) == 2 and "00001.jpg" in lines[0]


TRIAL_VALUES = {"lr": "0.001", "batchSize": "16", "epochs": "3", "weightDecay": "0.0001", "imageSize": "128",
                "backbone": "resnet18"}


def _manifest_train_commands():
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1] / "manifests"
    for path in (root / "training/base/pytorchjob.yaml", root / "katib/experiment.yaml"):
        text = re.sub(r"\$\{trialParameters\.(\w+)\}", lambda m: TRIAL_VALUES[m.group(1)],
                      path.read_text())
        for doc in yaml.safe_load_all(text):
            for node in _walk(doc):
                if isinstance(node, dict) and isinstance(node.get("command"), list) and "bincounter.cli" in node["command"]:
                    cmd = node["command"]
                    yield path.name, cmd[cmd.index("bincounter.cli") + 1:]


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)


def test_cluster_manifests_call_the_cli_with_options_it_accepts(monkeypatch):
    """The PyTorchJob and Katib trials run `python -m bincounter.cli train ...`: those flags must parse."""
    import bincounter.launch

    seen = []
    monkeypatch.setattr(bincounter.launch, "train", lambda cfg, data, out, **kw: seen.append((cfg, data)) or {})
    commands = list(_manifest_train_commands())
    assert {name for name, _ in commands} == {"pytorchjob.yaml", "experiment.yaml"}
    for _, args in commands:
        main(args)
    assert all(data.startswith("s3://") for _, data in seen)

import subprocess
import sys

import pytest

from bincounter.cli import COMMANDS, main

SUBCOMMANDS = [k for k, v in COMMANDS.items() if not isinstance(v, dict)] + ["pipeline run", "pipeline compile"]


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
    from bincounter.register import register

    register(RegisterConfig(), model_dir, {"accuracy": 0.5})
    main(["predict", str(synth_dir / "bin-images" / "00001.jpg"), str(synth_dir / "bin-images" / "00002.jpg")])
    lines = [l for l in capsys.readouterr().out.splitlines() if "count=" in l]
    assert len(lines) == 2 and "00001.jpg" in lines[0]

"""The one command line: `cirlab <command>` dispatch, quick help without torch, complete help texts,
shell completion, and the TensorBoard / MLflow logger configs."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cirlab.cli.main import COMMANDS, bash_completion, help_text
from cirlab.cli.main import main as cirlab_main

BIN = Path(sys.executable).parent
ENV = {**os.environ, "COLUMNS": "100"}  # argparse wraps at the terminal width: the same width for every run
ARGPARSE_COMMANDS = [name for name, (_, is_hydra, _) in COMMANDS.items() if not is_hydra]


def run(*command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, env=ENV,
                          stdin=subprocess.DEVNULL, check=False)


def script(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        pytest.skip(f"{path} is not installed (pip install -e . registers the console scripts)")
    return str(path)


# --------------------------------------------------------------------------- dispatch
def test_top_level_help_lists_every_command():
    done = run(sys.executable, "-m", "cirlab.cli.main", "--help")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.split("commands:")[1].split("\n\n")[0].splitlines() if line}
    assert listed == set(COMMANDS) == {"train", "pipeline", "eval", "sweep", "derive", "restore", "bench", "data",
                                       "hyperres-eval", "export", "compare"}
    assert done.stdout.startswith("usage: cirlab ")


def test_installed_cirlab_script_lists_every_command():
    done = run(script("cirlab"), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout == help_text()


def test_unknown_command_is_named(capsys):
    assert cirlab_main(["restroe"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'restroe'" in err and "restore" in err


def test_no_command_prints_help_and_fails(capsys):
    assert cirlab_main([]) == 2
    assert "commands:" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["restore", "derive", "hyperres-eval", "data", "bench", "export"])
def test_cirlab_command_help_equals_the_script_help(name):
    via_cirlab = run(script("cirlab"), name, "--help")
    direct = run(script(f"cirlab-{name}"), "--help")
    assert via_cirlab.returncode == direct.returncode == 0, via_cirlab.stderr + direct.stderr
    assert via_cirlab.stdout == direct.stdout and f"usage: cirlab-{name}" in direct.stdout


def test_arguments_pass_through_unchanged(tmp_path, capsys):
    # an argparse command gets its flags (here a bad one, named by the command itself) ...
    assert cirlab_main(["derive", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    # ... and sweep its sub-command and flags
    with pytest.raises(SystemExit) as exit_info:
        cirlab_main(["sweep", "summarize", "--help"])
    assert exit_info.value.code == 0 and "usage: cirlab-sweep summarize" in capsys.readouterr().out


def test_hydra_command_gets_its_overrides():
    done = run(sys.executable, "-m", "cirlab.cli.main", "train", "--cfg", "job", "model=cresmd_tiny",
               "logger=tensorboard")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lightning.pytorch.loggers.tensorboard.TensorBoardLogger" in done.stdout


# --------------------------------------------------------------------------- quick help
PROBE = """\
import sys
from cirlab.cli.main import main
try:
    main({argv!r})
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
heavy = sorted(m for m in ("torch", "lightning", "hydra", "wandb") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


@pytest.mark.parametrize("argv", [["--help"], ["--completion", "bash"], *([name, "--help"] for name in ARGPARSE_COMMANDS),
                                  ["bench", "cost", "--help"], ["sweep", "summarize", "--help"],
                                  # Hydra's help composes the config: the schemas of degradation/sampling load no torch
                                  ["train", "--help"], ["pipeline", "--help"], ["eval", "--help"],
                                  ["train", "--cfg", "job", "experiment=cresmd_small"]],
                         ids=lambda argv: " ".join(argv))
def test_help_imports_neither_torch_nor_lightning(argv):
    done = run(sys.executable, "-c", PROBE.format(argv=argv))
    assert done.returncode == 0, done.stderr[-3000:]
    heavy = done.stdout.rsplit("HEAVY:", 1)[1].strip()
    assert "torch" not in heavy.split(",") and "lightning" not in heavy.split(","), (argv, heavy)


def test_derive_default_size_is_the_library_hd():
    from cirlab.cli.derive import HD as CLI_HD
    from cirlab.tasks import HD

    assert CLI_HD == HD


# --------------------------------------------------------------------------- help texts
class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def parsers(monkeypatch) -> list[argparse.ArgumentParser]:
    """The parser of every argparse command (and of bench's sub-commands), as each command builds it:
    caught when the command parses its arguments, so nothing runs."""

    def catch(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    found = []
    for name in ARGPARSE_COMMANDS:
        with pytest.raises(_Parsed) as caught:
            cirlab_main([name, "summarize"] if name == "sweep" else [name])
        found.append(caught.value.parser)
    for parser in list(found):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += list(action.choices.values())
    assert len(found) >= len(ARGPARSE_COMMANDS) + 5  # bench: data, search-step, cost, sharing, train
    return found


def test_every_argparse_option_has_help_and_no_rest_markup(monkeypatch):
    missing, markup = [], []
    for parser in parsers(monkeypatch):
        assert parser.prog.startswith("cirlab"), parser.prog
        assert "python -m" not in parser.format_usage() + (parser.description or ""), parser.prog
        texts = [parser.description or ""]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                texts += [choice.help or "" for choice in action._choices_actions]
                missing += [f"{parser.prog} {choice.dest}" for choice in action._choices_actions if not choice.help]
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
            texts.append(action.help or "")
        markup += [f"{parser.prog}: {text[:60]!r}" for text in texts if "``" in text or ":func:" in text]
    assert not missing, missing
    assert not markup, markup


def test_sweep_usage_names_the_real_command():
    done = run(sys.executable, "-m", "cirlab.cli.main", "sweep", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: cirlab-sweep hparams_search=<study>")


# --------------------------------------------------------------------------- shell completion
def test_bash_completion_completes_command_names():
    complete = bash_completion()
    probe = complete + '\nCOMP_WORDS=(cirlab re); COMP_CWORD=1; _cirlab; echo "${COMPREPLY[@]}"\n' \
                       'COMP_WORDS=(cirlab hy); COMP_CWORD=1; _cirlab; echo "${COMPREPLY[@]}"\n'
    done = run("bash", "--norc", "-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["restore", "hyperres-eval"]


def test_completion_option_prints_the_script(capsys):
    assert cirlab_main(["--completion", "bash"]) == 0
    assert "complete -o nospace -o default -F _cirlab cirlab" in capsys.readouterr().out
    assert cirlab_main(["--completion", "tcsh"]) == 2
    assert "only bash" in capsys.readouterr().err


def test_hydra_shell_completion_answers_for_a_hydra_command():
    # Hydra's own completion (what the completion script calls for train / pipeline / eval)
    done = subprocess.run([sys.executable, "-m", "cirlab.cli.train", "-sc", "query=bash"], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL, check=False,
                          env={**ENV, "COMP_LINE": "cirlab-train logger=", "COMP_POINT": "-1"})
    assert done.returncode == 0, done.stderr[-3000:]
    offered = done.stdout.split()
    assert {"logger=tensorboard", "logger=mlflow", "logger=csv", "logger=wandb"} <= set(offered), offered


# --------------------------------------------------------------------------- logger configs
def test_tensorboard_logger_composes_and_writes_events(train_cfg, tmp_path):
    from cirlab.utils.run import instantiate_loggers

    cfg = train_cfg("logger=tensorboard")
    (logger,) = instantiate_loggers(cfg.logger)
    assert type(logger).__name__ == "TensorBoardLogger"
    logger.log_metrics({"val/psnr": 21.5}, step=1)
    logger.finalize("success")
    events = list(Path(cfg.paths.output_dir).glob("tensorboard/version_*/events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.slow
def test_tiny_training_run_writes_tensorboard_events(train_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cirlab.training import train

    cfg = train_cfg("logger=tensorboard")
    train(cfg)
    (folder,) = Path(cfg.paths.output_dir).glob("tensorboard/version_*")
    events = EventAccumulator(str(folder))
    events.Reload()
    assert {"val/psnr", "test/psnr"} <= set(events.Tags()["scalars"])


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_mlflow_logger_composes_and_names_the_install_when_missing(train_cfg):
    from cirlab.training import train
    from cirlab.utils.loggers import MissingLoggerPackage

    cfg = train_cfg("logger=mlflow")
    assert cfg.logger.mlflow._target_ == "cirlab.utils.loggers.make_mlflow_logger"
    assert cfg.logger.mlflow.tracking_uri == f"file:{cfg.paths.output_dir}/mlruns"
    with pytest.raises(Exception, match=r"logger=mlflow needs the mlflow package.*pip install mlflow") as raised:
        train(cfg)
    assert isinstance(raised.value, MissingLoggerPackage) or isinstance(raised.value.__cause__, MissingLoggerPackage)
    run_dir = Path(cfg.paths.output_dir)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("name", [name for name, (_, is_hydra, _) in COMMANDS.items() if is_hydra])
def test_hydra_command_help_imports_no_lightning(name):
    # torch is still imported: the structured-config schemas the help composes with live in
    # cirlab.data.sampling (a torch module); the training library (Lightning) is imported only to run
    done = run(sys.executable, "-c", PROBE.format(argv=[name, "--help"]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Powered by Hydra" in done.stdout
    assert "lightning" not in done.stdout.rsplit("HEAVY:", 1)[1].strip().split(",")

"""What a run prints and logs: each message once, no terminal codes in files, the config as a
tree, the real FLOPs in the model summary, no advertisement or spurious warnings."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from cirlab.callbacks.progress import PlainProgress, model_summary, progress_bar
from cirlab.utils.console import config_tree, print_config_tree, route_library_logs
from conftest import TINY, compose

ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]\[(?P<name>[^\]]+)\]\[(?P<level>[A-Z]+)\] - (?P<message>.*)$")


# --------------------------------------------------------------------------- Lightning's logs
@pytest.fixture
def lightning_handler_restored():
    """Undo route_library_logs's changes to the process-wide loggers after the test."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero")
    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate,
                    list(logging.getLogger(name).filters)) for name in names}
    yield
    for name, (handlers, propagate, filters) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.filters[:] = filters


def test_lightning_lines_reach_the_root_handlers_once_and_the_advertisement_none(lightning_handler_restored):
    """Lightning imported after Hydra set up logging: its own handler plus the root's printed twice."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    own, root_stream = io.StringIO(), io.StringIO()
    lightning_logger = logging.getLogger("lightning")
    lightning_logger.addHandler(logging.StreamHandler(own))  # what `import lightning` installs
    logging.getLogger("lightning.pytorch").propagate = True
    root_handler = logging.StreamHandler(root_stream)
    root = logging.getLogger()
    root.addHandler(root_handler)
    try:
        route_library_logs()
        route_library_logs()  # idempotent
        rank_zero_info("GPU available: a test line")
        rank_zero_info("💡 Tip: For seamless cloud logging try installing [litlogger](https://pypi.org/project/litlogger/)")
    finally:
        root.removeHandler(root_handler)
    assert root_stream.getvalue().count("GPU available: a test line") == 1
    assert own.getvalue() == ""
    assert "litlogger" not in root_stream.getvalue()


# --------------------------------------------------------------------------- the config tree
def test_the_config_tree_has_a_branch_per_group_and_no_escape_codes_off_a_terminal(tmp_path):
    cfg = compose("train", [*TINY, f"hydra.run.dir={tmp_path}"])
    stream = io.StringIO()
    print_config_tree(cfg, stream)
    text = stream.getvalue()
    assert text.startswith("config\n")
    branches = re.findall(r"^[├└]── (.+)$", text, flags=re.MULTILINE)
    assert branches[:6] == ["data", "model", "callbacks", "logger", "trainer", "paths"]
    assert "hydra" not in branches and "(top level)" in branches
    assert "nf: 8" in text and "seed: 1234" in text
    assert f"output_dir: {tmp_path}" in text  # interpolations resolved
    assert not ESCAPE.search(text) and "\r" not in text
    assert len(config_tree(cfg).children) == len(branches)


# --------------------------------------------------------------------------- progress and summary
def test_progress_is_a_rich_bar_on_a_terminal_and_plain_lines_elsewhere():
    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar

    assert isinstance(progress_bar(terminal=True), RichProgressBar)
    plain = progress_bar(every_n_steps=7, terminal=False)
    assert isinstance(plain, PlainProgress) and plain.every_n_steps == 7 and plain.is_enabled
    assert not progress_bar(refresh_rate=0, terminal=False).is_enabled
    assert not progress_bar(refresh_rate=0, terminal=True).is_enabled
    assert type(model_summary(terminal=False)) is ModelSummary
    assert isinstance(model_summary(terminal=True), RichModelSummary)
    with pytest.raises(ValueError, match="every_n_steps"):
        progress_bar(every_n_steps=0)


def test_the_model_summary_counts_the_real_flops_of_the_network():
    """Lightning's summary said `Total FLOPs: 0` (no example input); now one 64x64 forward is counted,
    and it agrees with cirlab's analytic count of the same network (2 FLOPs per multiply-add)."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from cirlab.archs.flops import cresmd_flops
    from cirlab.models.cresmd import CResMD

    model = CResMD(net={"_target_": "cirlab.archs.cresmd.CResMDNet", "nf": 8, "nb": 2},
                   optimizer={"_target_": "torch.optim.Adam", "_partial_": True})
    summary = ModelSummary(model, max_depth=1)
    size = model.SUMMARY_SIZE
    analytic = cresmd_flops(nf=8, nb=2, height=size, width=size)
    # the analytic count is the convolutions; the counter adds the conditioning MLP's matmuls
    assert analytic <= summary.total_flops <= 1.05 * analytic
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.training  # the summary ran in eval mode and left the module as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- a real job
@pytest.mark.slow
def test_a_training_job_prints_each_message_once_and_logs_no_terminal_codes(tmp_path, shared_cache):
    """`cirlab-train` with output redirected to files (not a terminal), W&B offline."""
    run_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "CIRLAB_"))}
    env.update(NETRC=str(tmp_path / "no-netrc"), WANDB_DIR=str(tmp_path))  # no credentials: offline
    overrides = [*TINY, "logger=wandb", "trainer.max_steps=6", "callbacks.progress_bar.refresh_rate=1",
                 "callbacks.progress_bar.every_n_steps=2", f"hydra.run.dir={run_dir}",
                 f"paths.root_dir={tmp_path}", f"paths.cache_dir={shared_cache}"]
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
        done = subprocess.run([sys.executable, "-m", "cirlab.cli.train", *overrides], cwd=tmp_path, env=env,
                              stdout=out, stderr=err, timeout=600)
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert done.returncode == 0, stderr[-3000:]
    log_file = (run_dir / "train.log").read_text()

    # the composed config, as a tree, before anything else
    assert stdout.startswith("config\n├── data\n")
    # no bar redraws or colour codes where the output is a file
    for name, text in (("stdout", stdout), ("train.log", log_file)):
        assert "\r" not in text and not ESCAPE.search(text), f"terminal codes in {name}"
    # each log record once: Lightning's lines come through Hydra's handlers only (not also as `INFO: ...`)
    records = [LOG_LINE.match(line) for line in stdout.splitlines()]
    records = [(m["name"], m["message"]) for m in records if m]
    lightning = [r for r in records if r[0].startswith("lightning")]
    assert any("Seed set to" in message for _, message in lightning)
    assert len(lightning) == len(set(lightning)), f"repeated: {lightning}"
    assert not re.search(r"^INFO: ", stdout + stderr, flags=re.MULTILINE)
    # ... and into the job's log file as well
    assert "Seed set to" in log_file and "GPU available" in log_file
    # plain progress lines instead of a bar
    assert re.search(r"\[cirlab\.progress\]\[INFO\] - train: epoch \d+, step 2/6", log_file)
    assert "validation at step 6: val/psnr=" in log_file
    # the summary (Lightning's plain table off a terminal, logged): real FLOPs (it printed 0 without
    # an example input), a 64x64 forward of the tiny CResMD is 16.4 M
    flops = re.search(r"^([\d.]+) ([KMG]?) +Total Flops$", log_file, flags=re.MULTILINE)
    assert flops and float(flops[1]) > 0 and flops[2] == "M", log_file[-3000:]
    assert "┃" not in stdout  # not the Rich table, wrapped at 80 columns in a file
    # messages that were in every run
    everything = stdout + stderr
    assert "litlogger" not in everything
    assert "anonymous setting has no effect" not in everything
    assert "`weights_only` was not set" not in everything


@pytest.mark.slow
def test_the_plain_progress_lines_of_an_in_process_run(train_cfg, caplog):
    from cirlab.training import train

    caplog.set_level(logging.INFO, logger="cirlab.progress")
    cfg = train_cfg("trainer.max_steps=4", "data.batches_per_epoch=2", "test=false",
                    "callbacks.progress_bar.refresh_rate=1", "callbacks.progress_bar.every_n_steps=2")
    train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "cirlab.progress"]
    steps = [line for line in lines if line.startswith("train:")]
    assert [re.search(r"step (\d+)/4", line)[1] for line in steps] == ["2", "4"]
    assert "train/l1=" in steps[0]
    assert sum(line.startswith("validation at step") for line in lines) == 2
    assert len(lines) == len(set(lines))



def test_the_hydra_callback_prints_the_tree_on_rank_zero_only(tmp_path, capsys, monkeypatch, lightning_handler_restored):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from cirlab.utils.console import ConsoleSetup

    cfg = compose("train", [*TINY, f"hydra.run.dir={tmp_path}"])
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    ConsoleSetup().on_job_start(config=cfg)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    ConsoleSetup().on_job_start(config=cfg)
    assert capsys.readouterr().out.startswith("config\n├── data")
    ConsoleSetup(print_config=False).on_job_start(config=cfg)
    assert capsys.readouterr().out == ""

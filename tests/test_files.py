"""Result files are written whole or not at all, and interrupted writes leave no litter."""

from pathlib import Path

import pytest

from cirlab.utils.files import atomic_path
from cirlab.utils.run import write_json_atomically


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out" / "result.json"
    write_json_atomically(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]  # no temporary left behind


# ------------------------------------------------------------------ no litter (issue 15.7)
WRITER = """
import sys, time
from cirlab.utils.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a checkpoint")
    print(tmp, flush=True)
    time.sleep(120)
"""


def test_a_killed_writers_temporary_is_removed_by_the_next_write_and_a_live_ones_is_kept(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import torch

    from cirlab.checkpoints import save_torch_file

    target = tmp_path / "cache" / "set.pt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(writer.stdout.readline().strip())
        assert tmp.is_file() and tmp.name.startswith(".set.pt.") and f".{writer.pid}." in tmp.name
        save_torch_file({"a": torch.zeros(2)}, target)  # a live writer's temporary is not touched
        assert tmp.is_file()
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    assert tmp.is_file()  # the kill left it
    save_torch_file({"a": torch.ones(2)}, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["set.pt"]


def test_old_temporaries_of_unknown_writers_go_and_other_targets_temporaries_stay(tmp_path):
    import os
    import time

    from cirlab.utils.files import STALE_AFTER_S

    target = tmp_path / "figure.png"
    old_other_host = tmp_path / ".figure.png.node17.cluster.4242.abcdef.tmp"
    new_other_host = tmp_path / ".figure.png.node17.cluster.4243.abcdef.tmp"
    old_format = tmp_path / f".figure.png.{'0' * 32}.tmp"
    other_target = tmp_path / ".figure.png.csv.node17.1.ab.tmp"  # another target's, recent: kept
    unrelated = tmp_path / ".table.md.node17.1.ab.tmp"
    for p in (old_other_host, new_other_host, old_format, other_target, unrelated):
        p.write_bytes(b"")
    past = time.time() - STALE_AFTER_S - 60
    for p in (old_other_host, old_format, unrelated):
        os.utime(p, (past, past))
    with atomic_path(target) as tmp:
        tmp.write_text("png")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["figure.png", new_other_host.name, other_target.name, unrelated.name])

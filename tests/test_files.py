"""Result files are written whole or not at all."""

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

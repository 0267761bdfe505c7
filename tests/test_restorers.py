"""cirlab.evaluation.restorers: one restore/FLOPs interface over every checkpoint kind, on tiny real
checkpoints; outputs equal the networks' own, FLOPs equal the counted ones, scalar HyperRes limits."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cirlab.checkpoints import CheckpointError
from cirlab.evaluation.restorers import Restorer, load_restorer
from cirlab.tasks import level_grid
from eval_testing import KINDS, make_checkpoint

TASKS = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.3, 0.0], [1.0, 1.0, 0.0], [0.0, 0.3, 1.0], [0.5, 0.5, 0.5]])


def counted_flops(function) -> int:
    """Convolution and matrix-product FLOPs that FlopCounterMode counts while ``function`` runs."""
    with FlopCounterMode(display=False) as counter:
        function()
    return int(sum(counter.get_flop_counts()["Global"].values()))


@pytest.mark.parametrize("kind", KINDS)
def test_every_checkpoint_kind_loads_and_restores_in_range(tmp_path, kind):
    path = make_checkpoint(kind, tmp_path, seed=1)
    restorer = load_restorer(str(path))
    assert isinstance(restorer, Restorer) and restorer.kind == kind
    assert restorer.name.startswith(f"{kind}:")
    tasks = TASKS[[0, 1, 2]] if kind not in ("hyperres", "hyperres_dedicated") else torch.tensor(
        [[0.0, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 1.0, 0.0]])
    image = torch.rand(1, 3, 18, 22)
    out = restorer.restore(image, tasks)
    assert out.shape == (3, 3, 18, 22) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert restorer.flops(tasks, 18, 22) > 0
    named = load_restorer(f"my model={path}")
    assert named.name == "my model" and named.kind == kind


@pytest.mark.parametrize("kind", ["cresmd", "tasnet", "tasnet_finetune"])
def test_network_restorers_equal_the_network_and_count_its_flops(tmp_path, kind):
    from cirlab.checkpoints import load_network

    path = make_checkpoint(kind, tmp_path, seed=2)
    restorer = load_restorer(str(path))
    net = load_network(path)
    image = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        expected = torch.cat([net(image, task[None]) for task in TASKS]).clamp(0, 1)
    assert torch.allclose(restorer.restore(image, TASKS), expected, atol=1e-5)
    convs = counted_flops(lambda: restorer.restore(image, TASKS))
    # counted FLOPs also hold the tiny condition MLPs (controllers, scales); the analytic ones are convolutions
    flops = restorer.flops(TASKS, 20, 24)
    assert flops <= convs < flops * 1.02


@pytest.mark.parametrize("sharing", [False, True])
def test_search_state_restores_as_its_derived_network_and_costs_the_same(tmp_path, sharing):
    from cirlab.derivation import derive, load_search_net

    kind = "tasnet_search" if sharing else "tsnet_search"
    path = make_checkpoint(kind, tmp_path, seed=3)
    restorer = load_restorer(str(path))
    derived = derive(load_search_net(path))
    image = torch.rand(1, 3, 16, 20)
    with torch.no_grad():
        expected = derived.restore(image, TASKS).clamp(0, 1)
    assert torch.allclose(restorer.restore(image, TASKS), expected, atol=1e-5)
    assert restorer.flops(TASKS, 16, 20) == derived.flops(TASKS, 16, 20)
    if sharing:  # the prefix counts once: less than the same masks run per task
        assert restorer.flops(TASKS, 16, 20) < sum(restorer.flops(t[None], 16, 20) for t in TASKS)


def test_hyperres_3d_restores_each_task_vector_and_counts_generation(tmp_path):
    path = make_checkpoint("hyperres_3d", tmp_path, seed=4)
    restorer = load_restorer(str(path))
    restorer.max_batch = 2  # mixed-level chunks of two and one
    image = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        expected = torch.cat([restorer.net(image, task) for task in TASKS]).clamp(0, 1)
    assert torch.allclose(restorer.restore(image, TASKS), expected, atol=1e-5)
    restorer.max_batch = 1  # one generated network per pass: what flops() describes
    assert counted_flops(lambda: restorer.restore(image, TASKS)) == restorer.flops(TASKS, 20, 24)


def test_scalar_hyperres_takes_only_its_own_axis(tmp_path):
    restorer = load_restorer(str(make_checkpoint("hyperres", tmp_path / "dn", seed=5)))
    image = torch.rand(1, 3, 16, 16)
    noise_only = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 1.0, 0.0]])
    with torch.no_grad():  # sigma = 50 t, the network sees sigma / 255
        expected = torch.cat([restorer.net(image, sigma / 255) for sigma in (0.0, 15.0, 50.0)]).clamp(0, 1)
    assert torch.allclose(restorer.restore(image, noise_only), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"only non-zero component is noise.*tasks\[1\]"):
        restorer.restore(image, level_grid("cresmd27")[:3])
    with pytest.raises(ValueError, match="only non-zero component"):
        restorer.flops(level_grid("cresmd27"), 16, 16)

    dejpeg = load_restorer(str(make_checkpoint("hyperres", tmp_path / "dj", seed=5, task="dejpeg")))
    q80 = torch.tensor([[0.0, 0.0, 22 / 92]])
    with torch.no_grad():
        assert torch.allclose(dejpeg.restore(image, q80), dejpeg.net(image, 80 / 255).clamp(0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="no JPEG removal"):
        dejpeg.restore(image, torch.zeros(1, 3))

    sr = load_restorer(str(make_checkpoint("hyperres", tmp_path / "sr", seed=5, task="sr")))
    with pytest.raises(ValueError, match="protocol=levels"):
        sr.restore(image, q80)


def test_bad_inputs_name_the_file_or_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_restorer(str(tmp_path / "missing.ckpt"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.ckpt.*not a cirlab checkpoint"):
        load_restorer(str(foreign))
    restorer = load_restorer(str(make_checkpoint("cresmd", tmp_path)))
    with pytest.raises(ValueError, match="outside the task range"):
        restorer.restore(torch.rand(1, 3, 8, 8), torch.tensor([[0.0, 1.5, 0.0]]))
    with pytest.raises(ValueError, match="one image"):
        restorer.restore(torch.rand(2, 3, 8, 8), TASKS)

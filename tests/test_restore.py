"""restore(): the shared prefix once for M tasks, equal to per-task calls, tiles equal to one pass,
mixed precision, CResMD checkpoints, analytic FLOPs against FlopCounterMode, the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from cirlab.archs.cresmd import CResMDNet
from cirlab.archs.tasnet import TASNet
from cirlab.archs.tasnet_spec import receptive_radius
from cirlab.checkpoints import load_network
from cirlab.cli.restore import main
from cirlab.derivation import derive
from cirlab.figures import contact_sheet
from cirlab.inference import restore, restore_flops
from cirlab.tasks import level_grid, parse_tasks
from tasnet_testing import NB, NF, search_state

TASKS = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.3, 0.0], [1.0, 1.0, 0.0], [0.0, 0.3, 1.0], [1.0, 0.0, 0.24],
                      [0.5, 0.5, 0.5]])


def tasnet(shared: int = 3, seed: int = 0, **kwargs) -> TASNet:
    return derive(search_state(shared, seed=seed, **kwargs))


@pytest.mark.parametrize("shared", [1, 3, 6, 7])
def test_prefix_runs_once_for_m_tasks_and_restore_equals_per_task_calls(shared):
    net = tasnet(shared, seed=shared)
    image = torch.rand(3, 21, 30)
    calls = []
    hook = net.conv_first.register_forward_hook(lambda *args: calls.append(1))  # conv_first is in the prefix
    with torch.no_grad():
        out = net.restore(image, TASKS)
    hook.remove()
    assert calls == [1] and net.runtime.prefix_calls == 1
    assert out.shape == (len(TASKS), 3, 21, 30)
    with torch.no_grad():
        single = torch.cat([net(image[None], task[None]) for task in TASKS])
    assert torch.allclose(out, single, atol=1e-5, rtol=0)
    assert net.runtime.prefix_calls == 1 + len(TASKS)
    # the prefix's features do not depend on the task vectors
    with torch.no_grad():
        padded = torch.nn.functional.pad(image[None], (0, 0, 0, 1), mode="replicate")
        first, second = net.runtime.run_prefix(padded), net.runtime.run_prefix(padded)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_tasks_with_equal_channels_run_as_one_batch():
    net = tasnet(2, seed=4)
    tasks = torch.cat([TASKS, TASKS[:3]])  # repeated tasks: same channels
    groups = net.runtime.groups(tasks)
    assert len(groups) <= len(TASKS)
    sizes = sorted(len(rows) if rows is not None else len(tasks) for rows, _ in groups)
    assert sum(sizes) == len(tasks) and max(sizes) >= 2
    image = torch.rand(3, 16, 16)
    calls = []
    original = net.runtime.run_specific

    def counted(prefix, padded, cond, sels):
        calls.append(cond.shape[0])
        return original(prefix, padded, cond, sels)

    net.runtime.run_specific = counted
    with torch.no_grad():
        out = net.restore(image, tasks)
        batched = list(calls)
        calls.clear()
        capped = net.restore(image, tasks, max_batch=1)
    assert sorted(batched) == sizes and calls == [1] * len(tasks)
    assert torch.allclose(out, capped, atol=1e-6) and torch.allclose(out[:3], out[len(TASKS):], atol=1e-6)


@pytest.mark.parametrize(("height", "width", "tile"), [(61, 75, 32), (64, 50, 30), (33, 90, 41)])
def test_tiled_restore_equals_untiled(height, width, tile):
    net = tasnet(3, seed=1)
    image = torch.rand(3, height, width)
    whole = restore(net, image, TASKS)
    tiled = restore(net, image, TASKS, tile=tile)
    assert torch.allclose(tiled, whole, atol=1e-4, rtol=0)
    assert torch.allclose(restore(net, image, TASKS, channels_last=False), whole, atol=1e-5, rtol=0)
    if tile == 32:  # a context smaller than the receptive radius shows seams: the default makes it exact
        assert not torch.allclose(restore(net, image, TASKS, tile=tile, overlap=2), whole, atol=1e-4, rtol=0)


def test_receptive_radius_bounds_the_measured_receptive_field():
    torch.manual_seed(0)
    net = CResMDNet(nf=NF, nb=NB).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        size, centre = 80, 40
        x = torch.rand(1, 3, size, size)
        bumped = x.clone()
        bumped[..., centre, centre] += 1.0
        change = (net(bumped, torch.full((1, 3), 0.5)) - net(x, torch.full((1, 3), 0.5))).abs().amax(dim=(0, 1))
    rows, cols = torch.nonzero(change > 0, as_tuple=True)
    reach = int(max((rows - centre).abs().max(), (cols - centre).abs().max()))
    assert receptive_radius(NB) - 2 <= reach <= receptive_radius(NB)


def test_cresmd_checkpoint_restores_with_everything_task_specific(tmp_path):
    from cirlab.models.cresmd import CResMD

    torch.manual_seed(0)
    module = CResMD(net={"_target_": "cirlab.archs.cresmd.CResMDNet", "nf": NF, "nb": NB},
                    optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3})
    path = tmp_path / "cresmd.ckpt"
    import lightning

    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "cirlab_module": "cirlab.models.cresmd.CResMD", "pytorch-lightning_version": lightning.__version__}, path)
    net = load_network(path)
    assert isinstance(net, CResMDNet)
    image = torch.rand(3, 19, 24)
    out = restore(path, image, TASKS, max_batch=4)
    with torch.no_grad():
        expected = net(image[None].expand(len(TASKS), -1, -1, -1), TASKS)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(restore(net, image, TASKS, tile=12), out, atol=1e-4)
    with FlopCounterMode(display=False) as counter:
        restore(net, image, TASKS)
    assert conv_flops(counter) == restore_flops(net, TASKS, 19, 24)
    with pytest.raises(ValueError, match="cirlab-derive"):
        load_network(search_state(2))


def test_bf16_autocast_on_cpu_is_close_and_returns_float32():
    net = tasnet(3, seed=2)
    image = torch.rand(3, 24, 32)
    exact = restore(net, image, TASKS)
    mixed = restore(net, image, TASKS, autocast="bf16")
    assert mixed.dtype == torch.float32
    assert (mixed - exact).abs().max() < 0.05
    assert not torch.equal(mixed, exact)  # it did run in bf16
    with pytest.raises(ValueError, match="autocast"):
        restore(net, image, TASKS, autocast="int8")


@pytest.mark.parametrize("shared", [1, 2])
def test_bf16_autocast_with_task_groups_ending_in_different_dtypes(shared):
    """Under autocast one task group can end in bf16 and another in fp32 (a bias-only map);
    the result must still be assembled (it raised "Index put requires ... dtypes match")."""
    tasks = level_grid("cresmd27")
    for seed in range(3):  # (1, 2), (2, 0) and (2, 1) raised before the fix
        net = tasnet(shared, seed=seed)
        image = torch.rand(1, 3, 16, 16)
        mixed = restore(net, image, tasks, autocast="bf16")
        assert mixed.dtype == torch.float32
        assert (mixed - restore(net, image, tasks)).abs().max() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_on_gpu(precision):
    net = tasnet(3, seed=2).cuda()
    image = torch.rand(3, 64, 48)
    exact = restore(net, image.cuda(), TASKS)
    mixed = restore(net, image, TASKS, autocast=precision, tile=32)  # CPU image, GPU network
    assert mixed.device.type == "cpu" and (mixed - exact.cpu()).abs().max() < 0.05


def conv_flops(counter: FlopCounterMode) -> int:
    return sum(n for op, n in counter.get_flop_counts().get("Global", {}).items() if "convolution" in str(op))


@pytest.mark.parametrize(("shared", "empty_shared", "empty_specific"), [(0, None, None), (3, None, None),
                                                                       (4, 1, 6), (7, None, None)])
def test_analytic_flops_equal_the_counted_flops_of_restore(shared, empty_shared, empty_specific):
    net = tasnet(shared, seed=10 + shared, empty_shared=empty_shared, empty_specific=empty_specific)
    image = torch.rand(3, 23, 36)
    for tasks in (TASKS[1:3], TASKS):
        with FlopCounterMode(display=False) as counter:
            restore(net, image, tasks)
        assert conv_flops(counter) == net.flops(tasks, 23, 36) == restore_flops(net, tasks, 23, 36)
        cost = net.cost(tasks, 23, 36)
        assert cost["total"] == net.flops(tasks, 23, 36) and len(cost["per_task"]) == len(tasks)
    # the prefix counts once: two tasks cost less than twice one task where something is shared
    one, two = net.flops(TASKS[1:2], 23, 36), net.flops(TASKS[1:2].expand(2, -1), 23, 36)
    assert (two < 2 * one) == (shared > 0)


def test_parse_tasks_and_contact_sheet():
    assert torch.equal(parse_tasks("0,0.3,0; 1,1,0"), torch.tensor([[0.0, 0.3, 0.0], [1.0, 1.0, 0.0]]))
    for bad in ("0,0.3", "a,b,c", "0,2,0", "", "nan,0,0", "0,inf,0"):
        with pytest.raises(ValueError):
            parse_tasks(bad)
    sheet = contact_sheet([torch.rand(3, 40, 60)] * 5, [f"t{i}" for i in range(5)], thumb=30)
    assert sheet.size[0] > 3 * 30 and sheet.size[1] > 2 * 20


def test_cirlab_restore_command_writes_images_and_contact_sheet(tmp_path, capsys):
    net = tasnet(3, seed=3)
    ckpt = net.save(tmp_path / "tasnet.ckpt")
    image = (torch.rand(33, 47, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(image).save(tmp_path / "in.png")
    out = tmp_path / "out"
    assert main(["--ckpt", str(ckpt), "--image", str(tmp_path / "in.png"), "--tasks", "0,0.3,0;1,1,0",
                 "--out", str(out), "--device", "cpu"]) == 0
    pngs = sorted(p.name for p in out.glob("in_*_t*.png"))
    assert pngs == ["in_00_t0.00_0.30_0.00.png", "in_01_t1.00_1.00_0.00.png"]
    assert Image.open(out / pngs[0]).size == (47, 33)
    assert (out / "in_contact.png").stat().st_size > 1_000
    manifest = json.loads((out / "in_tasks.json").read_text())
    assert manifest["outputs"][1]["label"].startswith("t=(1.00,1.00,0.00) r4.0 s50")
    # the written image is the clamped, rounded restore()
    expected = restore(TASNet.load(ckpt), torch.from_numpy(image).permute(2, 0, 1).float() / 255, torch.tensor([[0, 0.3, 0]]))
    written = torch.from_numpy(np.array(Image.open(out / pngs[0]))).permute(2, 0, 1).float()
    assert (written - (expected[0].clamp(0, 1) * 255).round()).abs().max() <= 1
    assert main(["--ckpt", str(ckpt), "--image", str(tmp_path / "in.png"), "--grid", "single", "--tile", "16",
                 "--out", str(tmp_path / "grid")]) == 0
    assert len(list((tmp_path / "grid").glob("in_*_t*.png"))) == 7
    assert main(["--ckpt", str(ckpt), "--image", str(tmp_path / "in.png"), "--tasks", "1,2", "--out", str(out)]) == 2
    assert "--tasks" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["tasnet", "cresmd"])
def test_an_hwc_image_runs_channels_last(kind):
    """(3, H, W) views of an HWC array (numpy images) have a batch stride that makes oneDNN pick
    NCHW for the whole network (about 1.5x slower on CPU): restore() gives them canonical strides."""
    torch.manual_seed(0)
    net = tasnet(3, seed=1) if kind == "tasnet" else CResMDNet(nf=NF, nb=NB).eval()
    image = torch.rand(16, 20, 3).permute(2, 0, 1)  # HWC memory
    layouts = []
    hook = net.conv_first.register_forward_hook(
        lambda module, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)
                                                 and not out.is_contiguous()))
    out = restore(net, image, TASKS[:2])
    hook.remove()
    assert layouts == [True] * len(layouts) and layouts
    assert torch.allclose(out, restore(net, image.contiguous(), TASKS[:2], channels_last=False), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("args", "flag"), [
    (["--tasks", "nan,0,0"], "--tasks 'nan,0,0'"),  # passed [0, 1] checks: an all-black image, then a crash
    (["--tasks", "0,inf,0"], "--tasks '0,inf,0'"),
    (["--grid", "single", "--max-batch", "-1"], "--max-batch=-1"),
    (["--grid", "single", "--max-batch", "0"], "--max-batch=0"),
    (["--grid", "single", "--thumb", "0"], "--thumb=0"),
    (["--grid", "single", "--tile", "0"], "--tile=0"),
    (["--grid", "single", "--overlap", "-2"], "--overlap=-2"),
    (["--grid", "single", "--device", "gpu7"], "--device='gpu7'"),
    (["--grid", "single", "OUT_IS_A_FILE"], "is an existing file"),  # was: failed after all the restoring
])
def test_bad_options_are_named_before_anything_is_restored(tmp_path, capsys, monkeypatch, args, flag):
    import cirlab.cli.restore as cli

    ckpt = tasnet(3, seed=3).save(tmp_path / "tasnet.ckpt")
    Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "in.png")
    out = tmp_path / "out"
    if "OUT_IS_A_FILE" in args:
        args = [a for a in args if a != "OUT_IS_A_FILE"]
        out.write_text("a file the user keeps")

    def no_restore(*a, **k):
        raise AssertionError("restore() ran before the options were checked")

    monkeypatch.setattr(cli, "restore", no_restore)
    assert cli.main(["--ckpt", str(ckpt), "--image", str(tmp_path / "in.png"), "--out", str(out), *args]) == 2
    assert flag in capsys.readouterr().err
    assert (not out.exists()) or out.read_text() == "a file the user keeps"


def test_restore_checks_its_task_vectors_and_batch_size():
    net = tasnet(3, seed=3)
    image = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="outside"):
        restore(net, image, torch.tensor([[float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="max_batch=0"):
        restore(net, image, TASKS, max_batch=0)

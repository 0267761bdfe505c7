"""cirlab.export / cirlab-export: every network kind round-trips through safetensors + JSON, loads in a
process that never imports Lightning, computes exactly what the original network computes; damaged or
foreign files give errors naming the file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cirlab.checkpoints import TASNET_FORMAT, CheckpointError, load_module, read_checkpoint
from cirlab.cli.export import main as export_main
from cirlab.export import FORMAT, ExportError, export_checkpoint, load_exported
from eval_testing import KINDS, make_checkpoint

TASK = [[0.25, 0.6, 0.5]]
LEVEL = 25.0 / 255.0


def original_network(path: Path) -> torch.nn.Module:
    checkpoint = read_checkpoint(path)
    if checkpoint.get("format") == TASNET_FORMAT:
        from cirlab.archs.tasnet import TASNet

        return TASNet.from_checkpoint(checkpoint).eval()
    return load_module(path).net.eval()


def call(net: torch.nn.Module, kind: str, image: torch.Tensor) -> torch.Tensor:
    """The forward each kind takes: task vector, scalar level, or image only (dedicated MainNet)."""
    with torch.no_grad():
        if kind == "hyperres_dedicated":
            return net(image)
        if kind == "hyperres":
            return net(image, LEVEL)
        return net(image, torch.tensor(TASK))


# the loader process: must not import Lightning (nor cirlab's training or data code) to rebuild a network
LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from cirlab.export import load_exported
    jobs = json.loads(sys.argv[1])
    inputs = load_file(sys.argv[2])
    outputs = {}
    for kind, source in jobs.items():
        net = load_exported(source)
        image = inputs["image"]
        with torch.no_grad():
            if kind == "hyperres_dedicated":
                out = net(image)
            elif kind == "hyperres":
                out = net(image, %r)
            else:
                out = net(image, torch.tensor(%r))
        outputs[kind] = out.contiguous()
    save_file(outputs, sys.argv[3])
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "hydra")
                   or m.startswith(("cirlab.models", "cirlab.data", "cirlab.training", "cirlab.checkpoints")))
    print(json.dumps(heavy))
""") % (LEVEL, TASK)


def test_every_kind_round_trips_without_lightning_and_computes_the_same(tmp_path, capsys):
    image = torch.rand(1, 3, 14, 18)
    jobs, expected = {}, {}
    for kind in KINDS:
        ckpt = make_checkpoint(kind, tmp_path / "ckpt" / kind, seed=3)
        out = tmp_path / "export" / kind
        assert export_main(["--ckpt", str(ckpt), "--out", str(out), "--name", kind]) == 0
        assert f"{kind}.safetensors" in capsys.readouterr().out
        meta = json.loads((out / f"{kind}.json").read_text())
        net = original_network(ckpt)
        assert meta["format"] == FORMAT and meta["class"] == f"{type(net).__module__}.{type(net).__name__}"
        assert meta["parameters"] == sum(p.numel() for p in net.parameters())
        assert meta["source_checkpoint"] == str(ckpt.resolve()) and meta["cirlab_version"]
        weights = load_file(out / f"{kind}.safetensors")
        assert set(weights) == set(net.state_dict())
        if kind in ("tasnet", "tasnet_finetune"):
            assert meta["args"]["architecture"] == json.loads(json.dumps(net.architecture))
        jobs[kind] = str(out if kind != "cresmd" else out / f"{kind}.safetensors")  # folder or file both load
        expected[kind] = call(net, kind, image)
    save_file({"image": image}, tmp_path / "in.safetensors")
    result = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs), str(tmp_path / "in.safetensors"),
                             str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], "the loader imported training code"
    got = load_file(tmp_path / "out.safetensors")
    for kind in KINDS:
        assert got[kind].shape == expected[kind].shape, kind
        assert torch.equal(got[kind], expected[kind]), f"{kind}: the exported network computes something else"


def test_a_naively_shared_tasnet_built_from_config_exports_its_architecture(tmp_path):
    """model.net names the function naive_shared: the export records the TASNet it built, not the function."""
    from cirlab.models.tasnet_finetune import TASNetFinetune
    from eval_testing import ADAM, save_module

    module = TASNetFinetune(optimizer=ADAM, net={"_target_": "cirlab.archs.tasnet.naive_shared", "nf": 8, "nb": 2,
                                                  "shared_maps": 3})
    ckpt = save_module(module, tmp_path / "naive.ckpt")
    json_path, _ = export_checkpoint(ckpt, tmp_path / "out")
    meta = json.loads(json_path.read_text())
    assert meta["class"] == "cirlab.archs.tasnet.TASNet" and meta["args"]["architecture"]["shared_maps"] == 3
    image = torch.rand(1, 3, 12, 16)
    assert torch.equal(call(load_exported(json_path), "tasnet", image), call(module.net.eval(), "tasnet", image))


@pytest.fixture
def exported(tmp_path) -> Path:
    json_path, _ = export_checkpoint(make_checkpoint("cresmd", tmp_path / "ckpt"), tmp_path / "out", "net")
    return json_path


def test_damaged_or_foreign_weights_name_the_file(exported):
    weights = exported.with_suffix(".safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"net\.safetensors.*SHA-256"):
        load_exported(exported)
    meta = json.loads(exported.read_text())
    meta.pop("sha256")  # without the digest the reader itself must notice the damage
    exported.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"net\.safetensors: cannot be read as safetensors"):
        load_exported(exported)
    # a valid safetensors file of other weights
    save_file({"conv.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(ExportError, match=r"net\.safetensors: does not hold the weights .*missing"):
        load_exported(exported)


def test_wrong_shapes_name_the_file(tmp_path, exported):
    weights = exported.with_suffix(".safetensors")
    state = load_file(weights)
    key = next(iter(state))
    state[key] = torch.zeros(1)
    save_file(state, weights)
    meta = json.loads(exported.read_text())
    meta.pop("sha256")
    exported.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=rf"net\.safetensors: tensor shapes differ.*{key}"):
        load_exported(weights)


@pytest.mark.parametrize("change, message", [
    (lambda m: "{not json", r"net\.json: not valid JSON"),
    (lambda m: json.dumps({**m, "format": "something.else"}), r"net\.json: not a cirlab export"),
    (lambda m: json.dumps({**m, "format_version": 99}), r"net\.json: format_version 99"),
    (lambda m: json.dumps({**m, "class": "os.system"}), r"net\.json: class 'os.system' is not a network of cirlab"),
    (lambda m: json.dumps({**m, "class": "cirlab.archs.cresmd.Nothing"}), r"net\.json: class .* does not exist"),
    (lambda m: json.dumps({**m, "args": {**m["args"], "nf": 5}}), r"net\.safetensors: tensor shapes differ"),
    (lambda m: json.dumps({**m, "args": {"bogus": 1}}), r"net\.json: 'args' do not build"),
    (lambda m: json.dumps({**m, "weights": "../x.safetensors"}), r"net\.json: 'weights' must be a file name"),
])
def test_damaged_or_foreign_json_names_the_file(exported, change, message):
    exported.write_text(change(json.loads(exported.read_text())))
    with pytest.raises(ExportError, match=message):
        load_exported(exported)


def test_missing_files_and_ambiguous_folders(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match=r"nothing\.json: no such file"):
        load_exported(tmp_path / "nothing.safetensors")
    with pytest.raises(ExportError, match="not a cirlab export"):
        load_exported(exported.with_suffix(".ckpt"))
    other = make_checkpoint("hyperres_3d", tmp_path / "ckpt3")
    export_checkpoint(other, exported.parent, "second")
    with pytest.raises(ExportError, match=r"exactly one .* \(found 2: net\.json, second\.json\)"):
        load_exported(exported.parent)
    assert type(load_exported(exported.parent / "second.json")).__name__ == "HyperResNet"


def test_cli_errors_name_the_checkpoint_and_write_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert export_main(["--ckpt", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "--ckpt=" in capsys.readouterr().err and not (tmp_path / "out").exists()
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.ckpt")
    assert export_main(["--ckpt", str(tmp_path / "foreign.ckpt"), "--out", str(tmp_path / "out")]) == 2
    assert "neither a standalone TASNet" in capsys.readouterr().err
    ckpt = make_checkpoint("cresmd", tmp_path / "ckpt")
    (tmp_path / "file").write_text("x")
    assert export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "file")]) == 2
    assert "--out=" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        export_checkpoint(bad, tmp_path / "out")


def test_export_command_is_installed():
    result = subprocess.run([str(Path(sys.executable).with_name("cirlab-export")), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--ckpt" in result.stdout and "safetensors" in result.stdout


@pytest.mark.slow  # a real (tiny) training run and a console-script process: ~20 s on 2 loaded cores
def test_a_checkpoint_written_by_training_exports_through_the_installed_command(train_cfg, tmp_path):
    """The file Lightning itself writes (not the test helper's imitation), through the console script."""
    from cirlab.training import run_training

    run = run_training(train_cfg("data.batches_per_epoch=2", "trainer.max_steps=2", "test=false"))
    result = subprocess.run([str(Path(sys.executable).with_name("cirlab-export")), "--ckpt", run.last_ckpt,
                             "--out", str(tmp_path / "export")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    net = load_exported(tmp_path / "export")
    original = original_network(Path(run.last_ckpt))
    image = torch.rand(1, 3, 16, 20)
    assert torch.equal(call(net, "cresmd", image), call(original, "cresmd", image))
    assert json.loads((tmp_path / "export" / "last.json").read_text())["source_kind"] == "CResMD"

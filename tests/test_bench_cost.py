"""``cirlab-bench cost``: tiny networks (nf 8, nb 2), 32x48 images, one repeat."""

from __future__ import annotations

import json

import pytest
import torch

from cirlab.archs.cresmd import CResMDNet
from cirlab.archs.flops import cresmd_flops
from cirlab.archs.tasnet import TASNet
from cirlab.bench.cost import (
    bench_cost,
    build_models,
    markdown_table,
    plot_flops_per_task,
)
from cirlab.cli.bench import main as bench_main
from cirlab.derivation import derive
from cirlab.tasks import level_grid
from tasnet_testing import NB, NF, search_state

RES = [(32, 48), (16, 24)]


@pytest.fixture(scope="module")
def record():
    torch.manual_seed(0)
    cresmd = CResMDNet(nf=NF, nb=NB).eval()
    models = {"CResMD": cresmd, "TSNet": derive(search_state(0, seed=1)), "TASNet": derive(search_state(3, seed=2)),
              "naive": TASNet.from_cresmd(cresmd, shared_maps=4).eval()}
    return models, bench_cost(models, RES, repeats=1, warmup=1, threads=(1, None), device="cpu")


def test_every_model_and_resolution_and_flops_match(record):
    models, rec = record
    tasks = level_grid("cresmd27")
    assert set(rec["results"]) == set(models) and len(rec["tasks"]) == 27 and len(rec["labels"]) == 27
    json.dumps(rec)  # plain JSON
    for name, net in models.items():
        for h, w in RES:
            entry = rec["results"][name][f"{h}x{w}"]
            own = net.flops(tasks, h, w) if isinstance(net, TASNet) else cresmd_flops(NF, NB, h, w, tasks=27)
            assert entry["flops"]["total"] == own
            assert entry["flops"]["first_pass"][0] == entry["flops"]["shared"] + entry["flops"]["per_task"][0]
            assert entry["flops_ratio_vs_reference"] == pytest.approx(cresmd_flops(NF, NB, h, w, tasks=27) / own)
            assert set(entry["latency"]) == set(rec["devices"])
            for lat in entry["latency"].values():
                for part in ("first_pass_s", "later_pass_s", "total_s"):
                    assert 0 <= lat[part]["min"] <= lat[part]["median"] <= lat[part]["max"]
    assert rec["results"]["CResMD"]["32x48"]["flops_ratio_vs_reference"] == 1.0
    assert rec["results"]["naive"]["32x48"]["flops"]["shared"] > 0


def test_table_and_plot(record, tmp_path):
    _, rec = record
    table = markdown_table(rec, ["a note"])
    assert "| TASNet |" in table and "## 32x48" in table and "a note" in table
    path = plot_flops_per_task(rec, tmp_path / "f.png")
    assert path.stat().st_size > 1000


def test_cli_writes_json_table_plot(tmp_path):
    out = tmp_path / "cost"
    assert bench_main(["cost", "--nf", "8", "--nb", "2", "--resolutions", "32x48", "--repeats", "1", "--warmup", "0",
                       "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    rec = json.loads((out / "cost.json").read_text())
    assert {"command", "date", "machine", "revision", "notes"} <= set(rec)
    assert set(rec["results"]) == {"CResMD", "CResMD-31%shared", "CResMD-62%shared", "CResMD-99%shared"}
    assert "randomly initialised" in rec["notes"][0]
    assert (out / "cost.md").is_file() and (out / "flops_per_task.png").is_file()


def test_build_models_from_checkpoints(tmp_path):
    tasnet = derive(search_state(3, seed=2))
    tasnet.save(tmp_path / "t.ckpt")
    models, _notes = build_models(tasnet=str(tmp_path / "t.ckpt"), tsnet=str(tmp_path / "t.ckpt"))
    assert list(models)[:3] == ["CResMD", "TSNet", "TASNet"] and models["CResMD"].nf == NF


def test_synthetic_tasnet_has_the_intended_widths_and_paper_scale_savings():
    from cirlab.bench.cost import SYNTHETIC_WIDTHS, synthetic_tasnet

    net = synthetic_tasnet()  # nf 64, nb 32
    tasks = level_grid("cresmd27")
    assert net.shared_maps == 42 and len(net.controllers) == 67 - 42
    masks = net.channel_masks(tasks)
    mean = tasks.mean(dim=1)
    for k, mask in masks.items():
        kind = "out" if k <= 64 and k % 2 == 0 else "inner" if k <= 64 else "upconv" if k == 65 else "HRconv"
        lo, hi = SYNTHETIC_WIDTHS[kind]
        widths = mask.sum(dim=1)
        assert int(widths.min()) == lo and int(widths.max()) == hi
        assert torch.equal(widths[mean.argsort()], widths[mean.argsort()].sort().values)  # wider for harder tasks
    assert len(net.architecture["maps"][0]["channels"]) == SYNTHETIC_WIDTHS["prefix_out"]
    saved = 1 - net.flops(tasks, 180, 320) / cresmd_flops(64, 32, 180, 320, tasks=27)
    assert 0.95 < saved < 0.96  # the paper: 95.7%
    # same channels for tasks of equal mean level: fewer groups than tasks
    assert len(net.runtime.groups(tasks)) < 27


def test_cli_synthetic_interleaved_speedups(tmp_path):
    out = tmp_path / "cost"
    assert bench_main(["cost", "--synthetic", "--naive", "none", "--nf", "16", "--nb", "4", "--resolutions", "32x48",
                       "--repeats", "2", "--warmup", "0", "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    rec = json.loads((out / "cost.json").read_text())
    assert list(rec["results"]) == ["CResMD", "TASNet-synthetic"] and rec["synthetic"] is True
    assert "SYNTHETIC" in " ".join(rec["notes"])
    entry = rec["results"]["TASNet-synthetic"]["32x48"]
    spread = entry["speedup_spread_vs_reference"]["cpu-1t"]
    assert spread["min"] <= entry["speedup_vs_reference"]["cpu-1t"] == spread["median"] <= spread["max"]
    assert entry["efficiency_vs_reference"]["cpu-1t"] == pytest.approx(spread["median"] / entry["flops_ratio_vs_reference"])
    assert len(entry["latency"]["cpu-1t"]["rounds_s"]) == 2
    assert "TASNet-synthetic" in (out / "cost.md").read_text()

"""The data benchmark's CPU-speed reference: the matmul rate and the scaling to 120 GFLOP/s."""

from __future__ import annotations

import pytest
import torch

from cirlab.bench.data import REFERENCE_GFLOPS, matmul_gflops, scaled_to_reference


def test_matmul_rate_is_measured_and_the_thread_count_restored():
    threads = torch.get_num_threads()
    result = matmul_gflops(threads=1, n=128, repeats=3)
    assert torch.get_num_threads() == threads
    assert 0 < result["gflops_worst"] <= result["gflops_median"] <= result["gflops_best"]


def test_a_rate_measured_on_a_slow_cpu_scales_up_to_the_reference():
    assert scaled_to_reference(1000.0, REFERENCE_GFLOPS / 2) == pytest.approx(2000.0)
    assert scaled_to_reference(1000.0, REFERENCE_GFLOPS) == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="gflops"):
        scaled_to_reference(1000.0, 0.0)


def test_bench_data_command_records_its_threads_and_scaled_figures(tmp_path):
    import json

    from cirlab.cli.bench import main

    out = tmp_path / "data.json"
    assert main(["data", "--seconds", "0.2", "--num-workers", "0", "--threads", "1", "--out", str(out)]) == 0
    (record,) = json.loads(out.read_text()).values()
    assert record["command"] == f"cirlab-bench data --seconds 0.2 --num-workers 0 --threads 1 --out {out}"
    (row,) = [r for r in record["results"] if r["device"] == "cpu"]
    assert row["torch_threads"] == 1 and row["num_workers"] == 0
    assert (row["pairs_on"], row["pairs_made_on"]) == ("auto", "device")  # no workers: on the device
    gflops = record["matmul"]["gflops_used"]
    assert row["synthesis_pairs_per_s_at_reference"] == pytest.approx(row["synthesis_pairs_per_s"] * 120 / gflops)
    with pytest.raises(SystemExit, match="--threads 0"):
        main(["data", "--seconds", "0.2", "--threads", "0", "--out", str(out)])
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["data", "--pairs-on", "gpu", "--out", str(out)])


def test_the_whole_pipeline_makes_each_batch_of_pairs_once_where_training_would(monkeypatch):
    """With workers on the CPU, auto makes the pairs in the workers and the transfer hook passes them
    through; every timed batch has its pairs made exactly once, wherever that is."""
    from cirlab.bench.data import bench_pipeline
    from cirlab.data.datamodule import RestorationPairMaker

    calls = {"n": 0}
    make = RestorationPairMaker.__call__

    def counted(self, batch):
        calls["n"] += 1
        return make(self, batch)

    monkeypatch.setattr(RestorationPairMaker, "__call__", counted)  # counts calls in this process only
    device = bench_pipeline("cpu", seconds=0.2, num_workers=0, warmup=1, pairs_on="device")
    assert device["pairs_made_on"] == "device" and calls["n"] == device["batches"] + 1
    calls["n"] = 0
    workers = bench_pipeline("cpu", seconds=0.2, num_workers=1, warmup=1)
    assert (workers["pairs_on"], workers["pairs_made_on"]) == ("auto", "workers")
    assert calls["n"] == 0 and workers["batches"] >= 1 and workers["pairs_per_s"] > 0  # the worker made them

"""``cirlab-bench sharing``: the pipeline's search, derivation, fine-tuning and evaluation per seed
and thread count from one CResMD, tabulated with the searches' agreement statistics."""

from __future__ import annotations

import json

import pytest

from cirlab.cli.bench import main as bench_main
from cirlab.pipeline import run_pipeline
from conftest import compose

TINY_DATA = ("data.batch_size=4 data.patch_size=32 data.batches_per_epoch=3 data.val_crop=48 trainer.max_steps=3 "
             "callbacks.task_grid_picture.crop=48")


@pytest.mark.slow
def test_sharing_study_runs_every_seed_and_thread_count_and_tabulates_them(tmp_path):
    cache = tmp_path / "cache"
    common = [f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache}", "pipeline.derive.height=32",
              "pipeline.derive.width=48", 'pipeline.evaluate.extra="data.test_crop=48"',
              f'pipeline.finetune.extra="{TINY_DATA}"']
    cresmd = run_pipeline(compose("pipeline", [*common, f"hydra.run.dir={tmp_path / 'c'}", "pipeline.stages=[cresmd]",
                                               f'pipeline.cresmd.extra="model=cresmd_tiny {TINY_DATA}"']),
                          tmp_path / "c")["products"]["cresmd_ckpt"]
    out = tmp_path / "study"
    args = ["sharing", "--cresmd", cresmd, "--seeds", "1,2", "--threads", "1", "--out", str(out),
            "--search-extra", f"model=tasnet_search_tiny {TINY_DATA}", "--", *common]
    assert bench_main(args) == 0
    record = json.loads((out / "sharing.json").read_text())
    assert [(r["seed"], r["threads"], r["torch_threads"]) for r in record["results"]] == [(1, 1, 1), (2, 1, 1)]
    for row in record["results"]:
        assert 0 <= row["shared_maps"] <= row["num_maps"] == 7 and 0 < row["flops_ratio"] <= 1
        assert row["tasnet_psnr"] > 0 and row["cresmd_psnr"] > 0 and row["decision"]["rule"] == "declared"
        assert row["agreement"]["steps"] == 3 and set(row["agreement"]["maps"]) == set(row["decision"]["agreement"])
    table = (out / "sharing.md").read_text()
    assert table.count("| 1 | 1 |") == 1 and table.count("| 2 | 1 |") == 1 and "| conv_first |" in table
    assert {"command", "date", "machine", "revision"} <= set(record)

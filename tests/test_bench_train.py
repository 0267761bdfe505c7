"""``cirlab-bench train``: one module for 2 steps writes a well-formed, stamped record; the recipe
projections multiply steps by seconds per step and say "not measured" where nothing was timed."""

from __future__ import annotations

import json

import pytest

from cirlab.bench.train import PIPELINES, parse_variant, projections, recipes
from cirlab.cli.bench import main


def test_two_steps_of_one_module_write_a_stamped_record(tmp_path, shared_cache, capsys):
    out = tmp_path / "train.json"
    code = main(["train", "--experiments", "cresmd_paper", "--device", "cpu", "--steps", "2", "--warmup", "1",
                 "--cache-dir", str(shared_cache), "--out", str(out), "--",
                 "model.net.nf=8", "model.net.nb=1", "data.batch_size=4"])
    assert code == 0
    (key, record), = json.loads(out.read_text()).items()
    assert key.endswith("/cpu/fp32/cresmd_paper/model.net.nf=8 model.net.nb=1 data.batch_size=4")
    assert record["command"].startswith("cirlab-bench train") and record["date"].endswith("UTC")
    assert record["revision"] and record["machine"]["cpu_count"] >= 1 and record["device"] == "cpu"
    assert record["matmul"]["gflops_used"] > 0 and record["matmul"]["reference_gflops"] == 120.0
    (row,) = record["results"]
    assert (row["experiment"], row["module"], row["network"], row["nf"], row["nb"]) == (
        "cresmd_paper", "CResMD", "CResMDNet", 8, 1)
    assert (row["batch"], row["patch"], row["precision"], row["variant"]) == (4, 64, "32-true", "fp32")
    assert len(row["step_s"]) == 2 and len(row["warmup_s"]) == 1 and all(s > 0 for s in row["step_s"])
    assert row["steps_per_s"] == pytest.approx(1 / row["median_s"])
    assert row["steps_per_s_at_reference"] == pytest.approx(
        row["steps_per_s"] * 120.0 / record["matmul"]["gflops_used"])
    assert row["overrides"] == ["model.net.nf=8", "model.net.nb=1", "data.batch_size=4"]
    recipes_by_name = {r["experiment"]: r for r in record["recipes"]}
    cresmd = recipes_by_name["cresmd_paper"]
    assert cresmd["hours"] == pytest.approx(row["median_s"] * 1_000_000 / 3600)
    assert recipes_by_name["cresmd_relative"]["proxy"] and recipes_by_name["tasnet_search_paper"]["hours"] is None
    assert all(p["hours"] is None for p in record["pipelines"])  # the search and fine-tune were not timed
    printed = capsys.readouterr().out
    assert "| cresmd_paper | CResMD | 4 x 64 | cpu | 32-true |" in printed and "not measured" in printed


def test_recipes_read_the_paper_experiments():
    rows = {r["experiment"]: r for r in recipes()}
    assert rows["cresmd_paper"]["steps"] == 1_000_000 and rows["tasnet_search_paper"]["steps"] == 200_000
    assert rows["tasnet_finetune_paper"]["steps"] == 200_000 and rows["cresmd_relative"]["steps"] == 1_000_000
    assert (rows["hyperres_denoise_paper"]["batch"], rows["hyperres_denoise_paper"]["patch"]) == (16, 96)
    assert rows["hyperres_dedicated_paper"]["runs"] == 18  # sigma 5..90 in steps of 5, one network each
    assert "tasnet_paper" not in rows  # a whole pipeline: PIPELINES sums its stages


def test_projections_multiply_steps_by_seconds_and_sum_pipelines():
    recipe_rows = [{"experiment": e, "steps": s, "runs": 1, "batch": 16, "patch": 64} for e, s in
                   (("cresmd_relative", 1_000_000), ("cresmd_paper", 1_000_000), ("tasnet_search_paper", 200_000),
                    ("tasnet_finetune_paper", 200_000))]
    rows, pipelines = projections({"cresmd_paper": 0.01, "tasnet_search_paper": 0.02, "tasnet_finetune_paper": 0.009},
                                  recipe_rows, {"cresmd_paper": "bf16+cl"})
    by_name = {r["experiment"]: r for r in rows}
    assert by_name["cresmd_relative"]["hours"] == pytest.approx(10_000 / 3600) and by_name["cresmd_relative"]["proxy"]
    assert by_name["cresmd_relative"]["variant"] == "bf16+cl"
    target = next(p for p in pipelines if p["pipeline"].startswith("issue 13"))
    assert target["hours"] == pytest.approx((10_000 + 4_000 + 1_800) / 3600)
    assert len(pipelines) == len(PIPELINES)
    rows, pipelines = projections({"cresmd_paper": 0.01}, recipe_rows)
    assert all(p["hours"] is None for p in pipelines)


def test_variants_parse_and_bad_ones_fail_with_the_syntax():
    assert parse_variant("bf16+cl+compile") == {"variant": "bf16+cl+compile", "precision": "bf16-mixed",
                                               "channels_last": True, "compile": True}
    assert parse_variant("fp32")["precision"] == "32-true"
    for bad in ("fp16", "bf16+cl+cl", "fp32+fast"):
        with pytest.raises(ValueError, match="fp32 or bf16"):
            parse_variant(bad)
    with pytest.raises(SystemExit, match="--variants"):
        main(["train", "--variants", "bf16+turbo", "--experiments", "cresmd_paper"])

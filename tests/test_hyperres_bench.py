"""The HyperRes benchmark runs end to end at a tiny size and reports every figure."""

from cirlab.bench.hyperres import bench_hyperres, markdown


def test_bench_hyperres_reports_the_three_measurements():
    result = bench_hyperres(nf=8, nb=2, k=3, batch=1, patch=16, gen_size=32, levels=3, mixed_size=16, repeats=2, warmup=0)
    assert result["parameters"]["hyperres"] > result["parameters"]["main_network"] > 0
    assert set(result["seconds"]) == {"hyper_loop", "hyper_grouped", "plain_k_passes", "trunk_weights", "generate_module",
                                      "forward_generated", "per_level_loop", "mixed_grouped", "mixed_affine"}
    assert all(value > 0 for value in result["seconds"].values())
    assert result["train_step"]["ratio_hyper_loop_vs_plain"] > 0 and result["mixed"]["speedup_grouped_vs_loop"] > 0
    assert markdown(result).count("\n") == 4

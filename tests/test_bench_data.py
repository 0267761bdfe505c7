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

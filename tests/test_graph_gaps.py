"""The kernel-timeline summary of benchmarks/graph_gaps.py on intervals small enough to count by hand."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import pytest  # noqa: E402
import graph_gaps  # noqa: E402


def test_timeline_counts_idle_time_gaps_and_overlaps():
    # kernels at [0, 4), [5, 9) (a 1 µs gap), [8, 12) (starts 1 µs before the previous end), [12, 13) (no gap)
    summary = graph_gaps.timeline([(5.0, 9.0), (0.0, 4.0), (12.0, 13.0), (8.0, 12.0)])
    assert summary["kernels"] == 4 and summary["span_us"] == 13.0
    assert summary["busy_us"] == 12.0 and summary["idle_us"] == 1.0
    assert summary["kernel_sum_us"] == 13.0
    assert summary["overlaps"] == 1 and summary["positive_gaps_us"] == 1.0
    assert summary["median_gap_us"] == 0.0  # gaps 1, -1, 0
    assert "4 kernels, span 13.0 µs" in graph_gaps.describe(summary)


def test_timeline_of_nothing_and_of_nested_kernels():
    assert graph_gaps.timeline([]) == dict(kernels=0)
    assert graph_gaps.describe(graph_gaps.timeline([])) == "no kernels recorded"
    nested = graph_gaps.timeline([(0.0, 10.0), (2.0, 3.0), (11.0, 12.0)])
    assert nested["busy_us"] == pytest.approx(11.0) and nested["idle_us"] == pytest.approx(1.0)
    assert nested["overlaps"] == 1 and nested["positive_gaps_us"] == pytest.approx(1.0)  # gaps -8, then 11 - 10

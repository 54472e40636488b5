"""The kernel timeline of one CUDA-graph replay: how much of the replay's span the GPU spends between kernels.

``replay_timeline(replay)`` runs ``replay()`` (one graph replay) under ``torch.profiler`` with CUDA activity (CUPTI
records the kernels inside a graph) and summarises the kernels' [start, end) intervals with ``timeline``:

- ``span_us``: first kernel start to last kernel end;
- ``busy_us``: the union of the kernel intervals, ``idle_us = span_us - busy_us`` (time no kernel ran: launch gaps);
- gaps: per kernel after the first (in start order), its start minus the latest end before it (negative: it
  started while an earlier kernel ran, as programmatic dependent launch allows): their median, the number of
  overlapping starts, and the sum of the positive ones;
- ``kernel_sum_us``: the kernels' durations summed (under PDL a kernel's interval includes its wait for the
  previous one, so the sum overstates the work; ``span_us`` is what the step costs).
"""
import statistics

import torch


def timeline(intervals: list[tuple[float, float]]) -> dict:
    """The summary above of kernel intervals (start, end) in µs, in any order."""
    if not intervals:
        return dict(kernels=0)
    ordered = sorted(intervals)
    gaps, busy, covered_start, covered_end = [], 0.0, ordered[0][0], ordered[0][1]
    for start, end in ordered[1:]:
        gaps.append(start - covered_end)
        if start > covered_end:
            busy += covered_end - covered_start
            covered_start = start
        covered_end = max(covered_end, end)
    busy += covered_end - covered_start
    span = covered_end - ordered[0][0]
    return dict(kernels=len(ordered), span_us=span, busy_us=busy, idle_us=span - busy,
                kernel_sum_us=sum(end - start for start, end in ordered),
                median_gap_us=statistics.median(gaps) if gaps else 0.0, overlaps=sum(g < 0 for g in gaps),
                positive_gaps_us=sum(g for g in gaps if g > 0))


def replay_timeline(replay) -> dict:
    """``timeline`` of the kernels one call of ``replay`` runs on the GPU (after one unprofiled call)."""
    from torch.profiler import ProfilerActivity, profile

    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    intervals = [(event.time_range.start, event.time_range.end) for event in prof.events()
                 if event.device_type == torch.autograd.DeviceType.CUDA
                 and not event.name.startswith(("Memcpy", "Memset"))]
    return timeline(intervals)


def describe(summary: dict) -> str:
    """One line of a ``timeline`` summary for a report."""
    if not summary.get("kernels"):
        return "no kernels recorded"
    return (f"{summary['kernels']} kernels, span {summary['span_us']:.1f} µs, busy {summary['busy_us']:.1f} µs, "
            f"idle {summary['idle_us']:.1f} µs, median gap {summary['median_gap_us']:.2f} µs, "
            f"{summary['overlaps']} overlapping starts, kernel time sum {summary['kernel_sum_us']:.1f} µs")

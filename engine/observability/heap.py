"""An opt-in heap probe for long runs (`TREEFLOW_HEAP_PROBE=SECONDS`).

Every SECONDS it writes one `HEAP {json}` line to stderr: the process's RSS, the
Python heap (tracemalloc's traced bytes), the objects the collector tracks, the
blocks Python's allocator holds, glibc's view of malloc (bytes in use and bytes held
free, which tell fragmentation from a leak), and the allocation sites that grew most
since the first sample (tracemalloc by file and line). tracemalloc slows the process
down markedly (a soak at 30 executions/s reached 19/s on a loaded machine): this is a
diagnostic, not a metric.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import json
import os
import sys
import time
import tracemalloc
from typing import Any

HEAP_PROBE_ENV = "TREEFLOW_HEAP_PROBE"
#: Allocation sites printed per sample.
TOP_SITES = 12


def interval_from_env() -> float:
    """Seconds between samples, or 0 when the probe is off."""
    raw = os.environ.get(HEAP_PROBE_ENV, "").strip()
    return float(raw) if raw else 0.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_figures() -> dict[str, float] | None:
    """glibc's malloc figures in MB: in use, held free, and mmapped (None off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"malloc_used_mb": info.uordblks / 1e6, "malloc_free_mb": info.fordblks / 1e6,
            "mmap_mb": info.hblkhd / 1e6}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sample(baseline: tracemalloc.Snapshot | None) -> tuple[dict[str, Any], tracemalloc.Snapshot]:
    """One sample (a full collection first) and the snapshot it compared with `baseline`."""
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    figures: dict[str, Any] = {"rss_mb": rss_mb(), "traced_mb": tracemalloc.get_traced_memory()[0] / 1e6,
                               "gc_objects": len(gc.get_objects()), "blocks": sys.getallocatedblocks(),
                               **(malloc_figures() or {})}
    if baseline is not None:
        figures["growth"] = [f"{stat.size_diff / 1e3:+.1f} kB {stat.count_diff:+d} "
                             f"{stat.traceback[0].filename}:{stat.traceback[0].lineno}"
                             for stat in snapshot.compare_to(baseline, "lineno")[:TOP_SITES]]
    return figures, snapshot


async def run(interval: float) -> None:
    """Sample every `interval` seconds until cancelled; growth is against the first sample."""
    if not tracemalloc.is_tracing():
        tracemalloc.start()
    began = time.monotonic()
    baseline = None
    while True:
        await asyncio.sleep(interval)
        figures, snapshot = sample(baseline)
        baseline = baseline or snapshot
        print("HEAP " + json.dumps({"t": round(time.monotonic() - began), **figures}), file=sys.stderr, flush=True)

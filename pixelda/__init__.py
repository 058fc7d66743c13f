"""pixelda: Hydra-configured PixelDA experiments tracked in MLflow.

Importing the package applies two CPU runtime settings before torch loads (the entry points
`python -m pixelda.*` import it first). Both were measured with benchmarks/run.py on a 2-core CPU;
docs/benchmarks.md has the numbers.
"""

import ctypes
import os
import sys

# libgomp's worker threads spin for a while after each parallel region, which starves pixelda's own
# random-number threads (D's noise and dropout). It only takes effect before torch is first
# imported; an explicit setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def _keep_freed_memory_in_heap() -> None:
    """Serve allocations below 64 MB from glibc's heap instead of fresh mmap'd pages.

    With glibc's defaults every step's activations were mapped and unmapped again, and the page
    faults of zero-filling them slowed evaluation by 40%. No-op outside glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


_keep_freed_memory_in_heap()

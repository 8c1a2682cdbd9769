"""Keep the memory that prepare frees inside the process, so that the next slice reuses it.

Each slice allocates and frees about 1.5 MB of arrays: the decoded words (512 KiB for
512 x 512), the windowed slice and the resize sums. With glibc's default settings, freed
blocks above the mmap threshold go back to the kernel, and so does the top of the heap above
the trim threshold. The next slice then page-faults the same memory in again. A one-off count
with getrusage over three .70 benchmark studies found 49 minor page faults per slice with the
defaults and 0.5 with both thresholds raised, and the slices took about 0.2 ms less each.
With both thresholds raised, the heap keeps what it had at its peak, which a prepare worker
reaches with one study, so peak memory does not grow.

mallopt(3) exists in glibc only. Elsewhere keep_freed_memory changes nothing and returns False.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Above the largest single study volume (1,000 slices of 384 x 384 uint8 is 147 MB), so that
# study volumes too come from the heap instead of fresh mappings.
KEEP_BYTES = 256 * 2**20
# mallopt(3) documents 32 MiB as the largest mmap threshold on 64-bit systems. glibc 2.36
# accepted 256 MiB here, but a glibc that applies the documented limit rejects it, and then
# this is the threshold to ask for.
DOCUMENTED_MAX_MMAP_THRESHOLD = 32 * 2**20


def keep_freed_memory(threshold_bytes: int = KEEP_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to `threshold_bytes`; return False where that is impossible."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        logger.debug("no mallopt in this C library; the allocator keeps its defaults")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's is a stub that returns 0. The trim threshold goes
    # first: a raised mmap threshold alone leaves the heap trimmed at every free, which gave
    # 17 times the page faults of the defaults in the same count.
    if mallopt(M_TRIM_THRESHOLD, threshold_bytes) != 1:
        logger.debug("mallopt rejected a %d-byte trim threshold; the allocator keeps its defaults", threshold_bytes)
        return False
    for mmap_threshold in (threshold_bytes, min(threshold_bytes, DOCUMENTED_MAX_MMAP_THRESHOLD)):
        if mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1:
            return True
    # The raised trim threshold alone still removes most of the page faults.
    logger.debug("mallopt rejected a %d-byte mmap threshold; only the trim threshold is raised", threshold_bytes)
    return False

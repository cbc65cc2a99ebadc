"""Host memory on CPU-only runs: freed blocks are kept for the next step instead of returned.

XLA's CPU client mallocs each execution's scratch buffer (0.93 GiB for a 125m step at
2 x 256 tokens) and frees it when the step ends. glibc hands blocks that large back to the
kernel, so every step faults the same memory in again, page by page: 244K minor faults and
about 0.5 CPU-seconds of kernel time per step at that shape, none once the heap has grown
over the first steps with this module's setting (`benchmarks/RESULTS_cpu.md`). The setting:
one malloc arena for every thread (a thread's own arena always maps a block that large
afresh), large blocks from that heap instead of fresh mappings, and no trimming of its top.
The process then keeps what its heap grew to, fragmentation included, until it exits (peak
RSS 1.5-2x glibc's default in the runs measured, up to 2.6x XLA's own count at the 125m full
step); `PHI4_KEEP_HOST_MEMORY=0` turns it off for a run that must fit in less memory.
Accelerator runs are left alone: their steps' scratch lives on the device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os

OPT_OUT_VAR = "PHI4_KEEP_HOST_MEMORY"
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def cpu_only() -> bool:
    """Whether JAX in this process can only choose its CPU backend: JAX_PLATFORMS says so,
    or no accelerator plugin (CUDA, ROCm, TPU) is installed. Decided without starting a
    backend, since the setting must come before the backend's threads allocate."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    if any(importlib.util.find_spec(name) for name in ("libtpu", "jax_plugins")):
        return False  # the TPU runtime, or a plugin in JAX's namespace package
    return not importlib.metadata.entry_points(group="jax_plugins")


def keep_freed_memory() -> bool:
    """Applies the setting in a `cpu_only()` process on glibc, unless
    `PHI4_KEEP_HOST_MEMORY=0`; whether it did.

    Call it before JAX starts a backend: a thread that has allocated already keeps its own
    arena."""
    if os.environ.get(OPT_OUT_VAR, "1").strip() == "0" or not cpu_only():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # pylint: disable=pointless-statement  # glibc, not musl/macOS
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # -1 is SIZE_MAX once glibc widens it: the heap's top is never trimmed
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)

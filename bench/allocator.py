"""The memory allocator: find tcmalloc and re-run the command line under it.

Under glibc's malloc, meta-training, which allocates and frees the same large activations every
inner step, keeps page-faulting fresh memory in. torch asks for 64-byte-aligned blocks; after the
first large block is freed glibc serves them from its heap, but strace shows each new 15 MB block
(75 x 64 x 28 x 28 floats) taken by growing the heap (brk) rather than from the hole the last one
left. Measured with one thread on a 2-core Xeon beside other work (the times are loose, the fault
counts are not): allocating and zeroing such a block 1.9-6.2 ms with ~900-1500
page faults, against 1.0-1.5 ms to zero one already held; under tcmalloc 1.5 ms and no faults. Raising
glibc's trim and mmap thresholds with mallopt did not stop the faults, and glibc's transparent huge pages
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1) made it 27 ms. `python -m bench.perf` measured 1.10-1.47x faster
meta-iterations for metabench and 1.18-1.61x for learn2learn under tcmalloc (Omniglot 5-way 1- and
20-way 1-shot, miniImageNet 5-way 1-shot; MAML and first-order MAML; README: Performance).
`metabench` therefore re-executes itself with tcmalloc
preloaded when the library is installed (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`);
METABENCH_ALLOCATOR=glibc turns that off.

Under glibc, METABENCH_MMAP_THRESHOLD=BYTES (e.g. 131072) makes the task pool (baselines.parallel)
pin malloc's mmap threshold when it starts (`pin_mmap_threshold`). glibc raises the threshold to
the size of each large block freed, after which the pool threads' large activations come from
per-thread heaps that are not given back: the default mode's peak memory. Pinned, every large
block is mapped and unmapped by itself: the peak halves, but each one is page-faulted in again,
so meta-training is ~1.6x slower (README: Performance). Unset (or "dynamic"): glibc's own rule.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4")


def tcmalloc_path() -> str | None:
    """The tcmalloc shared library of this machine, or None."""
    return next((p for p in TCMALLOC_PATHS if Path(p).is_file()), None)


def tcmalloc_env(env: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-run under tcmalloc, or None when not wanted, not installed, or already on."""
    lib = tcmalloc_path()
    preload = env.get("LD_PRELOAD", "")
    if env.get("METABENCH_ALLOCATOR", "tcmalloc") != "tcmalloc" or lib is None or "tcmalloc" in preload:
        return None
    return {**env, "LD_PRELOAD": f"{lib} {preload}".strip(), "METABENCH_ALLOCATOR": "tcmalloc"}


def reexec_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by `python -m bench ARGV` under tcmalloc when `tcmalloc_env` says so."""
    env = tcmalloc_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "bench", *argv], env)


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_pinned: list[int] = []


def tcmalloc_loaded(env: dict[str, str]) -> bool:
    """Whether this process's malloc is tcmalloc (preloaded, or re-run under it), not glibc's."""
    return "tcmalloc" in env.get("LD_PRELOAD", "") or env.get("METABENCH_ALLOCATOR") == "tcmalloc"


def mmap_threshold(env: dict[str, str]) -> int | None:
    """The mmap threshold to pin: METABENCH_MMAP_THRESHOLD in bytes (None: unset or "dynamic", glibc's own
    rule, or another allocator is loaded)."""
    if tcmalloc_loaded(env):
        return None
    value = env.get("METABENCH_MMAP_THRESHOLD", "").strip()
    if value in ("", "dynamic"):
        return None
    if not value.isdigit():
        raise ValueError(f"METABENCH_MMAP_THRESHOLD must be a number of bytes or 'dynamic', got {value!r}")
    return int(value)


def pin_mmap_threshold() -> int | None:
    """Pin glibc malloc's mmap threshold once per process (`mmap_threshold`); returns it, or None when
    nothing was pinned (not glibc, another allocator, or "dynamic")."""
    if _pinned:
        return _pinned[0] or None
    threshold = mmap_threshold(dict(os.environ))
    try:
        libc = ctypes.CDLL(None)
        glibc = threshold is not None and hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")
    except OSError:
        glibc = False
    done = bool(glibc and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1)
    _pinned.append(threshold if done else 0)
    return threshold if done else None

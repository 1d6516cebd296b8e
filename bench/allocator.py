"""The memory allocator: find tcmalloc and re-run the command line under it.

Under glibc's malloc, meta-training, which allocates and frees the same large activations every
inner step, keeps page-faulting fresh memory in. torch asks for 64-byte-aligned blocks; after the
first large block is freed glibc serves them from its heap, but strace shows each new 15 MB block
(75 x 64 x 28 x 28 floats) taken by growing the heap (brk) rather than from the hole the last one
left. Measured with one thread on a 2-core Xeon beside other work (the times are loose, the fault
counts are not): allocating and zeroing such a block 1.9-6.2 ms with ~900-1500
page faults, against 1.0-1.5 ms to zero one already held; under tcmalloc 1.5 ms and no faults. Raising
glibc's trim and mmap thresholds with mallopt did not stop them on the main thread then; with the top pad
too, the task pool's threads stop faulting (`tune_malloc`, below). glibc's transparent huge pages
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1) made it 27 ms. `python -m bench.perf` measured 1.10-1.47x faster
meta-iterations for metabench and 1.18-1.61x for learn2learn under tcmalloc (Omniglot 5-way 1- and
20-way 1-shot, miniImageNet 5-way 1-shot; MAML and first-order MAML; docs/performance.md).
`metabench` therefore re-executes itself with tcmalloc
preloaded when the library is installed (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`);
METABENCH_ALLOCATOR=glibc turns that off.

Under glibc, meta-training sets malloc's thresholds once, before its first step (`tune_malloc`, called by
baselines.parallel.map_tasks, pool on or off, and GradientLearner.fit), as METABENCH_MMAP_THRESHOLD says:
- unset or "keep" (the default): freed memory stays with the process for the next task. No block is mapped by
  itself (mmap count 0): the main thread's blocks of any size come from its heap and a pool thread's up to
  its heap's size (mmap threshold 32 MiB, glibc's largest, otherwise), the heaps are never trimmed (trim
  threshold 2 GiB - 1) and a pool thread's emptied heap is not unmapped (top pad 64 MiB, one heap).
  Left to its own rule, glibc gave the freed activations of each task back to the system and faulted
  them in again for the next: 56,000-270,000 minor page faults per meta-iteration of Omniglot 5-way 1-shot
  MAML (meta-batch 32, 2 pool threads, 2-core Xeon), against under 100 kept, and meta-iterations were
  5-22% faster. The peak resident set is up to ~25% higher (memory no longer trimmed between tasks) and
  stays flat over iterations (docs/performance.md).
  A pool thread's heap holds 64 MiB at most, and glibc maps a larger block by itself whatever the settings,
  faulting its pages in every time (miniImageNet's first-block maps: 75 x 32 x 84 x 84 floats, 68 MB;
  ~268,000 faults per meta-iteration of 5-way 1-shot MAML). When GradientLearner.fit's tasks make such blocks
  on the pool (GradientLearner.largest_task_block), every thread allocates from the main heap instead (arena
  count 1), which grows to any size: ~5,500 faults, 20-30% faster meta-iterations there, ~20% more resident
  memory. Below that size the threads keep their own heaps (one shared heap was up to 22% slower on Omniglot
  5-way). glibc gives a thread its heap at its first allocation: a thread that allocated before the first call
  keeps its own, and a pool thread started later may be handed that one (bench.perf tunes before its sampling
  thread).
- "dynamic": glibc's own rule (raise the mmap threshold to each large block freed, trim the heaps).
- BYTES (e.g. 131072): the mmap threshold pinned there: every larger block is mapped and unmapped by
  itself, so the pool threads' freed activations go back to the system at once. The peak halves, but
  each block is page-faulted in again, so meta-training is ~1.6x slower (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any, Sequence

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


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -3, -4, -8  # mallopt's (malloc.h)
KEEP = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 64 * 2**20, M_MMAP_MAX: 0}
"""The "keep" settings: no block mapped by itself (the threshold, glibc's largest, 32 MiB on 64-bit, only
turns glibc's dynamic rule off), heaps never trimmed, a thread's emptied heap (64 MiB at most) kept mapped."""
THREAD_HEAP_BYTES = 64 * 2**20
"""The most a glibc thread heap holds (HEAP_MAX_SIZE on 64-bit); a larger block is mapped by itself."""
_tuned: list[dict[int, int]] = []


def tcmalloc_loaded(env: dict[str, str]) -> bool:
    """Whether this process's malloc is tcmalloc (preloaded, or re-run under it), not glibc's."""
    return "tcmalloc" in env.get("LD_PRELOAD", "") or env.get("METABENCH_ALLOCATOR") == "tcmalloc"


def malloc_settings(env: dict[str, str], largest_block: int = 0) -> dict[int, int]:
    """The mallopt settings {parameter: value} METABENCH_MMAP_THRESHOLD asks for: `KEEP` when unset or "keep"
    (with one arena for every thread when pool tasks allocate `largest_block` bytes at once and that does not
    fit a thread heap), {M_MMAP_THRESHOLD: BYTES} for a number, none for "dynamic" (glibc's own rule) or
    another allocator."""
    if tcmalloc_loaded(env):
        return {}
    value = env.get("METABENCH_MMAP_THRESHOLD", "").strip()
    if value in ("", "keep"):
        return KEEP | ({M_ARENA_MAX: 1} if largest_block > THREAD_HEAP_BYTES - 2**20 else {})
    if value == "dynamic":
        return {}
    if not value.isdigit():
        raise ValueError(f"METABENCH_MMAP_THRESHOLD must be 'keep', 'dynamic' or a number of bytes, got {value!r}")
    return {M_MMAP_THRESHOLD: int(value)}


def tune_malloc(largest_block: int = 0) -> dict[int, int]:
    """Apply `malloc_settings` to glibc's malloc once per process (the first call decides, before the task pool's
    threads take their heaps; largest_block: the bytes of the largest block one task on the pool allocates, 0
    where unknown or none); returns what was applied ({} when nothing was: not glibc, another allocator, or
    "dynamic")."""
    if _tuned:
        return _tuned[0]
    settings = malloc_settings(dict(os.environ), largest_block)
    mallopt = libc_function("mallopt") if settings and libc_function("gnu_get_libc_version") else None
    done = mallopt is not None and all([mallopt(key, ctypes.c_int(value)) == 1 for key, value in settings.items()])  # (each one tried)
    _tuned.append(settings if done else {})
    return _tuned[0]


def tune_malloc_for(learner: Any, episodes: Sequence[Any]) -> dict[int, int]:
    """`tune_malloc` for `learner`'s tasks on `episodes`, with the largest block one of them allocates on the task
    pool (GradientLearner.largest_task_block; 0 for a learner without one, or no episodes). For a process whose
    first work is not `fit` (an evaluation only, a resumed run's test, a benchmark's timing thread): call it
    before that work, since the first call decides. After the first call it returns at once (fit calls it every
    step) without sizing the episodes."""
    if _tuned:
        return _tuned[0]
    has = hasattr(learner, "largest_task_block") and len(episodes) > 0
    return tune_malloc(learner.largest_task_block(episodes) if has else 0)


def libc_function(name: str) -> Any:
    """The C function `name` among the libraries this process has loaded (glibc's malloc functions, or a
    preloaded tcmalloc's), as a ctypes function; None where there is none."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Give the memory malloc holds free back to the system (glibc's malloc_trim(0); tcmalloc's
    MallocExtension_ReleaseFreeMemory when it is loaded), so that a later peak of the resident set counts
    every page a block needs rather than reusing pages an earlier, freed block left resident."""
    for name, args in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (ctypes.c_size_t(0),))):
        fn = libc_function(name)
        if fn is not None:
            fn(*args)

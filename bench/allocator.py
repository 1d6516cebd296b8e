"""The memory allocator: find tcmalloc and re-run the command line under it.

glibc's malloc hands every block above its mmap threshold (at most 32 MB) back to the operating
system when it is freed, so meta-training, which allocates and frees the same large activations
every inner step, pays page faults for each of them; tcmalloc keeps them. Measured with
`python -m bench.perf` (2 cores, Omniglot 5-way 1-shot MAML): 1.15x faster meta-iterations for
metabench and 1.13x for learn2learn. `metabench` therefore re-executes itself with tcmalloc
preloaded when the library is installed (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`);
METABENCH_ALLOCATOR=glibc turns that off.
"""

from __future__ import annotations

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

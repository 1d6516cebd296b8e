"""Benchmark script (not a test): peak CPU memory of one meta-gradient, iMAML vs second-order MAML.

One outer step (meta-gradient of a meta-batch plus the Adam step) with Omniglot 5-way 1-shot
shapes (5 support and 75 query images of 1x28x28, Conv-4 with 64 filters), for `imaml` and
`maml` (second order) at 1, 5 and 10 inner steps; prints a markdown table.

How memory is measured: every configuration runs in a fresh Python subprocess (one torch
thread), so no allocator cache or high-water mark carries over between configurations. The
child imports torch, builds the method and the episodes (random pixels from a seeded
generator: memory does not depend on pixel values) and runs one forward pass of the support
set, so that libraries and kernels are loaded before the baseline is taken. Baseline = the
process's current resident set size (/proc/self/statm) just before the outer step; peak =
resource.getrusage(RUSAGE_SELF).ru_maxrss (the RSS high-water mark) just after it; the reported
number is peak - baseline: how far the outer step pushed resident memory above what was
already there (autograd graphs, inner-loop activations, CG vectors). The child checks that the
high-water mark before the step was at most the baseline (+2 MiB), else it flags the row.
The child runs with glibc's malloc thresholds fixed (MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ = 128 KiB): by default glibc raises its mmap threshold after large frees,
so later tensors land in the heap, whose freed blocks stay resident and whose peak then depends
on the allocation history (measured: 614 instead of 273 MiB for MAML, 1 step, meta-batch 4).
With the thresholds fixed, every tensor above 128 KiB is its own mapping, returned on free, so
RSS follows the live tensors. (torch.profiler's profile_memory was tried and dropped: its CPU
memory events do not give a simple running total of live bytes.)

How the methods spend memory: iMAML computes one task's implicit gradient at a time (its peak
does not grow with the meta-batch); this repository's MAML runs a meta-batch of equal-shaped
tasks as one task-batched network (baselines/taskbatch.py), so its peak grows with the
meta-batch as well as with the inner steps. Meta-batch 1 isolates the inner-steps dependence.

    OMP_NUM_THREADS=1 python scripts/imaml_memory.py [--steps 1 5 10] [--meta-batches 1 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

WAY, SHOT, QUERY, SIZE, HIDDEN = 5, 1, 15, 28, 64
SLACK_MB = 2.0
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mb() -> float:
    """Peak resident set size of this process so far in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, steps: int, meta_batch: int) -> dict[str, float | str]:
    """One measurement in this (fresh) process: the outer step's peak RSS growth and its seconds."""
    import torch

    from bench.api import Episode, TaskInfo
    from baselines import registry

    torch.set_num_threads(1)
    over = dict(hidden=HIDDEN, meta_batch=meta_batch, inner_steps=steps)
    if method == "maml":
        over["first_order"] = False
    m = registry.make(method, "omniglot-5w", seed=0, **over).setup(TaskInfo((1, SIZE, SIZE), WAY, 100))
    gen = torch.Generator().manual_seed(0)
    labels = lambda n: torch.arange(WAY).repeat_interleave(n)  # noqa: E731
    batch = [Episode(torch.rand(WAY * SHOT, 1, SIZE, SIZE, generator=gen), labels(SHOT),
                     torch.rand(WAY * QUERY, 1, SIZE, SIZE, generator=gen), labels(QUERY),
                     tuple(range(WAY)), "train", i, f"mem{i}") for i in range(meta_batch)]
    with torch.no_grad():
        m.forward(m.meta, batch[0].support_x, WAY)  # load kernels before the baseline
    base, high_before = rss_mb(), maxrss_mb()
    start = time.perf_counter()
    m.outer_step(batch)
    seconds = time.perf_counter() - start
    peak = maxrss_mb()
    ok = high_before <= base + SLACK_MB and peak > high_before
    return {"baseline_mb": base, "peak_mb": peak, "growth_mb": peak - base,
            "seconds": seconds, "valid": "yes" if ok else "NO (high-water mark set before the step)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="*", default=[1, 5, 10])
    p.add_argument("--methods", nargs="*", default=["maml", "imaml"])
    p.add_argument("--meta-batches", type=int, nargs="*", default=[1, 4])
    p.add_argument("--child", nargs=3, metavar=("METHOD", "STEPS", "META_BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", **MALLOC_ENV}
    print(f"Peak RSS growth of one outer step ({WAY}-way {SHOT}-shot, {QUERY} queries per class, {SIZE}x{SIZE}, "
          f"Conv-4 {HIDDEN}; MAML second order), each in a fresh process:\n")
    print("| method | meta-batch | inner steps | peak growth (MiB) | baseline RSS (MiB) | seconds | valid |\n"
          "|---|---|---|---|---|---|---|")
    for method in args.methods:
        for meta_batch in args.meta_batches:
            for steps in args.steps:
                out = subprocess.run([sys.executable, __file__, "--child", method, str(steps), str(meta_batch)],
                                     env=env, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {method} | {meta_batch} | {steps} | {r['growth_mb']:.1f} | {r['baseline_mb']:.0f} | "
                      f"{r['seconds']:.1f} | {r['valid']} |", flush=True)


if __name__ == "__main__":
    main()

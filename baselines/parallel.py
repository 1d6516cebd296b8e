"""Task-parallel meta-gradients: the tasks of a meta-batch on a pool of threads, one per core.

On CPU, a Conv-4 task (5-20 support images, a double backward through the inner loop) is too
small for torch's intra-op threads to keep two or more cores busy: most of its operations are
short element-wise passes. Running whole tasks side by side, each single-threaded, uses the cores
fully (torch releases the GIL inside every operation and inside the autograd engine), e.g.
1.25x on Omniglot 20-way 1-shot second-order MAML on 2 cores (`python -m bench.perf`).

Results do not depend on the number of workers: every task of a meta-batch of two or more runs on
one intra-op thread wherever it runs (a meta-batch of one task runs in the calling thread on torch's
intra-op threads, whatever the number of workers: ProtoNet's one 60-way episode, Meta-Dataset's one
episode per step), each task's gradient is returned (not accumulated into `.grad` concurrently), and the
gradients are summed in meta-batch order. They can differ from a task-by-task loop at several
intra-op threads in the last bits (a different summation order inside some kernels).

Evaluation uses the same pool (baselines/core.py: `tasks_on_pool`, `GradientLearner.map_predictions`): slices
of an evaluation chunk and the query predictions, each on one worker, so evaluation numbers do not depend on
the number of workers or of torch's threads either.

Workers: `METABENCH_TASK_WORKERS` when set, else torch's intra-op thread count. W workers hold
W tasks' graphs in memory at once; 0 turns the pool off (callers then run the tasks one after
another on torch's intra-op threads: one task's graph at a time, the last bits of the numbers
may differ from the pool's). Under glibc malloc's settings are decided once, by the first call of
GradientLearner.fit (bench.allocator.tune_malloc_for, with its tasks' largest block) or of `map_tasks`, pool on
or off (bench.allocator.tune_malloc): by default freed task graphs stay with the process for the next task
instead of being page-faulted in again; METABENCH_MMAP_THRESHOLD=BYTES gives them back at once (half the peak
memory, slower).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from bench.allocator import tune_malloc

T = TypeVar("T")
R = TypeVar("R")
A = TypeVar("A")

_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def task_workers() -> int:
    """How many tasks run at once: METABENCH_TASK_WORKERS, else torch.get_num_threads() (0: no pool)."""
    value = os.environ.get("METABENCH_TASK_WORKERS", "").strip()
    if not value:
        return max(1, torch.get_num_threads())
    if not value.isdigit():
        raise ValueError(f"METABENCH_TASK_WORKERS must be a whole number (0 turns the task pool off), got {value!r}")
    return int(value)


@contextmanager
def workers_set(workers: str) -> Iterator[None]:
    """METABENCH_TASK_WORKERS set to `workers` inside (e.g. "0": the pool off); restored after."""
    before = os.environ.get("METABENCH_TASK_WORKERS")
    os.environ["METABENCH_TASK_WORKERS"] = workers
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("METABENCH_TASK_WORKERS", None)
        else:
            os.environ["METABENCH_TASK_WORKERS"] = before


@contextmanager
def threads_set(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside; restored after."""
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _single_threaded() -> None:
    """Make this worker's torch run on one thread: when a worker starts, and before each of its calls, since a
    later torch.set_num_threads in the main thread can reach threads that set theirs already (torch 2.13 with
    OpenMP: a worker that set 1 read 2 after the main thread set 2)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="metabench-task",
                                                 initializer=_single_threaded)
        return _pools[workers]


def map_tasks(fn: Callable[[T], R], items: Sequence[T], *, single_here: bool = True) -> Iterator[R]:
    """fn(item) for each item, each call on a single-threaded worker, yielded in item order
    (with the pool off: computed in this thread, one after another, as they are consumed; a single
    item is computed in this thread on torch's intra-op threads, where a worker would leave all cores
    but one idle, unless single_here is False: then it goes to a worker like any other, so that every
    item is computed single-threaded whatever the number of items).

    fn must not mutate shared state (it runs concurrently with itself). An exception raised by a
    call is raised when its result is reached.
    """
    tune_malloc()  # glibc: freed task graphs kept for the next task, pool or not (METABENCH_MMAP_THRESHOLD)
    workers = task_workers()
    if workers == 0 or (len(items) == 1 and single_here):
        return (fn(item) for item in items)

    def one_thread(item: T) -> R:
        _single_threaded()
        return fn(item)

    return _pool(workers).map(one_thread, items)


def fold_tasks(fn: Callable[[T], R], items: Sequence[T], add: Callable[[A, R], A], start: A) -> A:
    """add(...add(add(start, fn(items[0])), fn(items[1]))..., fn(items[-1])): the calls as `map_tasks` makes them,
    the adds in item order as the results arrive, each on the worker that completes the next one in order (with
    the pool off, or one item: in this thread, one after another).

    On the workers the adds run single-threaded, as the calls do. Made in this thread instead, each add of a
    tensor larger than torch's grain size started intra-op threads while both cores ran tasks: oversubscribed, the
    workers waited for their cores (Omniglot 5-way first-order MAML, fused: 1.16-1.22 against 0.91-0.94 s per
    meta-iteration on 2 cores). An element-wise add gives the same bits on any number of threads, so the result
    is the same either way. `add` may update its first argument in place; it runs under a lock, never
    concurrently with itself. An exception raised by a call is raised here, the earliest item's first.
    """
    workers = task_workers()
    if workers == 0 or len(items) == 1:
        total = start
        for result in map_tasks(fn, items):
            total = add(total, result)
        return total
    lock = threading.Lock()
    pending: dict[int, R] = {}
    state: list = [start, 0]  # the running total; the index of the next result it takes

    def call_and_add(i: int) -> None:
        result = fn(items[i])
        with lock:
            pending[i] = result
            while state[1] in pending:
                state[0] = add(state[0], pending.pop(state[1]))
                state[1] += 1

    for _ in map_tasks(call_and_add, range(len(items))):
        pass
    return state[0]


def summed_grads(loss_fn: Callable[[T], torch.Tensor], items: Sequence[T],
                 params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Sum over items of d loss_fn(item) / d params, tasks in parallel, summed in item order as
    they arrive (`fold_tasks`; with the pool off this is `.backward()` task by task: one graph at a time, the
    same sums in the same order).

    One tensor per param, shaped like it; None where no loss depends on it (as `.backward()`
    would leave `.grad`).
    """

    def grads(item: T) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(loss_fn(item), list(params), allow_unused=True)

    def add(total: list[torch.Tensor | None], task: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
        return [a if g is None else g if a is None else a + g for a, g in zip(total, task)]

    return fold_tasks(grads, items, add, [None] * len(params))

"""Task-parallel meta-gradients (baselines/parallel.py): the same numbers as the task-by-task loop,
whatever the number of workers."""

from __future__ import annotations

import pytest
import torch

from bench.api import Episode
from baselines.core import GradientLearner
from baselines.imaml import IMAML
from baselines.maml import MAML
from baselines.mamlpp import MAMLpp
from baselines.mixture import Mixture
from baselines.parallel import fold_tasks, map_tasks, summed_grads, task_workers, threads_set


def test_map_tasks_keeps_order():
    assert list(map_tasks(lambda i: i * i, list(range(20)))) == [i * i for i in range(20)]


def test_map_tasks_raises_the_first_error():
    def fn(i: int) -> int:
        if i == 3:
            raise ValueError("task 3 failed")
        return i

    with pytest.raises(ValueError, match="task 3 failed"):
        list(map_tasks(fn, list(range(6))))


def test_workers_run_single_threaded():
    assert set(map_tasks(lambda _: torch.get_num_threads(), list(range(8)))) == {1}


def test_a_single_task_runs_in_the_calling_thread_on_torchs_threads(monkeypatch):
    """A one-task meta-batch on a single-threaded worker would leave every other core idle (ProtoNet's
    one 60-way episode per step ran at 0.89x the plain loop): it runs here, on torch's intra-op threads,
    whatever the number of workers."""
    import threading

    here = threading.get_ident()
    for workers in ("1", "3"):
        monkeypatch.setenv("METABENCH_TASK_WORKERS", workers)
        assert list(map_tasks(lambda _: (threading.get_ident(), torch.get_num_threads()), [0])) == [
            (here, torch.get_num_threads())]
        assert {i for i, _ in map_tasks(lambda _: (threading.get_ident(), 0), [0, 1])} != {here}


def test_threads_set_restores_the_thread_count_even_on_error():
    before = torch.get_num_threads()
    with threads_set(before + 1):
        assert torch.get_num_threads() == before + 1
    with pytest.raises(RuntimeError, match="inside"), threads_set(before + 2):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_task_workers_setting(monkeypatch):
    monkeypatch.setenv("METABENCH_TASK_WORKERS", "3")
    assert task_workers() == 3
    monkeypatch.delenv("METABENCH_TASK_WORKERS")
    assert task_workers() == max(1, torch.get_num_threads())
    monkeypatch.setenv("METABENCH_TASK_WORKERS", "0")
    assert task_workers() == 0 and list(map_tasks(lambda _: torch.get_num_threads(), [0])) == [torch.get_num_threads()]
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv("METABENCH_TASK_WORKERS", bad)
        with pytest.raises(ValueError, match="METABENCH_TASK_WORKERS"):
            task_workers()


def test_fold_tasks_adds_in_item_order_on_the_single_threaded_workers(monkeypatch):
    """The adds run in item order even when later items finish first, each on a worker on one thread: the calling
    thread starts no intra-op threads of its own while the workers compute (it oversubscribed the cores)."""
    import threading
    import time

    here = threading.get_ident()

    def slow_first(i: int) -> int:
        time.sleep(0.05 if i % 3 == 0 else 0.0)
        return i

    def add(seen: list, i: int) -> list:
        return seen + [(i, threading.get_ident() != here, torch.get_num_threads())]

    for workers in ("2", "3"):
        monkeypatch.setenv("METABENCH_TASK_WORKERS", workers)
        assert fold_tasks(slow_first, list(range(9)), add, []) == [(i, True, 1) for i in range(9)]
    monkeypatch.setenv("METABENCH_TASK_WORKERS", "0")  # the pool off: here, one after another
    assert fold_tasks(slow_first, list(range(3)), add, []) == [(i, False, torch.get_num_threads()) for i in range(3)]


def test_fold_tasks_raises_the_first_error():
    def fn(i: int) -> int:
        if i in (2, 4):
            raise ValueError(f"task {i} failed")
        return i

    with pytest.raises(ValueError, match="task 2 failed"):
        fold_tasks(fn, list(range(6)), lambda a, b: a + b, 0)


def test_summed_grads_in_float32_equal_the_sum_in_item_order_bitwise():
    """Tensors above torch's grain size (32768 elements): adds on one thread give the bits the calling thread's
    intra-op threads gave."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=gen, requires_grad=True)
    xs = [torch.randn(7, 200, generator=gen) for _ in range(9)]
    got = summed_grads(lambda x: (x @ w).tanh().sum(), xs, [w])[0]
    with threads_set(1):  # each item's gradient as a worker makes it
        per_item = [torch.autograd.grad((x @ w).tanh().sum(), [w])[0] for x in xs]
    ref = per_item[0]
    for g in per_item[1:]:  # the adds on torch's threads here
        ref = ref + g
    assert torch.equal(got, ref)


def test_summed_grads_equals_the_sum_of_per_item_gradients():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(7)]
    got = summed_grads(lambda x: (x @ w).tanh().sum(), xs, [w, unused])
    ref = torch.autograd.grad(sum((x @ w).tanh().sum() for x in xs), [w])[0]
    torch.testing.assert_close(got[0], ref, rtol=1e-12, atol=1e-12)
    assert got[1] is None  # as .backward() would leave .grad


def meta_grads(m: GradientLearner, batch: list[Episode]) -> dict[str, torch.Tensor]:
    m.optimizer = torch.optim.SGD(list(m.meta.values()), lr=0.0)
    m.outer_step(batch)
    return {k: v.grad.clone() for k, v in m.meta.items()}


def make_maml(synthetic_set, **kw) -> MAML:
    return MAML(meta_batch=4, hidden=8, seed=1, inner_steps=2, **kw).setup(synthetic_set.task_info())


def test_parallel_outer_step_equals_the_task_by_task_loop_in_float64(synthetic_set, monkeypatch):
    batch = double_batch(synthetic_set)
    par, seq = to_float64(make_maml(synthetic_set)), to_float64(make_maml(synthetic_set))
    monkeypatch.setattr(seq, "PARALLEL_TASKS", False)
    assert par.PARALLEL_TASKS
    g_par, g_seq = meta_grads(par, batch), meta_grads(seq, batch)
    for k in g_seq:
        torch.testing.assert_close(g_par[k], g_seq[k], rtol=1e-10, atol=1e-13, msg=k)


def test_results_do_not_depend_on_the_number_of_workers(synthetic_set, monkeypatch):
    """Each task runs on one intra-op thread wherever it runs: bitwise equal float32 training."""
    stream = synthetic_set.stream("train")
    batches = [[next(stream) for _ in range(4)] for _ in range(2)]
    metas = []
    for workers in ("1", "3"):  # (0, the pool off, runs tasks on torch's intra-op threads instead)
        monkeypatch.setenv("METABENCH_TASK_WORKERS", workers)
        m = make_maml(synthetic_set)
        for b in batches:
            m.outer_step(b)
        m.outer_step(batches[0][:1])  # a one-task meta-batch: in the calling thread, whatever the workers
        metas.append(m.meta)
    for k in metas[0]:
        assert torch.equal(metas[0][k], metas[1][k]), k


def test_methods_that_write_state_in_task_loss_stay_sequential():
    assert not Mixture.PARALLEL_TASKS and MAML.PARALLEL_TASKS and not GradientLearner.PARALLEL_TASKS


def to_float64(m: GradientLearner) -> GradientLearner:
    m.meta = {k: v.detach().double().requires_grad_(True) for k, v in m.meta.items()}
    return m


def double_batch(synthetic_set, n: int = 4, split: str = "train") -> list[Episode]:
    stream = synthetic_set.stream(split)
    return [Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y, e.classes, e.split, e.index,
                    e.spec_hash) for e in (next(stream) for _ in range(n))]


def test_mamlpp_tasks_side_by_side_equal_the_task_by_task_loop_statistics_included(synthetic_set, monkeypatch):
    """MAML++ logs each task's running-statistics updates and applies them in meta-batch order: the
    meta-gradient and the per-step statistics equal those of the sequential loop (float64)."""
    batch = double_batch(synthetic_set)
    info = synthetic_set.task_info()
    par, seq = (to_float64(MAMLpp(meta_batch=4, hidden=8, seed=1, inner_steps=2).setup(info)) for _ in range(2))
    for m in (par, seq):
        m.bn_stats = {k: v.double() for k, v in m.bn_stats.items()}
    monkeypatch.setattr(seq, "PARALLEL_TASKS", False)
    monkeypatch.setenv("METABENCH_TASK_WORKERS", "3")
    assert par.PARALLEL_TASKS
    g_par, g_seq = meta_grads(par, batch), meta_grads(seq, batch)
    for k in g_seq:
        torch.testing.assert_close(g_par[k], g_seq[k], rtol=1e-10, atol=1e-13, msg=k)
    for k in seq.bn_stats:
        torch.testing.assert_close(par.bn_stats[k], seq.bn_stats[k], rtol=1e-12, atol=1e-14, msg=k)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in seq.bn_stats.items() if k.endswith("mean"))


def test_imaml_tasks_side_by_side_equal_the_task_by_task_loop(synthetic_set, monkeypatch):
    batch = double_batch(synthetic_set)
    grads = []
    for workers in ("0", "3"):
        monkeypatch.setenv("METABENCH_TASK_WORKERS", workers)
        m = to_float64(IMAML(meta_batch=4, hidden=8, seed=1, inner_steps=3, cg_steps=3).setup(synthetic_set.task_info()))
        grads.append(meta_grads(m, batch))
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-10, atol=1e-13, msg=k)


def test_resnet_tasks_run_one_after_another():
    """The task pool is for Conv-4's small tasks; a ResNet task keeps torch's threads busy by itself."""
    assert MAML(hidden=8).tasks_side_by_side
    assert not MAML(backbone="resnet12", widths="4-4-4-4").tasks_side_by_side
    assert not MAML(backbone="resnet18", widths="4-4-4-4").tasks_side_by_side
    assert not Mixture(hidden=8).tasks_side_by_side  # (PARALLEL_TASKS is False)


def test_single_here_false_sends_a_single_item_to_a_worker(monkeypatch):
    """(What evaluation uses: every slice and prediction single-threaded, however few.)"""
    import threading

    here = threading.get_ident()
    monkeypatch.setenv("METABENCH_TASK_WORKERS", "2")
    [(where, threads)] = map_tasks(lambda _: (threading.get_ident(), torch.get_num_threads()), [0], single_here=False)
    assert where != here and threads == 1


def evaluation_rows(m: MAML, eps: list[Episode], upto: int | None) -> list[tuple]:
    rows = m.evaluate(eps, steps_upto=upto)
    return [(r["accuracy"], r["loss"], r.get("steps")) for r in rows]


def test_evaluation_does_not_depend_on_the_number_of_workers_or_threads(synthetic_set, monkeypatch):
    """adapt_many adapts slices of a chunk side by side, each on one thread: the rows (and the test-time step
    curves) are bitwise the same with 1 or 3 workers and 1 or 2 torch threads; the step curve's point at the
    method's own test steps is the main number."""
    m = make_maml(synthetic_set, inner_steps_test=3)
    m.fit(synthetic_set.stream("train"), 2)
    stream = synthetic_set.stream("test")
    eps = [next(stream) for _ in range(10)]  # slices of 4, 4 and 2
    before = torch.get_num_threads()
    got = {}
    try:
        for workers, threads in (("1", 1), ("3", 1), ("1", 2), ("3", 2)):
            monkeypatch.setenv("METABENCH_TASK_WORKERS", workers)
            torch.set_num_threads(threads)
            got[workers, threads] = (evaluation_rows(m, eps, None), evaluation_rows(m, eps, 5))
    finally:
        torch.set_num_threads(before)
    first = got["1", 1]
    assert all(rows == first for rows in got.values())
    plain, traced = first
    assert [(a, l) for a, l, _ in plain] == [(a, l) for a, l, _ in traced]
    for accuracy, loss, steps in traced:
        assert [s for s, _, _ in steps] == list(range(6)) and (3, accuracy, loss) in steps


def test_evaluation_on_the_pool_equals_the_chunk_in_one_pass_in_float64(synthetic_set, monkeypatch):
    """The slices on the pool compute what one task-batched pass over the chunk in this thread computes
    (the pool off)."""
    m = to_float64(make_maml(synthetic_set, inner_steps_test=3))
    eps = double_batch(synthetic_set, 6, "test")
    losses = {}
    for workers in ("0", "3"):
        monkeypatch.setenv("METABENCH_TASK_WORKERS", workers)
        losses[workers] = torch.tensor([r["loss"] for r in m.evaluate(eps)], dtype=torch.float64)
    torch.testing.assert_close(losses["3"], losses["0"], rtol=1e-10, atol=1e-12)

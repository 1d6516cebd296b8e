"""The performance benchmark's plumbing (never its timings): FLOP counting, one worker's row, the
report, bad options, and, where learn2learn is installed, that its MAML computes our meta-gradient."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import time

import pytest
import torch
import torch.nn.functional as F

from bench import perf
from bench.errors import MetabenchError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = perf.Workload("omniglot", 3, 1, 2, channels=1, size=28, hidden=4, meta_batch=2, inner_steps=1, inner_lr=0.4,
                     test_steps=2)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(perf.WORKLOADS, "tiny", TINY)
    return TINY


def args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    perf.add_arguments(p)
    ns = p.parse_args([])
    return argparse.Namespace(**(vars(ns) | kw))


def test_workloads_are_the_paper_settings():
    w = perf.WORKLOADS
    assert (w["omniglot-5w1s"].hidden, w["omniglot-5w1s"].meta_batch, w["omniglot-5w1s"].inner_steps) == (64, 32, 1)
    assert (w["omniglot-20w1s"].meta_batch, w["omniglot-20w1s"].inner_steps) == (16, 5)
    mini = w["miniimagenet-5w1s"]
    assert (mini.hidden, mini.size, mini.meta_batch, mini.inner_steps, mini.channels) == (32, 84, 4, 5, 3)


def test_second_order_counts_more_flops_than_first_order():
    second, first = perf.workload_flops(TINY, False), perf.workload_flops(TINY, True)
    assert second > first > 0
    more_steps = perf.workload_flops(dataclasses.replace(TINY, inner_steps=3), False)
    assert more_steps > second


def test_one_worker_row(tiny):
    job = {"workload": "tiny", "impl": "metabench", "method": "maml", "allocator": "glibc", "threads": 1,
           "device": "cpu", "repeats": 2, "warmup": 0, "eval_episodes": 3}
    row = perf.measure(job)
    assert set(perf.COLUMNS) <= set(row)
    for key in ("sec_per_iter", "eval_eps_per_s", "gflops", "matmul_gflops", "flop_fraction"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert row["sec_min"] <= row["sec_per_iter"] <= row["sec_max"]
    assert row["eval_faults_per_ep"] >= 0
    assert row["tf32"] == ""  # a CPU row: no TF32 to speak of


def test_peak_covers_every_training_iteration_and_nothing_before_them(tiny, monkeypatch):
    """A step that needs 256 MB only on its last timed iteration shows in peak_mb; the matmul probe's
    buffers (48 MB at n=2048) do not, because it runs after training."""
    calls = []

    def step() -> None:
        calls.append(1)
        if len(calls) == 4:  # the first, one warm-up, then the second timed iteration
            torch.ones(64 * 2**20)  # 256 MB, touched and freed inside the step

    monkeypatch.setattr(perf, "metabench_impl", lambda w, method, device, batched=False: (step, lambda eps: None))
    monkeypatch.setattr(perf, "matmul_gflops", lambda device: calls.append("matmul") or 100.0)
    job = {"workload": "tiny", "impl": "metabench", "method": "maml", "allocator": "glibc", "threads": 1,
           "device": "cpu", "repeats": 2, "warmup": 1, "eval_episodes": 1}
    row = perf.measure(job)
    assert calls[:5] == [1, 1, 1, 1, "matmul"]
    if math.isfinite(row["peak_mb"]):  # VmHWM is Linux's
        assert row["peak_mb"] > 200, row["peak_mb"]


def test_minor_faults_count_pages_touched_for_the_first_time():
    import mmap

    before = perf.minor_faults()
    block = mmap.mmap(-1, 8 * 2**20)  # fresh anonymous memory: each page faults in when first written
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    touched = perf.minor_faults() - before
    block.close()
    assert touched >= 4  # 2048 pages, or as few as 4 where the kernel backs them with 2 MiB huge pages


def test_report_prints_ratios_and_writes_csv(tmp_path):
    base = {"workload": "w", "inner_steps": 1, "method": "maml", "allocator": "glibc", "threads": 2, "device": "cpu",
            "sec_min": 1, "sec_max": 1, "gflop_per_iter": 1, "gflops": 1, "matmul_gflops": 2, "flop_fraction": 0.5,
            "torch": "x"}
    rows = [base | {"impl": "metabench", "sec_per_iter": 1.0, "peak_mb": 100.0, "eval_eps_per_s": 20.0},
            base | {"impl": "l2l", "sec_per_iter": 2.0, "peak_mb": 50.0, "eval_eps_per_s": 10.0}]
    table = perf.format_table(rows)
    assert "w metabench maml glibc: 2.00x learn2learn's speed, peak memory 2.00x, evaluation 2.00x" in table
    rows[0]["heap_peak_mb"], rows[1]["heap_peak_mb"] = 90.0, 60.0
    assert "peak memory 2.00x (heap 1.50x), evaluation" in perf.format_table(rows)
    perf.write_csv(rows, tmp_path / "perf.csv")
    lines = (tmp_path / "perf.csv").read_text().splitlines()
    assert lines[0].split(",") == perf.COLUMNS and len(lines) == 3


def test_a_failed_job_is_named_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def fake(job, timeout):
        if job["impl"] == "reference":
            raise MetabenchError(f"perf worker reference/{job['method']}/omniglot-5w1s took longer than --timeout "
                                 f"{timeout:g} s")
        return {**dict.fromkeys(perf.COLUMNS, 1.0), **job}

    monkeypatch.setattr(perf, "run_worker", fake)
    code = perf.cmd_perf(args(workloads=["omniglot-5w1s"], methods=["maml", "fomaml"], allocators=["glibc"],
                              impls=["reference", "metabench"], timeout=5, csv=tmp_path / "perf.csv"))
    out = capsys.readouterr().out
    assert code == 1
    for method in ("maml", "fomaml"):
        assert f"not measured: round 1: perf worker reference/{method}/omniglot-5w1s took longer than --timeout 5 s" in out
    assert len((tmp_path / "perf.csv").read_text().splitlines()) == 3  # both metabench rows


def test_run_worker_names_a_job_past_its_timeout(tiny):
    job = {"round": 1, "workload": "tiny", "impl": "metabench", "method": "maml", "allocator": "glibc", "threads": 1,
           "device": "cpu", "repeats": 1, "warmup": 0, "eval_episodes": 1}
    with pytest.raises(MetabenchError, match="perf worker metabench/maml/tiny took longer than --timeout 0.01 s"):
        perf.run_worker(job, 0.01)


def test_rounds_pair_rows_of_one_round_and_report_the_median():
    """Round 2's learn2learn row ran on a slower machine: the ratio pairs it with round 2's own row, and the
    report gives the median of the rounds' ratios with each round's."""
    base = {"workload": "w", "inner_steps": 1, "method": "maml", "allocator": "glibc", "threads": 2, "device": "cpu",
            "sec_min": 1, "sec_max": 1, "gflop_per_iter": 1, "gflops": 1, "matmul_gflops": 2, "flop_fraction": 0.5,
            "torch": "x", "peak_mb": 100.0, "eval_eps_per_s": 10.0}
    rows = [base | {"round": 1, "impl": "metabench", "sec_per_iter": 1.0},
            base | {"round": 1, "impl": "l2l", "sec_per_iter": 2.0},
            base | {"round": 2, "impl": "l2l", "sec_per_iter": 3.0},
            base | {"round": 2, "impl": "metabench", "sec_per_iter": 2.0},
            base | {"round": 3, "impl": "metabench", "sec_per_iter": 1.0},
            base | {"round": 3, "impl": "l2l", "sec_per_iter": 2.5}]
    table = perf.format_table(rows)
    assert ("w metabench maml glibc: 2.00x learn2learn's speed, peak memory 1.00x, evaluation 1.00x "
            "(median of 3 rounds; speed 2.00x, 1.50x, 2.50x)") in table
    assert table.splitlines()[0].startswith("| round | workload")


def test_rounds_repeat_the_plan_in_alternating_order():
    jobs = perf.plan(args(workloads=["omniglot-5w1s"], methods=["maml"], impls=["metabench", "reference"],
                          allocators=["glibc"], rounds=3))
    assert [(j["round"], j["impl"]) for j in jobs] == [(1, "metabench"), (1, "reference"), (2, "reference"),
                                                       (2, "metabench"), (3, "metabench"), (3, "reference")]
    with pytest.raises(MetabenchError, match="--rounds"):
        perf.plan(args(rounds=0))


@pytest.mark.parametrize("option,value,word", [("workloads", ["nope"], "workload"), ("impls", ["tf"], "implementation"),
                                               ("allocators", ["jemalloc"], "allocator")])
def test_unknown_options_are_named(option, value, word):
    with pytest.raises(MetabenchError, match=word):
        perf.plan(args(**{option: value}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_cuda_is_one_clear_error_before_any_worker():
    with pytest.raises(MetabenchError, match="no CUDA device"):
        perf.plan(args(device="cuda"))


def test_no_tf32_is_for_a_cuda_device_and_auto_is_resolved_before_the_workers():
    if not torch.cuda.is_available():
        with pytest.raises(MetabenchError, match="--no-tf32 is for a CUDA device"):
            perf.plan(args(no_tf32=True))
    jobs = perf.plan(args(device="auto", workloads=["omniglot-5w1s"], methods=["maml"], allocators=["glibc"]))
    assert {j["device"] for j in jobs} == {"cuda" if torch.cuda.is_available() else "cpu"}
    assert not any(j["no_tf32"] for j in jobs)


def test_plan_skips_learn2learn_for_other_methods():
    jobs = perf.plan(args(workloads=["omniglot-5w1s"], methods=["anil"], allocators=["glibc"]))
    assert [j["impl"] for j in jobs] == ["metabench", "metabench-batched"]


def test_conv4_module_is_the_functional_conv4():
    """The learn2learn side runs the same network: load our parameters into it, same logits."""
    from baselines.core import conv4_forward, conv4_init

    p = conv4_init(torch.Generator().manual_seed(0), 1, 4, 3, 28)
    module = perf.conv4_module(TINY)
    perf.load_functional_params(module, p)
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(module(x), conv4_forward(p, x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("learn2learn") is None, reason="learn2learn not installed")
def test_learn2learn_maml_computes_our_meta_gradient():
    from baselines.core import conv4_forward, conv4_init, episode_loss, inner_loop

    torch.set_default_dtype(torch.float64)
    try:
        p = {k: v.double().requires_grad_(True) for k, v in conv4_init(torch.Generator().manual_seed(0), 1, 4, 3,
                                                                        28).items()}
        module = perf.conv4_module(TINY).double()
        perf.load_functional_params(module, p)
        ep = perf.synthetic_episodes(TINY, 1)[0]
        sx, qx = ep.support_x.double(), ep.query_x.double()
        learner = perf.import_learn2learn_maml()(module, lr=0.4).clone()
        learner.adapt(F.cross_entropy(learner(sx), ep.support_y))
        F.cross_entropy(learner(qx), ep.query_y).backward()
        fast = inner_loop(episode_loss(conv4_forward), p, list(p), (sx, ep.support_y), 1, 0.4)
        keys = [f"{kind}{i}.{w}" for i in range(4) for kind in ("conv", "bn") for w in ("weight", "bias")]
        ours = torch.autograd.grad(F.cross_entropy(conv4_forward(fast, qx), ep.query_y),
                                   [p[k] for k in keys + ["head.weight", "head.bias"]])
        for g, param in zip(ours, module.parameters(), strict=True):
            torch.testing.assert_close(param.grad, g, rtol=1e-8, atol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


def test_resnet12_workload_and_module_are_the_functional_resnet12(tiny):
    """The ResNet-12 workload: its network is baselines' ResNet-12, the learn2learn side loads the same
    parameters into ResNet12Module (same logits), and one metabench worker row runs (tiny widths)."""
    from baselines.core import head_forward

    w = perf.WORKLOADS["miniimagenet-5w1s-resnet12"]
    assert (w.backbone, w.network().label, w.meta_batch, w.inner_steps, w.size) == \
        ("resnet12", "resnet12-64-160-320-640", 4, 5, 84)
    small = dataclasses.replace(TINY, size=20, backbone="resnet12", widths="4-6-8-4")
    net = small.network()
    p = net.init(torch.Generator().manual_seed(0), 1, small.way, small.size)
    module = perf.network_module(small)
    perf.load_functional_params(module, p)
    x = torch.rand(5, 1, 20, 20, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(module(x), head_forward(p, net.features(p, x)), rtol=1e-5, atol=1e-5)
    assert perf.workload_flops(small, False) > perf.workload_flops(small, True) > 0
    for method in ("maml", "fomaml"):
        step, evaluate = perf.metabench_impl(small, method, "cpu")
        assert evaluate.__self__.tags.order == ("second" if method == "maml" else "first")  # not the ResNet preset's
        step()
        evaluate(perf.synthetic_episodes(small, 2))


def test_method_flops_count_maml_as_the_workload_count():
    """The per-method count (FlopCounterMode over the reference outer step) is the hand-written MAML one."""
    for method in ("maml", "fomaml"):
        assert perf.method_flops(TINY, method) == perf.workload_flops(TINY, method == "fomaml")


@pytest.mark.parametrize("method", ["maml", "mamlpp", "protonet", "imaml"])
def test_reference_step_is_the_methods_fit_step(method):
    """The plain per-task loop (NCHW, no pool) computes the same meta-gradient as `fit` (up to float32
    round-off of the other memory layout and summation order), running statistics included. (Gradients,
    not parameters: Adam turns the round-off of a conv bias before batch norm, whose gradient is zero,
    into a full step.)"""
    fast, ref = perf.make_learner(TINY, method), perf.make_learner(TINY, method)
    batch = perf.synthetic_episodes(TINY, perf.episodes_per_step(fast, TINY))
    fast.fit(iter(batch), 1)
    perf.reference_step(ref, batch)
    assert ref.fit_steps == fast.fit_steps == 1
    scale = max(v.grad.abs().max().item() for v in fast.meta.values())
    for k in fast.meta:
        assert (ref.meta[k].grad - fast.meta[k].grad).abs().max() <= 1e-3 * scale, k
    for k in getattr(fast, "bn_stats", {}):
        torch.testing.assert_close(ref.bn_stats[k], fast.bn_stats[k], rtol=1e-4, atol=1e-5, msg=k)


def test_plan_all_methods_times_each_against_the_reference():
    from baselines import registry

    jobs = perf.plan(args(methods=["all"], allocators=["glibc"]))
    assert {j["workload"] for j in jobs} == {"omniglot-5w1s"}
    assert [j["method"] for j in jobs if j["impl"] == "reference"] == registry.METHODS.names()
    assert [j["method"] for j in jobs if j["impl"] == "metabench"] == registry.METHODS.names()
    assert len(jobs) == 2 * len(registry.METHODS.names())


def test_reference_row_for_a_method_with_its_own_outer_step(tiny):
    job = {"workload": "tiny", "impl": "reference", "method": "protonet", "allocator": "glibc", "threads": 1,
           "device": "cpu", "repeats": 1, "warmup": 0, "eval_episodes": 2}
    row = perf.measure(job)
    assert row["task_workers"] == 0 and row["gflop_per_iter"] > 0 and math.isfinite(row["sec_per_iter"])


def test_heap_peak_sees_a_tensor_that_lives_only_inside_the_block():
    if math.isnan(perf.heap_in_use_mb()):
        pytest.skip("glibc's mallinfo2 is not the allocator here")
    with perf.heap_peak() as peak:
        t = torch.ones(16 * 2**20)  # 64 MiB
        time.sleep(0.05)
        del t
    assert 60 <= peak[0] < 200
    with perf.heap_peak() as idle:
        time.sleep(0.01)
    assert idle[0] < 8


def echo_worker_env(monkeypatch, *keys):
    """Replace the worker process by one that prints, as its row, the values of `keys` in its environment."""
    import json
    import subprocess

    def fake_run(cmd, env, **kw):
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({k: env.get(k) for k in keys}) + "\n", stderr="")

    monkeypatch.setattr(perf.subprocess, "run", fake_run)


@pytest.mark.parametrize("impl, env", [("metabench-lean", {"METABENCH_TASK_WORKERS": "0", "METABENCH_FUSED": "0"}),
                                       ("metabench", {"METABENCH_FUSED": "0"}),
                                       ("metabench-fused", {"METABENCH_FUSED": "1"}),
                                       ("metabench-lean-fused",
                                        {"METABENCH_TASK_WORKERS": "0", "METABENCH_FUSED": "1"}),
                                       ("metabench-batched-eager", {"METABENCH_FUSED": "0", "METABENCH_CUDA_GRAPHS": "0"})])
def test_worker_runs_under_its_implementations_switches(monkeypatch, impl, env):
    monkeypatch.delenv("METABENCH_TASK_WORKERS", raising=False)
    monkeypatch.delenv("METABENCH_CUDA_GRAPHS", raising=False)
    monkeypatch.setenv("METABENCH_FUSED", "1")  # the parent's switch never leaks into another implementation
    echo_worker_env(monkeypatch, "METABENCH_TASK_WORKERS", "METABENCH_FUSED", "METABENCH_CUDA_GRAPHS")
    job = {"workload": "omniglot-5w1s", "impl": impl, "method": "maml", "allocator": "glibc", "threads": None}
    got = perf.run_worker(job, timeout=10)
    assert {k: v for k, v in got.items() if v is not None} == env
    assert impl in perf.plan(args(impls=[impl], methods=["maml"], allocators=["glibc"]))[0]["impl"]


@pytest.mark.parametrize("allocator", ["glibc", "tcmalloc"])
def test_worker_says_its_own_allocator_when_the_parent_runs_under_tcmalloc(monkeypatch, allocator):
    """`metabench` re-runs itself under tcmalloc; a glibc worker it starts must not inherit that claim
    (its heap peak would read NaN), and a tcmalloc worker gets the library preloaded."""
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setenv("METABENCH_ALLOCATOR", "tcmalloc")
    monkeypatch.setattr(perf, "tcmalloc_path", lambda: "/lib/libtcmalloc_minimal.so.4")
    echo_worker_env(monkeypatch, "LD_PRELOAD", "METABENCH_ALLOCATOR")
    job = {"workload": "omniglot-5w1s", "impl": "metabench", "method": "maml", "allocator": allocator, "threads": None}
    got = perf.run_worker(job, timeout=10)
    assert got["METABENCH_ALLOCATOR"] == allocator
    assert got["LD_PRELOAD"] == ("/lib/libtcmalloc_minimal.so.4" if allocator == "tcmalloc" else None)
    assert perf.tcmalloc_loaded({k: v for k, v in got.items() if v is not None}) == (allocator == "tcmalloc")

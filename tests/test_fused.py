"""The fused batch norm -> max-pool -> ReLU kernel against the unfused ops (values, gradients, second order)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from baselines import fused
from baselines.core import PLAIN, Ops, conv4_forward, conv4_init, conv_layout, episode_loss, inner_loop

pytestmark = pytest.mark.skipif(not fused.available(), reason=f"the fused kernel did not build: {fused.build_error()}")

SHAPES = [(5, 8, 28, 28), (7, 16, 7, 7), (3, 4, 3, 3), (2, 3, 5, 6), (1, 2, 2, 2)]


def inputs(shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen, dtype=dtype) * 3 + 1).contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], generator=gen, dtype=dtype)  # some negative: the window maximum of y is not x's
    b = torch.randn(shape[1], generator=gen, dtype=dtype)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


@pytest.fixture
def kernel_calls(monkeypatch):
    """A list that grows by "block" each time a block runs the kernel, by "stem" each time a first block runs
    the stem kernel and by "conv" each time a conv runs as `fused.conv` (through baselines.core's layer
    operations)."""
    calls = []
    kernel, stem, conv = fused.bn_pool_relu, fused.stem, fused.conv
    monkeypatch.setattr(fused, "bn_pool_relu", lambda *a: calls.append("block") or kernel(*a))
    monkeypatch.setattr(fused, "stem", lambda *a: calls.append("stem") or stem(*a))
    monkeypatch.setattr(fused, "conv", lambda *a: calls.append("conv") or conv(*a))
    return calls


def values_and_grads(fn, x, w, b, seed=1):
    out = fn(x, w, b)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (x, w, b), g))


@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_match_the_unfused_ops_in_float64(shape):
    x, w, b = inputs(shape)
    got = values_and_grads(fused.bn_pool_relu, x, w, b)
    want = values_and_grads(fused.bn_pool_relu_reference, x, w, b)
    assert got[0].shape == want[0].shape == (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_float32_matches_to_rounding():
    """Conv-4's first block on 5-way 1-shot queries (75x64x28x28). The per-channel sums (the weight and
    bias gradients) run over 58800 terms in a different order from torch's: 1e-3 relative. A window whose
    two largest values differ by a rounding error may send its gradient to the other one: the input
    gradient may differ at a handful of the 3.8 million positions, never more."""
    x, w, b = inputs((75, 64, 28, 28), torch.float32)
    got = values_and_grads(fused.bn_pool_relu, x, w, b)
    want = values_and_grads(fused.bn_pool_relu_reference, x, w, b)
    for a, e, tol in zip(got, want, (1e-4, 1e-4, 1e-3, 1e-3)):
        close = torch.isclose(a, e, rtol=tol, atol=tol * e.abs().max().item())
        assert (~close).sum().item() <= (a.numel() // 100_000 if a.shape == x.shape else 0)


def test_ties_and_relu_cut_route_the_gradient_like_torch():
    """Equal values in a window (the first maximum wins, as in torch) and windows wholly below zero."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (4, 3, 6, 6), generator=gen).double().contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), torch.tensor([0.0, 0.1, -3.0], dtype=torch.float64)
    w.requires_grad_(), b.requires_grad_()
    for a, e in zip(values_and_grads(fused.bn_pool_relu, x, w, b),
                    values_and_grads(fused.bn_pool_relu_reference, x, w, b)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_gradcheck_and_gradgradcheck():
    assert torch.autograd.gradcheck(fused.bn_pool_relu, inputs((3, 4, 5, 4)))
    assert torch.autograd.gradgradcheck(fused.bn_pool_relu, inputs((3, 4, 5, 4), seed=2))


def test_second_order_gradients_are_exact():
    """The kernel's backward of its backward (a gradient of a gradient) against the unfused block's."""
    x, w, b = inputs((4, 6, 9, 8))

    def grad_of_grad(fn):
        gx, gw = torch.autograd.grad((fn(x, w, b) ** 2).sum(), (x, w), create_graph=True)
        return torch.autograd.grad((gx ** 3).sum() + (gw ** 2).sum(), (x, w, b))

    for a, e in zip(grad_of_grad(fused.bn_pool_relu), grad_of_grad(fused.bn_pool_relu_reference)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_third_order_gradients_are_exact():
    """The kernel's double backward, recorded, falls back to the unfused block's: a third order is exact too."""
    x, w, b = inputs((3, 5, 6, 6), seed=4)

    def third(fn):
        (gx,) = torch.autograd.grad((fn(x, w, b) ** 2).sum(), (x,), create_graph=True)
        (ggx,) = torch.autograd.grad((gx ** 2).sum(), (x,), create_graph=True)
        return torch.autograd.grad((ggx ** 2).sum() + ggx.sum(), (x, w, b))

    for a, e in zip(third(fused.bn_pool_relu), third(fused.bn_pool_relu_reference)):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-8)


def test_results_do_not_depend_on_the_thread_count():
    x, w, b = inputs((16, 32, 14, 14), torch.float32)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(values_and_grads(fused.bn_pool_relu, x, w, b))
    finally:
        torch.set_num_threads(before)
    for a, e in zip(*runs):
        assert torch.equal(a, e)


def test_kernel_calls_release_the_gil():
    """While one thread is inside a kernel call, Python runs in another (the task pool's threads would otherwise
    wait for each other's calls). Counted, not timed: the longest stretch of the call during which the main
    thread's loop made no step (the whole call when the call holds the GIL)."""
    import sys
    import threading
    import time

    args = [t.detach() for t in inputs((64, 64, 112, 112), torch.float32)] + [fused.BN_EPS]
    ext = fused.extension()
    window: list[float] = []
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()

    def call() -> None:
        start = time.perf_counter()
        ext.forward(*args)
        window.extend([start, time.perf_counter()])

    torch.set_num_threads(1)  # the call on one core, the main thread's loop on another
    sys.setswitchinterval(1e-4)
    try:
        worker = threading.Thread(target=call)
        stamps = []
        worker.start()
        while worker.is_alive():
            stamps.append(time.perf_counter())
        worker.join()
    finally:
        torch.set_num_threads(threads)
        sys.setswitchinterval(interval)
    start, end = window
    inside = [start] + [s for s in stamps if start < s < end] + [end]
    longest = max(b - a for a, b in zip(inside, inside[1:]))
    assert longest < (end - start) / 2, f"no Python ran for {longest:.3f} s of a {end - start:.3f} s kernel call"


STEM_SHAPES = [(5, 8, 28, 28), (4, 6, 9, 7), (2, 3, 5, 6), (1, 2, 2, 2)]  # [N, C, H, W] of the conv's output


def stem_inputs(shape, dtype=torch.float64, seed=0, conv_bias=True):
    """A one-channel image batch (channels-last, as baselines.core lays it out) and the first block's parameters."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = conv_layout(torch.rand(n, 1, h, w, generator=gen, dtype=dtype) * 2 + 0.5)
    conv_w = torch.randn(c, 1, 3, 3, generator=gen, dtype=dtype).requires_grad_()
    conv_b = torch.randn(c, generator=gen, dtype=dtype).requires_grad_() if conv_bias else None
    return (x, conv_w, conv_b, *inputs(shape, dtype, seed)[1:])


def stem_values_and_grads(fn, args, seed=1):
    out = fn(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    wrt = [t for t in args if t is not None and t.requires_grad]
    return (out, *torch.autograd.grad(out, wrt, g))


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("shape", STEM_SHAPES)
def test_stem_values_and_gradients_match_the_unfused_ops_in_float64(shape, conv_bias):
    args = stem_inputs(shape, conv_bias=conv_bias)
    got = stem_values_and_grads(fused.stem, args)
    want = stem_values_and_grads(fused.stem_reference, args)
    assert got[0].shape == (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    if conv_bias:  # batch norm removes the conv's bias: its gradient is zero (torch's is zero up to rounding)
        assert torch.equal(got[2], torch.zeros_like(got[2])) and want[2].abs().max() < 1e-10


def test_stem_float32_is_as_close_to_float64_as_the_unfused_ops():
    """Omniglot's first block on 5-way 1-shot queries (75 images, 64 channels): the stem's sums over the 58800
    positions are taken from the taps' sums in double, so it is at least as close to the float64 result as
    torch's float32 ops (measured: 1e-7 against 1e-4 relative)."""
    args64 = stem_inputs((75, 64, 28, 28))
    args32 = [t.detach().float().requires_grad_(t.requires_grad) for t in args64]  # (the same g: drawn in float64)
    truth = stem_values_and_grads(fused.stem_reference, args64)
    ours = stem_values_and_grads(fused.stem, args32)
    torchs = stem_values_and_grads(fused.stem_reference, args32)
    for i, (a, t, e) in enumerate(zip(ours, torchs, truth)):
        if i == 2:  # the conv bias: zero (ours) against rounding noise (torch's)
            continue
        scale = e.abs().max().item()
        assert (a.double() - e).abs().max().item() / scale <= max(1e-5, (t.double() - e).abs().max().item() / scale)


def test_stem_second_and_third_order_gradients_are_exact_for_an_input_that_needs_its_gradient():
    """An input that needs its gradient recomputes the conv and differentiates it with the block kernel: exact to
    every order."""
    args = stem_inputs((3, 5, 8, 6), seed=2)
    args[0].requires_grad_()

    def orders(fn):
        x, conv_w, _, w, b = args
        gx, gcw = torch.autograd.grad((fn(*args) ** 2).sum(), (x, conv_w), create_graph=True)
        second = torch.autograd.grad((gx ** 3).sum() + (gcw ** 2).sum(), (x, conv_w, w, b), create_graph=True)
        return (*second, *torch.autograd.grad(sum((t ** 2).sum() for t in second), (x, conv_w, w, b)))

    for a, e in zip(orders(fused.stem), orders(fused.stem_reference)):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("shape", STEM_SHAPES)
def test_stem_recorded_backward_is_exact_to_the_third_order(shape):
    """MAML's second-order inner step (the images need no gradient): the stem's backward recorded by
    `_StemBackward`, its backward in C++ (`stem_double_backward`), a third order through `stem_reference`;
    each order against the unfused ops in float64, with every cotangent and with the conv weight's alone."""
    args = stem_inputs(shape, seed=2)

    def orders(fn):
        _, conv_w, _, w, b = args
        gcw, gw, gb = torch.autograd.grad((fn(*args) ** 2).sum(), (conv_w, w, b), create_graph=True)
        second = torch.autograd.grad((gcw ** 2).sum() + (gw ** 3).sum() + (gb * gw).sum(), (conv_w, w),
                                     retain_graph=True)
        only_conv = torch.autograd.grad((gcw ** 2).sum(), (conv_w, w))  # the other cotangents None
        return (gcw, gw, gb, *second, *only_conv)

    def third(fn):
        _, conv_w, _, w, b = args
        gcw, gw, gb = torch.autograd.grad((fn(*args) ** 2).sum(), (conv_w, w, b), create_graph=True)
        second = torch.autograd.grad((gcw ** 2).sum() + (gw * gb).sum(), (conv_w, w), create_graph=True)
        return torch.autograd.grad(sum((t ** 2).sum() for t in second), (conv_w, w))

    for a, e in zip(orders(fused.stem) + third(fused.stem), orders(fused.stem_reference) + third(fused.stem_reference)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9 * e.abs().max().item())


@pytest.mark.parametrize("input_grad", [True, False])
def test_stem_gradcheck_and_gradgradcheck(input_grad):
    args = stem_inputs((3, 4, 5, 4), seed=3)
    args[0].requires_grad_(input_grad)
    assert torch.autograd.gradcheck(fused.stem, args)
    assert torch.autograd.gradgradcheck(fused.stem, args)


def test_stem_second_order_in_float32_is_as_close_to_float64_as_the_unfused_ops():
    """The second-order terms of a 5-image support set (Omniglot 5-way 1-shot, 64 channels) in float32: the
    backward's sums and Gram matrix in double keep them at least as close to float64 as torch's float32 ops."""
    args64 = stem_inputs((5, 64, 28, 28), seed=4)
    args32 = [t if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in args64]

    def second(fn, args):
        _, conv_w, _, w, b = args
        gcw, gw, gb = torch.autograd.grad((fn(*args) ** 2).sum(), (conv_w, w, b), create_graph=True)
        return torch.autograd.grad((gcw ** 2).sum() + (gw * gb).sum(), (conv_w, w))

    truth, ours, torchs = second(fused.stem_reference, args64), second(fused.stem, args32), second(fused.stem_reference, args32)
    for a, t, e in zip(ours, torchs, truth):
        scale = e.abs().max().item()
        assert (a.double() - e).abs().max().item() / scale <= max(1e-5, (t.double() - e).abs().max().item() / scale)


def test_stem_results_do_not_depend_on_the_thread_count():
    args = stem_inputs((16, 32, 28, 28), torch.float32)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(stem_values_and_grads(fused.stem, args))
    finally:
        torch.set_num_threads(before)
    for a, e in zip(*runs):
        assert torch.equal(a, e)


def test_the_stem_takes_plain_one_channel_first_blocks_only(kernel_calls):
    """Ops.conv_block runs the stem for a one-channel input with the plain layer operations; three channels,
    a layer operation with its own conv (task-batched, MT-nets) or block (MAML++) keep conv + block."""
    from baselines.taskbatch import TaskOps

    gen = torch.Generator().manual_seed(6)
    p = {"conv0.weight": torch.randn(8, 1, 3, 3, generator=gen), "conv0.bias": torch.randn(8, generator=gen),
         "bn0.weight": torch.ones(8), "bn0.bias": torch.zeros(8)}
    x = conv_layout(torch.rand(4, 1, 10, 10, generator=gen))

    class OwnBlock(Ops):
        def fused_block(self, p, name, x):
            return super().fused_block(p, name, x)

    with fused.fused(True):
        got = PLAIN.conv_block(p, 0, x)
        assert kernel_calls == ["stem"]
        OwnBlock().conv_block(p, 0, x)
        assert kernel_calls == ["stem", "block"]
        rgb = dict(p, **{"conv0.weight": torch.randn(8, 3, 3, 3, generator=gen)})
        PLAIN.conv_block(rgb, 0, conv_layout(torch.rand(4, 3, 10, 10, generator=gen)))
        assert kernel_calls == ["stem", "block", "block"]
    assert TaskOps.conv is not Ops.conv  # (so TaskOps keeps conv + block: the task-batched test above)
    with fused.fused(False):
        torch.testing.assert_close(got, PLAIN.conv_block(p, 0, x), rtol=1e-5, atol=1e-5)
    assert kernel_calls == ["stem", "block", "block"]


def maml_meta_grad(first_order: bool):
    gen = torch.Generator().manual_seed(0)
    params = {k: v.double().requires_grad_() for k, v in conv4_init(gen, 1, 8, 5, 28).items()}
    x, qx = torch.rand(10, 1, 28, 28, generator=gen, dtype=torch.float64), torch.rand(15, 1, 28, 28, generator=gen,
                                                                                      dtype=torch.float64)
    y, qy = torch.arange(5).repeat(2), torch.arange(5).repeat(3)
    fast = inner_loop(episode_loss(conv4_forward), params, list(params), (x, y), 2, 0.4, first_order)
    return torch.autograd.grad(F.cross_entropy(conv4_forward(fast, qx), qy), list(params.values()))


@pytest.mark.parametrize("first_order", [True, False])
def test_conv4_maml_meta_gradient_is_the_same_with_the_switch_on(first_order, kernel_calls):
    """Every block of every pass runs fused with the switch on (the second-order inner steps included: they
    go channels-last; the first block in the stem kernel), and the meta-gradient is the unfused one."""
    with fused.fused(False):
        want = maml_meta_grad(first_order)
    assert kernel_calls == []
    with fused.fused(True):
        got = maml_meta_grad(first_order)
    # 3 passes (2 inner steps + the query pass) x (a stem and 3 blocks); a second-order inner step's recorded
    # backward stays in the kernels (the stem's too: no conv recomputed, no block run again) and its convs are
    # fused.conv's
    inner = ["stem", "block", "block", "block"] if first_order else ["stem", "conv", "block", "conv", "block", "conv",
                                                                      "block"]
    assert kernel_calls == inner * 2 + ["stem", "block", "block", "block"]
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_the_switch_decides_per_call(monkeypatch):
    def runs_fused(x):  # the decision of Ops.bn_pool_relu
        return PLAIN.fuses() and fused.applies(x)

    x = conv_layout(torch.rand(4, 8, 6, 6))
    monkeypatch.setenv("METABENCH_FUSED", "1")
    assert fused.enabled() and runs_fused(x)
    assert not runs_fused(x.contiguous())  # NCHW: the unfused ops
    assert not runs_fused(torch.rand(1, 8, 1, 1).contiguous(memory_format=torch.channels_last))
    with fused.fused(False):
        assert not runs_fused(x)
    monkeypatch.setenv("METABENCH_FUSED", "0")
    assert not fused.enabled()
    monkeypatch.setenv("METABENCH_FUSED", "yes")
    with pytest.raises(ValueError, match="METABENCH_FUSED must be 0 or 1"):
        fused.enabled()


def test_layer_operations_with_their_own_batch_norm_keep_it():
    """A subclass that changes batch norm (CAVIA's FiLM) never runs the kernel (MAML++'s StepOps opts in:
    tests/test_mamlpp.py)."""

    class Shifted(Ops):
        def bn(self, p, name, x):
            return super().bn(p, name, x) + 1.0

    p = {"bn.weight": torch.ones(4), "bn.bias": torch.zeros(4)}
    x = conv_layout(torch.rand(3, 4, 6, 6))
    with fused.fused(True):
        got = Shifted().bn_pool_relu(p, "bn", x)
    assert torch.equal(got, F.relu(F.max_pool2d(Shifted().bn(p, "bn", x), 2)))


def test_task_batched_network_runs_fused_with_the_same_values_and_gradients(kernel_calls):
    """The task-batched layer operations (grouped convolutions, one task per group of channels) fuse too."""
    from baselines.taskbatch import conv4_forward_tasks, stack_params

    gen = torch.Generator().manual_seed(5)
    params = {k: v.double().requires_grad_() for k, v in conv4_init(gen, 1, 8, 5, 28).items()}
    x = torch.rand(3, 10, 1, 28, 28, generator=gen, dtype=torch.float64)

    def run():
        out = conv4_forward_tasks(stack_params(params, 3), x)
        return (out, *torch.autograd.grad((out ** 2).sum(), list(params.values())))

    with fused.fused(False):
        want = run()
    assert kernel_calls == []
    with fused.fused(True):
        got = run()
    assert len(kernel_calls) == 4
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def forget_the_build(monkeypatch):
    monkeypatch.setattr(fused, "_ext", None)
    monkeypatch.setattr(fused, "_build_error", None)


def test_a_finished_build_is_imported_without_building(monkeypatch):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "load", lambda *a, **k: pytest.fail("went through torch's build for a finished build"))
    forget_the_build(monkeypatch)
    assert fused.available()
    x, w, b = inputs((3, 4, 6, 6))
    torch.testing.assert_close(fused.bn_pool_relu(x, w, b), fused.bn_pool_relu_reference(x, w, b))


def test_a_lock_taken_after_the_build_finished_does_not_delay_loading_it(monkeypatch, tmp_path):
    """torch's `load` takes the lock even to check that nothing needs building: a process killed there left
    a lock newer than the finished file, which is imported at once (no waiting, no rebuild)."""
    import shutil

    import torch.utils.cpp_extension as cpp

    assert fused.available()
    finished = fused.build_folder() / f"{fused.module_name()}.so"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    fused.build_folder().mkdir(parents=True)
    built = Path(shutil.copy2(finished, fused.build_folder()))
    lock = fused.build_folder() / "lock"
    lock.touch()
    os.utime(lock, (built.stat().st_mtime + 5, built.stat().st_mtime + 5))  # newer, whatever the clock's grain
    monkeypatch.setattr(cpp, "load", lambda *a, **k: pytest.fail("waited for or rebuilt a finished build"))
    forget_the_build(monkeypatch)
    assert fused.available()
    x, w, b = inputs((3, 4, 6, 6))
    torch.testing.assert_close(fused.bn_pool_relu(x, w, b), fused.bn_pool_relu_reference(x, w, b))


def test_a_build_lock_left_by_a_killed_process_is_removed_once_stale(monkeypatch, tmp_path):
    """A process killed inside torch's `load` leaves its lock: a later one waits for it only until it is
    STALE_LOCK_S old, then removes it and builds (without the fix it waited for ever)."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "STALE_LOCK_S", 0.3)
    lock = fused.build_folder() / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    half = lock.parent / f"{fused.module_name()}.so"
    half.write_bytes(b"half written by the killed build")
    os.utime(half, (lock.stat().st_mtime + 5, lock.stat().st_mtime + 5))  # written after the lock was taken
    seen = []
    monkeypatch.setattr(cpp, "load", lambda name, sources, **k: seen.append((lock.exists(), k["build_directory"])))
    forget_the_build(monkeypatch)
    with pytest.warns(RuntimeWarning, match="removing .*lock.*killed"):
        fused.available()  # the half-written file is not imported while the lock stands
    assert seen == [(False, str(lock.parent))]


def test_a_failed_build_says_so_once_and_falls_back(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no finished build there
    monkeypatch.setattr(cpp, "load", no_compiler)
    forget_the_build(monkeypatch)
    with pytest.warns(RuntimeWarning, match="could not be built.*Ninja is required"):
        assert not fused.available()
    assert "Ninja" in fused.build_error()
    assert not fused.available()  # remembered: no second attempt, no second warning
    with fused.fused(True):
        assert not Ops().fuses()


CONV_CASES = [(1, 1, True), (1, 1, False), (2, 1, True), (1, 0, False)]  # stride, padding, bias


def conv_inputs(bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = conv_layout(torch.randn(3, 4, 7, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    w = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("stride, padding, bias", CONV_CASES)
def test_conv_is_conv2d_to_the_third_order(stride, padding, bias):
    """fused.conv against conv2d in float64: values and gradients; its recorded backward's own backward
    (`_ConvBackward`, every cotangent used, with a bias and without); a third order (that backward recorded:
    conv2d's backward differentiated again)."""
    x, w, b = conv_inputs(bias)
    wrt = [t for t in (x, w, b) if t is not None]

    def orders(fn):
        out = fn(x, w, b, stride, padding)
        firsts = torch.autograd.grad((out ** 2).sum(), wrt, create_graph=True)
        loss = sum((f ** 3).sum() for f in firsts)
        second = torch.autograd.grad(loss, (x, w), retain_graph=True)
        again = torch.autograd.grad(loss, (x, w), create_graph=True)
        third = torch.autograd.grad(sum((t ** 2).sum() for t in again), (x, w))
        return (out, *firsts, *second, *third)

    for a, e in zip(orders(fused.conv), orders(F.conv2d)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_conv_gradcheck_and_gradgradcheck():
    x, w, b = conv_inputs(True, seed=1)
    assert torch.autograd.gradcheck(fused.conv, (x, w, b))
    assert torch.autograd.gradgradcheck(fused.conv, (x, w, b))
    assert torch.autograd.gradgradcheck(lambda w: fused.conv(x.detach(), w, None), (w,))  # only the weight's


def test_ops_conv_takes_it_in_second_order_passes_with_the_switch_on(kernel_calls):
    """Ops.conv runs fused.conv only inside `higher_order()` (a forward pass whose backward will be recorded)
    with the switch on; elsewhere conv2d."""
    from baselines.core import higher_order

    x, w, b = (t.detach() for t in conv_inputs(True))
    p = {"c.weight": w, "c.bias": b}
    for switch, second_order in ((True, True), (True, False), (False, True), (False, False)):
        with fused.fused(switch), higher_order(second_order):
            torch.testing.assert_close(PLAIN.conv(p, "c", x), F.conv2d(x, w, b, 1, 1), rtol=1e-12, atol=1e-12)
        assert kernel_calls == ["conv"], (switch, second_order)

"""The fused Conv-4 block tail: batch norm -> 2x2 max-pool -> ReLU as one CPU kernel, with the first block's conv
inside it on one-channel images (the stem), and a conv whose second order is faster than torch's; a switch, off
by default.

In the unfused block (`bn_pool_relu_reference`) each of the three operations reads and writes the
full activation map, max-pool keeps int64 indices and its full input for backward, and its backward
zero-fills a full map before batch norm's backward reads it twice. The kernel
(baselines/fused_bn_pool_relu.cpp) reads the conv output twice forward (statistics, then
normalise-pool-ReLU) and writes only the pooled map and one byte per pooled value (which window
position won, or "cut by the ReLU"); backward takes batch norm's per-channel sums over the pooled
positions and writes the input gradient in one pass. Saved for backward: the conv output, the
byte map and two per-channel vectors.

- Switch: `METABENCH_FUSED=1` in the environment (read at each call), or `fused(True)` around code.
  `metabench perf` times it as the `metabench-fused` implementation.
- Where it applies: CPU, float32/float64, channels-last maps of at least 2x2, outside torch.func
  transforms, in layer operations whose batch norm is the plain one (`Ops.fuses` in
  baselines/core.py; Conv-4 then runs channels-last in second-order passes too) or MAML++'s per-step
  one (its `StepOps` passes the step's row); elsewhere (1x1 maps, vmap, CAVIA's FiLM batch norm, the
  ResNets) the unfused ops run. Summary: Conv-4 methods on the plain, task-batched or per-step layer
  operations.
- The stem (`stem`): on one-channel images (Omniglot) the first block's 3x3 conv runs inside the kernel
  too, so its output, the largest map of the network (75 x 64 x 28 x 28 floats for 5-way 1-shot queries),
  is never stored: the conv at a position is recomputed from its 9 input values where the pooled pass
  needs it, and every sum over positions batch norm needs (forward and backward) comes from the 9 taps'
  sums and Gram matrix (double) and, in the backward, from the sums of g times the taps at each window
  maximum; the conv's bias drops out (batch norm removes it; its gradient is 0). Its backward's own
  backward (MAML's second-order inner step, on the support set) is in C++ too, in closed form from the same
  sums (`_StemBackward`); an input that needs its gradient recomputes conv2d and differentiates it with the
  block kernel. `Ops.conv_block` (baselines/core.py) takes it where `conv` and `fused_block` are the plain
  ones. Three-channel images keep conv2d: 27 taps against 32 channels cost more to recompute than to store.
- The other convs of a second-order pass (`conv`): in a `higher_order()` forward pass (baselines/core.py)
  with the switch on, `Ops.conv` runs conv2d as `conv`, whose recorded backward is differentiated with
  convolutions and convolution backwards (torch's own double backward takes the weight's term as a
  convolution of the transposed maps, twice as slow on a support set's small maps). Torch ops only: the
  same numbers up to rounding.
- Backward and its own backward (second order: MAML's inner loop) are in the kernel too: batch
  norm's double backward in training mode, with the gradient routed through the saved window
  maxima. A third order (a second-order gradient differentiated again) differentiates the unfused
  block's recorded backward instead, so every order is exact (tests/test_fused.py checks values,
  gradients, second- and third-order gradients in float64 against `bn_pool_relu_reference`, and the stem
  against `stem_reference`).
- Its calls release the GIL while the kernel runs, as torch's operators do, so the task pool's threads
  (baselines/parallel.py) do not wait for one another's kernel calls.
- Same numbers up to rounding: the kernel's per-channel sums are taken in fixed blocks and added in
  order, so its results do not depend on the thread count, but they are not bitwise torch's.
- The kernel is compiled on first use with torch.utils.cpp_extension (a C++ compiler is needed;
  the build is cached under torch's extensions folder, TORCH_EXTENSIONS_DIR, one build per processor
  kind, source and flags; a finished build is imported without torch's build lock, see `extension`).
  `available()` says whether it could be built; without it the switch falls back to the unfused ops.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("fused_bn_pool_relu.cpp")
BN_EPS = 1e-5  # baselines.core.BN_EPS (core imports this module)

_override: list[bool] = []  # fused(...) blocks, innermost last (process-wide: the task pool's threads see it)
_ext: Any = None
_build_error: str | None = None
_build_lock = threading.Lock()


def enabled() -> bool:
    """Whether the switch is on: `fused(...)` when inside one, else METABENCH_FUSED=1."""
    if _override:
        return _override[-1]
    value = os.environ.get("METABENCH_FUSED", "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"METABENCH_FUSED must be 0 or 1, got {value!r}")
    return value == "1"


@contextmanager
def fused(on: bool = True) -> Iterator[None]:
    """Turn the fused kernel on (or off) for the code inside, whatever METABENCH_FUSED says (process-wide,
    so tasks on baselines.parallel's threads see it too)."""
    _override.append(on)
    try:
        yield
    finally:
        _override.pop()


CFLAGS = ["-O3", "-march=native"]
STALE_LOCK_S = 900.0  # a build lock older than this was left by a killed process (builds: ~25 s, ~9 min on busy cores)


def extension() -> Any:
    """The compiled kernel module (built on first call); None when it cannot be built (see `build_error`).

    A finished build (its file there, no build under way) is imported directly. torch's `load` takes a
    lock file in the build folder even to find that nothing needs building, and a process killed while
    holding it (out of memory, a stopped grid) left every later process waiting on it for ever: `build`
    waits for a lock only until it is STALE_LOCK_S old, then removes it.
    """
    global _ext, _build_error
    with _build_lock:
        if _ext is None and _build_error is None:
            try:
                _ext = import_built() or build()
            except Exception as exc:  # no compiler, no headers: the unfused ops serve
                _build_error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"baselines/fused.py: the fused kernel could not be built, so the unfused ops run "
                              f"({_build_error.splitlines()[0][:300]})", RuntimeWarning, stacklevel=2)
        return _ext


def build_folder() -> Path:
    """Where the kernel is built: TORCH_EXTENSIONS_DIR (else torch's per-user default) / `module_name()`."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / module_name()


@functools.lru_cache(maxsize=None)
def module_name() -> str:
    """The extension's name: it changes with the processor's instruction set (the build is -march=native,
    so a home folder shared across a cluster never loads another machine's build), the source and the flags
    (computed once per process: it reads /proc/cpuinfo and the source)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = platform.processor() or platform.machine()
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), text)
    key = "\n".join([flags, SOURCE.read_text(), " ".join(CFLAGS), torch.__version__])
    return f"metabench_fused_bn_pool_relu_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def import_built() -> Any:
    """The finished build of this source, imported without torch's lock; None when there is none yet or a
    build may be writing it: a lock stands that is not newer than the file. (A lock newer than the file was
    taken after the build finished, e.g. by torch's check that nothing needs building, in a process that may
    since have been killed.)"""
    import importlib.util

    path = build_folder() / f"{module_name()}.so"
    try:
        built = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        if path.with_name("lock").stat().st_mtime <= built:
            return None
    except FileNotFoundError:
        pass
    spec = importlib.util.spec_from_file_location(module_name(), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build() -> Any:
    """Compile the kernel with torch.utils.cpp_extension and import it, after waiting for another process's
    build lock until it is STALE_LOCK_S old (then it was left by a killed process, and is removed)."""
    import time

    from torch.utils.cpp_extension import load

    folder = build_folder()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            break
        if age > STALE_LOCK_S:
            warnings.warn(f"baselines/fused.py: removing {lock}, a build lock {age:.0f} s old (left by a killed "
                          "process)", RuntimeWarning, stacklevel=3)
            lock.unlink(missing_ok=True)
            break
        time.sleep(min(1.0, STALE_LOCK_S - age + 0.01))
    return load(module_name(), [str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(folder), verbose=False)


def available() -> bool:
    """Whether the kernel is built (building it now if needed)."""
    return extension() is not None


def build_error() -> str | None:
    """Why the kernel could not be built, or None."""
    return _build_error


def bn_pool_relu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The unfused block: relu(max_pool2d(batch_norm(x), 2)); x [N, C, H, W] -> [N, C, H/2, W/2]."""
    y = F.batch_norm(x, None, None, weight, bias, True, 0.0, BN_EPS)
    return F.relu(F.max_pool2d(y, 2))


def applies(x: torch.Tensor) -> bool:
    """Whether the fused kernel can take x [N, C, H, W] (the switch aside)."""
    return (not torch._C._are_functorch_transforms_active()  # first: under vmap is_contiguous(channels_last) raises
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
            and x.shape[2] >= 2 and x.shape[3] >= 2 and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and x.is_contiguous(memory_format=torch.channels_last))


def recorded_double_backward(forward: Callable[..., torch.Tensor], g: torch.Tensor, inputs: Sequence[torch.Tensor],
                             us: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
    """A custom backward's own backward for a third order, from the composed ops, recorded: with firsts the
    gradients of forward(*inputs) with respect to `inputs` for the output gradient g, the gradients of
    sum_i <us[i], firsts[i]> with respect to (g, *inputs) (None where one does not enter; a None cotangent
    is a zero one)."""
    with torch.enable_grad():
        g, *inputs = partial_inputs(g, *inputs)
        firsts = torch.autograd.grad(forward(*inputs), inputs, g, create_graph=True)
        pairs = [(f, u) for f, u in zip(firsts, us) if u is not None]
        return torch.autograd.grad([f for f, _ in pairs], (g, *inputs), [u for _, u in pairs], create_graph=True,
                                   allow_unused=True)


def partial_inputs(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor as its own node of the graph (a view where it has a history, a fresh leaf where it has
    none), so that gradients taken with respect to them are partial derivatives: in a meta-learning graph
    x may itself depend on weight (through an inner loop), and differentiating with respect to the
    tensors themselves would count that path twice."""
    return [t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in tensors]


def _needed(grads: tuple[torch.Tensor | None, ...], needs: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    return tuple(gr if need else None for gr, need in zip(grads, needs))


class _BnPoolRelu(torch.autograd.Function):
    """The kernel's forward; backward in C++, recorded (create_graph) through `_BnPoolReluBackward`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out, idx, mean, invstd = (_ext or extension()).forward(x, weight, bias, BN_EPS)
        ctx.save_for_backward(x, weight, bias, idx, mean, invstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, idx, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # this backward is being recorded: a differentiable backward
            return _needed(_BnPoolReluBackward.apply(grad, x, weight, bias, idx, mean, invstd), ctx.needs_input_grad)
        return _needed(tuple(_ext.backward(grad, x, weight, idx, mean, invstd)), ctx.needs_input_grad)


class _BnPoolReluBackward(torch.autograd.Function):
    """The kernel's backward as a function of (g, x, weight): its own backward (the second-order terms) in
    C++; a third order (its backward recorded) differentiates the unfused block's recorded backward."""

    @staticmethod
    def forward(ctx: Any, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                idx: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(grad, x, weight, bias, idx, mean, invstd)
        return tuple(_ext.backward(grad, x, weight, idx, mean, invstd))

    @staticmethod
    def backward(ctx: Any, u: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # (all three outputs are tensors, so autograd passes zeros, never None, for a cotangent that is unused)
        grad, x, weight, bias, idx, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # third order: the composed ops, recorded again
            grads = recorded_double_backward(bn_pool_relu_reference, grad, (x, weight, bias), (u, v, t))
        else:
            grads = tuple(_ext.double_backward(u, v, t, grad, x, weight, idx, mean, invstd))
        return (*_needed(grads, needs), None, None, None, None)


def bn_pool_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The kernel: batch norm of x [N, C, H, W] (channels-last) with its own statistics and affine
    weight, bias [C], then 2x2 max-pool, then ReLU -> [N, C, H//2, W//2] (where `applies(x)`; `Ops.fuses` says when)."""
    return _BnPoolRelu.apply(x, weight, bias)


STEM_MAX_OUT = 256  # the stem kernel's limit on output channels and on the image width


def stem_reference(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
    """The unfused first block: `bn_pool_relu_reference` of conv2d(x, conv_weight, conv_bias, padding=1);
    x [N, Cin, H, W], conv_weight [C, Cin, 3, 3] -> [N, C, H//2, W//2]."""
    return bn_pool_relu_reference(F.conv2d(x, conv_weight, conv_bias, padding=1), weight, bias)


def stem_applies(x: torch.Tensor, conv_weight: torch.Tensor) -> bool:
    """Whether the stem kernel can take x [N, 1, H, W] and a 3x3 conv_weight [C, 1, 3, 3] (the switch aside):
    `applies(x)`, one input channel, at most STEM_MAX_OUT output channels and pixels across, x's dtype."""
    return (x.dim() == 4 and x.shape[1] == 1 and x.shape[3] <= STEM_MAX_OUT and conv_weight.dim() == 4
            and tuple(conv_weight.shape[1:]) == (1, 3, 3) and conv_weight.shape[0] <= STEM_MAX_OUT
            and conv_weight.dtype == x.dtype and applies(x))  # the shapes first: most blocks fail them at once


def _stem_recorded_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The stem's backward as the composed ops (conv2d, then the block kernel where it applies to conv2d's
    output) recomputed and differentiated, recorded when grad mode is on: for an input that needs its gradient."""
    inputs = list(ctx.saved_tensors[:5])
    needs = ctx.needs_input_grad
    with torch.enable_grad():
        wanted = partial_inputs(*[t for t, need in zip(inputs, needs) if need])
        it = iter(wanted)
        x, conv_weight, conv_bias, weight, bias = [next(it) if need else t for t, need in zip(inputs, needs)]
        y = F.conv2d(x, conv_weight, conv_bias, padding=1)
        out = (bn_pool_relu if applies(y) else bn_pool_relu_reference)(y, weight, bias)
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=torch.is_grad_enabled(), allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


class _Stem(torch.autograd.Function):
    """The stem kernel's forward and first-order backward (C++), its backward recorded through `_StemBackward`;
    an input that needs its gradient through `_stem_recorded_backward`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out, idx, stats = (_ext or extension()).stem_forward(x, conv_weight, weight, bias, BN_EPS)
        ctx.save_for_backward(x, conv_weight, conv_bias, weight, bias, idx, stats)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.needs_input_grad[0]:
            return _stem_recorded_backward(ctx, grad)
        x, conv_weight, conv_bias, weight, bias, idx, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # this backward is being recorded (MAML's second-order inner step)
            grads = _StemBackward.apply(grad, conv_weight, weight, bias, x, idx, stats)
        else:
            grads = _ext.stem_backward(grad, x, conv_weight, weight, idx, stats)[:3]
        d_conv_bias = None if conv_bias is None else torch.zeros_like(conv_bias)  # batch norm removes it: exactly 0
        return _needed((None, grads[0], d_conv_bias, grads[1], grads[2]), ctx.needs_input_grad)


class _StemBackward(torch.autograd.Function):
    """The stem's first-order backward as a function of (g, conv_weight, weight): (d conv_weight, d weight,
    d bias). Its own backward (the second-order terms) in C++ (`stem_double_backward`: closed forms in the
    backward's sums and the taps' Gram matrix, and one pass over the window maxima for g's gradient; the
    derivation is in baselines/fused_bn_pool_relu.cpp); a third order differentiates `stem_reference`'s
    recorded backward."""

    @staticmethod
    def forward(ctx: Any, grad: torch.Tensor, conv_weight: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                x: torch.Tensor, idx: torch.Tensor, stats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d_conv_weight, d_weight, d_bias, sums = _ext.stem_backward(grad, x, conv_weight, weight, idx, stats)
        ctx.save_for_backward(grad, conv_weight, weight, bias, x, idx, stats, sums)
        return d_conv_weight, d_weight, d_bias

    @staticmethod
    def backward(ctx: Any, u_conv: torch.Tensor, u_weight: torch.Tensor,
                 u_bias: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # (all three outputs are tensors, so autograd passes zeros, never None, for a cotangent that is unused)
        grad, conv_weight, weight, bias, x, idx, stats, sums = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # third order: the composed ops, recorded again
            grads = recorded_double_backward(lambda cw, w, b: stem_reference(x, cw, None, w, b), grad,
                                             (conv_weight, weight, bias), (u_conv, u_weight, u_bias))
            return (*_needed(grads, needs), None, None, None)
        grads = _ext.stem_double_backward(u_conv, u_weight, u_bias, x, conv_weight, weight, idx, stats, sums, needs[0])
        return (*_needed((*grads, None), needs), None, None, None)


def stem(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, weight: torch.Tensor,
         bias: torch.Tensor) -> torch.Tensor:
    """The first block in one kernel: 3x3 conv (padding 1) of x [N, 1, H, W] (channels-last) with
    conv_weight [C, 1, 3, 3] and conv_bias [C] (or None), then `bn_pool_relu` with weight, bias [C] ->
    [N, C, H//2, W//2]; the conv's output map is never stored (where `stem_applies`; `Ops.conv_block` says when)."""
    return _Stem.apply(x, conv_weight, conv_bias, weight, bias)


def conv_applies(x: torch.Tensor) -> bool:
    """Whether `conv` can take x [N, C, H, W] (the switch aside): a CPU tensor outside torch.func transforms."""
    return not torch._C._are_functorch_transforms_active() and x.device.type == "cpu"


def _conv_backward(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conf: tuple[bool, int, int],
                   mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
    """torch's convolution backward (what conv2d's own backward runs): the gradients of x, weight and (where
    conf says there is one) the bias for the output gradient g, those in `mask` (the others None)."""
    has_bias, stride, padding = conf
    grads = torch.ops.aten.convolution_backward(g, x, weight, [weight.shape[0]] if has_bias else None, [stride] * 2,
                                                [padding] * 2, [1, 1], False, [0, 0], 1, mask)
    return _needed(grads, tuple(mask))


class _Conv(torch.autograd.Function):
    """conv2d whose backward, when recorded, is `_ConvBackward` (first order: torch's own backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (bias is not None, stride, padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():  # this backward is being recorded (a second-order inner step)
            return (*_ConvBackward.apply(grad, x, weight, ctx.conf, mask), None, None)
        return (*_conv_backward(grad, x, weight, ctx.conf, mask), None, None)


class _ConvBackward(torch.autograd.Function):
    """conv2d's backward as a function of (g, x, weight), with its own backward written as convolutions and
    convolution backwards: for the cotangents (ux, uw, ub) of (dx, dweight, dbias),
        grad g = conv2d(ux, weight) + conv2d(x, uw) + ub,
        grad x = the input gradient of a conv with weight uw for the output gradient g,
        grad weight = the weight gradient of a conv of ux for the output gradient g.
    torch's own (`_convolution_double_backward`) takes the last as a convolution of the transposed maps, g as
    its kernel (1.2 ms against 0.56 ms for 5 x 64 x 14 x 14 maps on one thread; forward, recorded backward and
    its backward of Conv-4's second block on a 5-image support set: 3.75 ms against 5.70 ms). A third order
    differentiates conv2d's recorded backward."""

    @staticmethod
    def forward(ctx: Any, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conf: tuple[bool, int, int],
                mask: list[bool]) -> tuple[torch.Tensor | None, ...]:
        ctx.save_for_backward(grad, x, weight)
        ctx.conf = conf
        return _conv_backward(grad, x, weight, conf, mask)

    @staticmethod
    def backward(ctx: Any, ux: torch.Tensor | None, uw: torch.Tensor | None,
                 ub: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        grad, x, weight = ctx.saved_tensors
        has_bias, stride, padding = ctx.conf
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # third order: conv2d's backward, recorded again
            bias = [torch.zeros(weight.shape[0], dtype=weight.dtype)] if has_bias else []  # (its value does not enter)

            def forward(x_: torch.Tensor, w: torch.Tensor, *b: torch.Tensor) -> torch.Tensor:
                return F.conv2d(x_, w, b[0] if b else None, stride, padding)

            grads = recorded_double_backward(forward, grad, (x, weight, *bias), (ux, uw, ub))
            return (*_needed(grads, needs), None, None)
        d_grad = d_x = d_weight = None
        if needs[0]:  # (ub enters as the bias of the first conv there is)
            if ux is not None:
                d_grad = F.conv2d(ux, weight, ub, stride, padding)
            if uw is not None:
                term = F.conv2d(x, uw, None if ux is not None else ub, stride, padding)
                d_grad = term if d_grad is None else d_grad + term
            if d_grad is None and ub is not None:
                d_grad = torch.zeros_like(grad) + ub.view(1, -1, 1, 1)
        if needs[1] and uw is not None:
            d_x = _conv_backward(grad, x, uw, ctx.conf, [True, False, False])[0]
        if needs[2] and ux is not None:
            d_weight = _conv_backward(grad, ux, weight, ctx.conf, [False, True, False])[1]
        return d_grad, d_x, d_weight, None, None


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
         padding: int = 1) -> torch.Tensor:
    """conv2d(x, weight, bias, stride, padding) of x [N, Cin, H, W], weight [C, Cin, k, k] -> [N, C, H', W'],
    whose recorded backward is differentiated with convolution backwards (`_ConvBackward`); for forward passes
    whose backward will be recorded (`Ops.conv` takes it there where the switch is on and `conv_applies`)."""
    return _Conv.apply(x, weight, bias, stride, padding)

"""The shared functional core of gradient-based methods.

- `conv4_init` / `conv4_forward`: the standard Conv-4 backbone as a pure function of a
  parameter dict (conv 3x3 -> batch norm -> ReLU -> 2x2 max-pool, four times, then a linear
  head; computed as max-pool then ReLU, the same function with bitwise the same gradients and a
  quarter of the ReLU work, since max and a monotone activation commute). Batch norm uses the
  statistics of the batch being predicted (transductive, no running statistics), through torch's fused batch norm: 1.5x faster meta-training than explicit
  mean/variance ops, and its double backward is exact under `torch.func.grad` (tests/test_core.py
  compares it with the explicit formula in float64). Under `torch.func.vmap` it is not (a known
  functorch issue): nothing here vmaps over batch norm; `batch_norm_explicit` is the formula for
  code that must.
- `conv_layout` / `higher_order`: which memory layout a Conv-4 pass runs in (channels-last,
  except passes whose backward is differentiated again, unless the blocks run fused:
  `Ops.block_layout`); the values do not depend on it.
- `Ops`: the layer operations (layout, conv, batch norm) every backbone's forward pass is written
  in (Conv-4 here, ResNet-12 and ResNet-18 in baselines/backbones.py); a fast path or a method
  substitutes some (task-batched grouped convolutions, MAML++'s per-step batch norm, CAVIA's
  FiLM, MT-nets' transformations), so each works on every backbone.
- `inner_loop`: gradient steps on a subset of the parameters with `torch.autograd.grad`;
  second order by default, first order by detaching the inner gradients. Inside `tracing(upto)` it
  also records the parameters after every step, continuing to `upto` steps past its own count
  (the test-time inner-steps axis; what it returns stays the parameters at its own count).
- `GradientLearner`: the MetaLearner plumbing every gradient method shares (the backbone as a
  hyperparameter, setup, the outer loop over meta-batches with its tasks side by side on threads
  when `PARALLEL_TASKS`, Adam on the meta-parameters, state_dict with optimizer and RNG state,
  adapt). A method overrides only the hooks that make it different.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from bench.allocator import tune_malloc_for
from bench.api import Episode, MetaLearner, Predictor, StepCurves, Tags, TaskInfo, new_generator, rng_state
from bench.errors import MetabenchError, MethodError
from baselines import fused
from baselines.parallel import map_tasks, summed_grads, task_workers

Params = dict[str, torch.Tensor]
BN_EPS = 1e-5
HEAD_KEYS = ("head.weight", "head.bias")
"""The linear head's parameters in a Conv-4 parameter dict (the rest is the body)."""
CAPABILITIES = ("PARALLEL_TASKS", "TASK_BATCHED")
"""Fast paths a gradient method may declare (class attributes, True or False). Each class declares
them for itself: a subclass that does not gets False, so overriding a hook never silently keeps a
fast path that would bypass it."""
DECLARED_PER_CLASS = CAPABILITIES + ("STEP_TRACE",)
"""Class flags that are not inherited (a subclass that does not declare one gets False): the fast paths
and STEP_TRACE (GradientLearner)."""


def conv4_init(gen: torch.Generator, in_channels: int, hidden: int, n_out: int, image_size: int) -> Params:
    """Parameters of Conv-4 with `hidden` filters and a linear head of `n_out` outputs.

    Conv weights: Kaiming-uniform like torch's default; BN: weight 1, bias 0; head: Xavier-uniform
    weight, zero bias. Shapes: conv{i}.weight [hidden, c_in, 3, 3], head.weight [n_out, feat].
    """
    p: Params = {}
    c_in, size = in_channels, image_size
    for i in range(4):
        fan_in = c_in * 9
        bound = 1.0 / math.sqrt(fan_in)
        p[f"conv{i}.weight"] = (torch.rand(hidden, c_in, 3, 3, generator=gen) * 2 - 1) * bound * math.sqrt(3)
        p[f"conv{i}.bias"] = torch.zeros(hidden)
        p[f"bn{i}.weight"] = torch.ones(hidden)
        p[f"bn{i}.bias"] = torch.zeros(hidden)
        c_in, size = hidden, size // 2
    return head_init(gen, p, hidden * size * size, n_out)


def head_init(gen: torch.Generator, p: Params, feat: int, n_out: int) -> Params:
    """`p` with the shared linear head added: Xavier-uniform weight [n_out, feat] from `gen`, zero bias [n_out]."""
    bound = math.sqrt(6.0 / (feat + n_out))
    p["head.weight"] = (torch.rand(n_out, feat, generator=gen) * 2 - 1) * bound
    p["head.bias"] = torch.zeros(n_out)
    return p


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Batch norm of x [N, C, H, W] with its own per-channel statistics (fused kernel).

    One value per channel (a single image at a 1x1 map, e.g. ResNet-18's last stage on small images):
    the formula, which gives the bias (F.batch_norm refuses such a batch)."""
    if x.numel() == x.shape[1]:
        return batch_norm_explicit(x, weight, bias)
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, BN_EPS)


def batch_norm_explicit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`batch_norm` as explicit mean/variance operations (the reference formula; vmap-safe)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + BN_EPS) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool with stride 2, x [N, C, H, W] -> [N, C, H//2, W//2]: `F.max_pool2d(x, 2)` in values, memory
    layout and gradients at every order, bit for bit.

    An NCHW map on the CPU (the layout of second-order passes, `higher_order`, and of
    MAML++'s unfused batch norm) is pooled by torch's channels-last kernel and copied back: ~10x faster than
    torch's NCHW kernel with indices (75x64x28x28, one thread: 2.0 ms + 7.5 ms of copies against 21-22 ms). A
    maximum is exact and both kernels scan a window in the same order, keeping the first maximum (or a NaN), so
    the values and the indices the backward routes gradients by are torch's own; the backward is torch's
    max-pool backward on the NCHW input, so its own derivatives are too (tests/test_core.py).
    """
    if (x.dim() != 4 or x.device.type != "cpu" or torch._C._are_functorch_transforms_active()
            or not x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return F.max_pool2d(x, 2)
    return _MaxPool2NCHW.apply(x)


class _MaxPool2NCHW(torch.autograd.Function):
    """`max_pool2`'s channels-last pooling of an NCHW map (forward), with torch's NCHW max-pool backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out, idx = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), [2, 2])
        idx = idx.clone(memory_format=torch.contiguous_format)  # (NCHW strides even where a dimension is 1)
        ctx.save_for_backward(x, idx)
        return out.clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, idx = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [], [0], [1], False, idx)


_HIGHER_ORDER = contextvars.ContextVar("metabench_higher_order", default=False)


@contextmanager
def higher_order(on: bool = True) -> Iterator[None]:
    """Mark the forward passes inside as ones whose backward will be differentiated again
    (second-order inner loops); `conv_layout` keeps them in NCHW."""
    token = _HIGHER_ORDER.set(on)
    try:
        yield
    finally:
        _HIGHER_ORDER.reset(token)


def conv_layout(x: torch.Tensor) -> torch.Tensor:
    """Images x [N, C, H, W] in the memory layout a conv pass runs fastest in; same values.

    Channels-last, where torch's CPU max-pool is ~20x and batch norm ~4x faster than in NCHW
    (75x64x28x28, 2 threads) and convolutions follow their input's layout; except inside
    `higher_order()`, where NCHW is kept because the double backward of batch norm and ReLU is
    slower in channels-last (its per-channel sums reduce across the innermost dimension), and for
    several channels under a torch.func transform (vmap), where a memory format can be neither
    queried nor set.
    """
    if _HIGHER_ORDER.get():
        return x
    n, c, h, w = x.shape
    if c == 1:  # .contiguous(memory_format=...) treats a 1-channel tensor as channels-last already
        return x.reshape(n, h, w, 1).permute(0, 3, 1, 2)
    if torch._C._are_functorch_transforms_active():
        return x
    return x.contiguous(memory_format=torch.channels_last)


class Ops:
    """The layer operations a backbone's forward pass is written in (conv4_features here, the ResNets
    in baselines/backbones.py), with the parameters of layer `name` at p[name + ".weight"] (and
    ".bias"). Substituting some is how a fast path or a method changes every backbone alike: per-task
    grouped convolutions (taskbatch.TaskOps), MAML++'s per-step batch norm, CAVIA's FiLM, MT-nets'
    transformation after each conv."""

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """The input images [N, C, H, W] in the memory layout the pass runs in (`conv_layout`)."""
        return conv_layout(x)

    def conv(self, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, stride: int = 1,
             padding: int = 1) -> torch.Tensor:
        """Convolution `name` (its bias when the dict has one) of x; in a `higher_order` pass with the fused
        switch on, `fused.conv` (whose recorded backward has a faster backward than torch's)."""
        if _HIGHER_ORDER.get() and fused.enabled() and fused.conv_applies(x):
            return fused.conv(x, p[name + ".weight"], p.get(name + ".bias"), stride, padding)
        return F.conv2d(x, p[name + ".weight"], p.get(name + ".bias"), stride, padding)

    def bn(self, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
        """Batch norm `name` of x with the statistics of x (`batch_norm`)."""
        return batch_norm(x, *self.bn_affine(p, name))

    def bn_affine(self, p: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias [C] of the plain batch norm `name` (per channel of the activations)."""
        return p[name + ".weight"], p[name + ".bias"]

    def fuses(self) -> bool:
        """Whether `bn_pool_relu` runs baselines/fused.py's kernel: its switch is on, it is built, and `bn` is
        the plain batch norm (a subclass that changes it keeps the unfused ops)."""
        return type(self).bn is Ops.bn and fused.enabled() and fused.available()

    def block_layout(self, x: torch.Tensor) -> torch.Tensor:
        """The input images [N, C, H, W] of a body of `bn_pool_relu` blocks (Conv-4) in their layout: `layout`,
        but channels-last in second-order passes too where the blocks run fused (the kernel's double
        backward takes channels-last and is faster than torch's in NCHW)."""
        if self.fuses():
            with higher_order(False):
                return self.layout(x)
        return self.layout(x)

    def bn_pool_relu(self, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
        """relu(max_pool2d(bn(x), 2)) for batch norm `name`: x [N, C, H, W] -> [N, C, H//2, W//2]; one fused
        kernel when its switch is on and it applies (baselines/fused.py; only where `bn` is the plain one)."""
        if self.fuses() and fused.applies(x):
            return self.fused_block(p, name, x)
        return F.relu(max_pool2(self.bn(p, name, x)))

    def fused_block(self, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
        """`bn_pool_relu` in baselines/fused.py's kernel (chosen by `bn_pool_relu`): x [N, C, H, W] ->
        [N, C, H//2, W//2]. A subclass that needs more of the block (statistics) extends this."""
        return fused.bn_pool_relu(x, *self.bn_affine(p, name))

    def conv_block(self, p: Mapping[str, torch.Tensor], i: int, x: torch.Tensor) -> torch.Tensor:
        """Conv-4 block i: `bn_pool_relu` of conv i, x [N, C, H, W] -> [N, C', H//2, W//2]. Where the blocks
        run fused, a one-channel input's conv runs inside the kernel too (fused.stem; only where `conv` and
        `fused_block` are the plain ones)."""
        weight = p[f"conv{i}.weight"]
        if (type(self).conv is Ops.conv and type(self).fused_block is Ops.fused_block
                and fused.stem_applies(x, weight) and self.fuses()):
            return fused.stem(x, weight, p.get(f"conv{i}.bias"), *self.bn_affine(p, f"bn{i}"))
        return self.bn_pool_relu(p, f"bn{i}", self.conv(p, f"conv{i}", x))


PLAIN = Ops()


def conv4_features(p: Mapping[str, torch.Tensor], x: torch.Tensor, ops: Ops = PLAIN) -> torch.Tensor:
    """Conv-4 body: x [N, C, H, W] -> features [N, feat] (in the layer operations `ops`)."""
    x = ops.block_layout(x)
    for i in range(4):
        x = ops.conv_block(p, i, x)
    return x.flatten(1)


def head_forward(p: Mapping[str, torch.Tensor], feats: torch.Tensor, way: int | None = None) -> torch.Tensor:
    """The linear head on features [N, feat] -> logits [N, way] (the first `way` outputs; all when None)."""
    w, b = p["head.weight"], p["head.bias"]
    if way is not None:
        w, b = w[:way], b[:way]
    return F.linear(feats, w, b)


def conv4_forward(p: Mapping[str, torch.Tensor], x: torch.Tensor, way: int | None = None) -> torch.Tensor:
    """Conv-4 logits: x [N, C, H, W] -> [N, way] (the first `way` head outputs; all when None)."""
    return head_forward(p, conv4_features(p, x), way)


LossFn = Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepTrace:
    """What `inner_loop` records inside `tracing(upto)`: for each call, the (detached) parameters after
    0, 1, ..., max(steps, upto) steps; `extra_seconds`: time spent on steps beyond each call's own count."""

    upto: int
    calls: list[list[Params]] = dataclasses.field(default_factory=list)
    extra_seconds: float = 0.0
    first_calls: tuple[int, ...] = ()

    def upto_of_next(self) -> int:
        """The count the next `inner_loop` call continues to: first_calls[i] for the i-th call, then `upto`."""
        i = len(self.calls)
        return self.first_calls[i] if i < len(self.first_calls) else self.upto


_TRACE: contextvars.ContextVar[StepTrace | None] = contextvars.ContextVar("metabench_step_trace", default=None)


@contextmanager
def tracing(upto: int, first_calls: Sequence[int] = ()) -> Iterator[StepTrace]:
    """Inside: every `inner_loop` call records its parameters after each step and continues to `upto`
    steps when its own count is lower (returning, as always, the parameters at its own count); the first
    len(first_calls) calls continue to those counts instead (0: only their own steps; e.g. LEO's latent
    loop, followed by the fine-tuning loop that goes on)."""
    trace = StepTrace(int(upto), first_calls=tuple(int(n) for n in first_calls))
    token = _TRACE.set(trace)
    try:
        yield trace
    finally:
        _TRACE.reset(token)


def inner_loop(loss_fn: LossFn, params: Params, keys: list[str], data: tuple[torch.Tensor, torch.Tensor],
               steps: int, lr: float | Mapping[str, torch.Tensor], first_order: bool = False) -> Params:
    """`steps` gradient steps on params[keys] of loss_fn(params, x, y); returns the adapted dict.

    lr: one float, or a tensor per key (per-parameter learning rates, e.g. Meta-SGD). With
    first_order=False the result stays differentiable w.r.t. `params` through the inner
    gradients (second order, `create_graph=True`); with True the inner gradients are detached.
    The inner gradients are partial derivatives w.r.t. each key, also where one parameter is
    computed from another (Proto-MAML's head from the body's prototypes): they are taken w.r.t.
    a zero added to each adapted parameter. Plain `torch.autograd.grad` (not `torch.func.grad`):
    the same numbers with less per-operation overhead and about half the memory here.
    """
    x, y = data
    fast = dict(params)
    trace = _TRACE.get()
    if trace is None:
        for _ in range(steps):
            fast = _inner_step(loss_fn, fast, keys, (x, y), lr, first_order)
        return fast
    states, result, extra_start, upto = [_detached(fast)], fast, 0.0, trace.upto_of_next()
    for step in range(max(steps, upto)):
        if step == steps:
            result, extra_start = fast, time.perf_counter()
        fast = _inner_step(loss_fn, fast, keys, (x, y), lr, first_order)
        states.append(_detached(fast))
    if steps >= upto:
        result = fast
    else:
        trace.extra_seconds += time.perf_counter() - extra_start
    trace.calls.append(states)
    return result


def tasks_on_pool(run: Callable[[slice], Params], n_tasks: int, per_worker: int) -> Params:
    """A task-batched inner loop of `n_tasks` tasks cut into consecutive slices of `per_worker` tasks, each slice
    run(slice) -> parameters [len(slice), ...] on a single-threaded task-pool worker (parallel.map_tasks; a single
    slice too), concatenated in task order: parameters [n_tasks, ...], detached.

    Each task's numbers then come from one thread whatever the number of workers, as in training. Inside
    `tracing`, each slice records its own inner loop (one `inner_loop` call per slice) and the records join the
    caller's trace as ONE call over the n tasks (what `adapt_steps` reads); the seconds beyond the own steps
    are the workers' share of them, scaled to the wall-clock time of the whole (they ran side by side)."""
    trace = _TRACE.get()
    upto = None if trace is None else trace.upto_of_next()

    def one(tasks: slice) -> tuple[Params, list[Params], float, float]:
        start = time.perf_counter()
        if upto is None:
            return _detached(run(tasks)), [], 0.0, 0.0
        with tracing(upto) as own:
            fast = _detached(run(tasks))
        if len(own.calls) != 1:
            raise MethodError(f"a task-batched inner loop made {len(own.calls)} inner_loop calls; it must make one")
        return fast, own.calls[0], own.extra_seconds, time.perf_counter() - start

    slices = [slice(first, min(first + per_worker, n_tasks)) for first in range(0, n_tasks, per_worker)]
    start = time.perf_counter()
    parts = list(map_tasks(one, slices, single_here=False))
    wall = time.perf_counter() - start
    fast = {k: torch.cat([part[0][k] for part in parts]) for k in parts[0][0]}
    if trace is not None:
        steps = range(len(parts[0][1]))
        trace.calls.append([{k: torch.cat([part[1][s][k] for part in parts]) for k in parts[0][1][s]} for s in steps])
        busy = sum(part[3] for part in parts)
        trace.extra_seconds += wall * sum(part[2] for part in parts) / busy if busy > 0 else 0.0
    return fast


def record_steps(step: Callable[[Any, int], Any], start: Any, own: int, upto: int) -> tuple[list[Any], float]:
    """A method's own inner loop run step by step and kept: states[s] = the state after s steps (states[0] =
    `start`), s = 0..max(own, upto), each from `step(state, s)` (s the index of the step being taken). The
    steps past `own` only extend the list: states[own] is what `own` steps alone give. Returns the states and
    the seconds spent beyond `own` (the extra time of `MetaLearner.adapt_steps`)."""
    states, extra_start = [start], None
    for s in range(max(own, upto)):
        if s == own:
            extra_start = time.perf_counter()
        states.append(step(states[-1], s))
    return states, (0.0 if extra_start is None else time.perf_counter() - extra_start)


def step_curve(states: Sequence[Any], own: int,
               make: Callable[[Any, int], Predictor]) -> tuple[Predictor, dict[int, Predictor]]:
    """The main predictor make(states[own], own) and the curve {s: make(states[s], s)} over every recorded
    step, holding the main predictor itself at `own` (so evaluate reuses its logits: the same number)."""
    main = make(states[own], own)
    return main, {s: main if s == own else make(state, s) for s, state in enumerate(states)}


def _detached(p: Params) -> Params:
    return {k: v.detach() for k, v in p.items()}


def _inner_step(loss_fn: LossFn, fast: Params, keys: list[str], data: tuple[torch.Tensor, torch.Tensor],
                lr: float | Mapping[str, torch.Tensor], first_order: bool) -> Params:
    """One step of `inner_loop`: fast with fast[keys] moved against their (partial) gradients."""
    zeros = [torch.zeros_like(fast[k], requires_grad=True) for k in keys]
    with higher_order(not first_order):
        loss = loss_fn({**fast, **{k: fast[k] + z for k, z in zip(keys, zeros)}}, *data)
    grads = torch.autograd.grad(loss, zeros, create_graph=not first_order, allow_unused=True)
    fast = dict(fast)
    for k, z, g in zip(keys, zeros, grads):
        g = torch.zeros_like(z) if g is None else g
        fast[k] = fast[k] - (lr[k] * g if isinstance(lr, Mapping) else lr * g)
    return fast


def episode_loss(forward: Callable[..., torch.Tensor]) -> LossFn:
    """Cross-entropy of `forward(params, x, way)` with way = number of labels present."""

    def loss(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward(p, x, int(y.max()) + 1), y)

    return loss


def on_cuda(device: torch.device | str) -> bool:
    """Whether `device` is a CUDA device."""
    return torch.device(device).type == "cuda"


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state)`, keeping the optimizer's own `capturable` setting (a checkpoint written
    on the CPU resumes on a GPU with Adam's step counts moved to the parameters' device, and back)."""
    capturable = [group.get("capturable") for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, capturable):
        if own is None:
            continue
        group["capturable"] = own
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = (step.to(p.device, torch.float32) if own
                                              else step.to("cpu"))


def next_batch(episodes: Iterator[Episode], n: int) -> list[Episode]:
    """The next `n` episodes of a stream."""
    return [next(episodes) for _ in range(n)]


def step_decay(base_lr: float, rate: float, every: int, step: int) -> float:
    """Step-decayed learning rate: base_lr * rate ** (step // every) (constant when every <= 0)."""
    return base_lr * rate ** (step // every) if every > 0 else base_lr


DROP_SALT = 5
"""Generator salt of the per-task DropBlock draws (the meta-parameters use 1)."""


def backbone_of(name: str, widths: str, hidden: int) -> Any:
    """baselines.backbones.get_backbone (imported here: that module builds on this one's functions)."""
    from baselines.backbones import get_backbone

    return get_backbone(name, widths, hidden)


@dataclass
class GradientLearner(MetaLearner):
    """Shared plumbing for methods whose meta-parameters are a backbone's parameter dict.

    The backbone is a hyperparameter (baselines/backbones.py): `backbone` "conv4" (`hidden` filters),
    "resnet12" or "resnet18" with `widths` ("64-160-320-640"; "" = the standard ones), and
    `dropblock` (ResNet-12's DropBlock drop rate; 0 = off). The three are left out of params()
    while they hold their defaults (OMIT_AT_DEFAULT), so the params_hash of every Conv-4 run
    recorded before they existed stays the same.

    Subclasses implement `task_loss(ep)` (outer loss of one task, differentiable w.r.t.
    self.meta) and `adapt_params(support_x, support_y)` (adapted parameters for prediction), or
    override `outer_step(batch)` for a non-gradient outer update (Reptile). They build the network
    through `init_net` / `features` / `forward`, so every backbone serves them.
    """

    meta_batch: int = 32
    outer_lr: float = 1e-3
    hidden: int = 64
    backbone: str = "conv4"
    widths: str = ""
    dropblock: float = 0.0

    TAGS = Tags(bn_mode="transductive", order="second", transductive=True, variable_way=True)
    # Capabilities (CAPABILITIES above; each class declares its own, else False).
    # PARALLEL_TASKS: task_loss reads but never writes shared state: outer_step then computes the
    # tasks of a meta-batch side by side on a thread pool (baselines/parallel.py).
    # TASK_BATCHED: the per-task computation is MAML's (inner loop over `adapted_keys` at
    # `inner_lrs` on Conv-4, cross-entropy on the query): adapt_many and task_batch training may
    # then run many tasks as one task-batched network (baselines/maml.py).
    PARALLEL_TASKS: ClassVar[bool] = False
    TASK_BATCHED: ClassVar[bool] = False
    STEP_TRACE: ClassVar[bool] = False
    """Adaptation ends in ONE `inner_loop` call per task (or one task-batched call for a chunk) over the whole
    parameter dict that `predictor` takes: `adapt_steps` then records the query accuracy after every
    test-time inner step from that call (`tracing`). Declared per class (DECLARED_PER_CLASS)."""
    LIMITS: ClassVar[dict[str, str]] = {"hidden": ">=1", "meta_batch": ">=1", "outer_lr": ">0", "dropblock": "0..0.99"}
    OMIT_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("backbone", "widths", "dropblock")
    DROPBLOCK_TASKS: ClassVar[bool] = True
    """Meta-training goes through `backward_tasks`, which gives every task its own DropBlock generator;
    a method with its own outer update that does not (Reptile, iMAML) sets False: dropblock > 0 is then
    an error at setup."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in DECLARED_PER_CLASS:
            if name not in cls.__dict__:
                setattr(cls, name, False)

    @property
    def net(self) -> Any:
        """The backbone these hyperparameters name (a baselines.backbones.Backbone)."""
        return backbone_of(self.backbone, self.widths, self.hidden)

    @property
    def backbone_label(self) -> str:
        """The backbone and its widths, as protocol cards show it ("conv4-64", "resnet12-64-160-320-640")."""
        return self.net.label

    # --- construction -------------------------------------------------------------------
    def init_net(self, info: TaskInfo, gen: torch.Generator, n_out: int) -> Params:
        """The backbone's parameters for `info`'s images with a linear head of `n_out` outputs."""
        c, h, _ = info.image_shape
        return self.net.init(gen, c, n_out, h)

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """Initial meta-parameters (default: the backbone with a max_way head)."""
        return self.init_net(info, gen, info.max_way)

    def features(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, ops: Ops = PLAIN) -> torch.Tensor:
        """The backbone's features [N, feat] of parameters `p` on x [N, C, H, W] (layer operations `ops`)."""
        return self.net.features(p, x, ops)

    def forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, way: int | None = None) -> torch.Tensor:
        """Logits [N, way] of parameters `p` on x [N, C, H, W]."""
        return head_forward(p, self.features(p, x), way)

    @classmethod
    def check_backbone(cls, params: Mapping[str, Any], image_shape: tuple[int, int, int] | None = None) -> None:
        """A MetabenchError when hyperparameters `params` (defaults for the rest) name no backbone this
        method can use, or, given image_shape (C, H, W), one too small for such images."""
        values = {f.name: f.default for f in dataclasses.fields(cls)} | dict(params)
        backbone_of(values["backbone"], values["widths"], values["hidden"]).check(image_shape, values["dropblock"])
        if values["dropblock"] and not cls.DROPBLOCK_TASKS:
            raise MetabenchError(f"{cls.__name__} trains through its own outer update, which draws no per-task "
                                 "DropBlock masks: dropblock must be 0")

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """Checks of hyperparameters together, before construction (bench.hparams.validate calls it)."""
        cls.check_backbone(params)

    def setup(self, info: TaskInfo) -> "GradientLearner":
        self.check_backbone(self.params(), info.image_shape)
        self.info = info
        self.gen = new_generator(self.seed, 1)
        self.meta = {k: v.to(self.device).requires_grad_(True) for k, v in self.init_meta(info, self.gen).items()}
        self.optimizer = self.make_optimizer()
        self.fit_episodes = 0
        self.fit_steps = 0
        return self

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam on all meta-parameters (override for other outer optimizers); on CUDA with its step count on the
        device (`capturable`), so that a CUDA graph can capture the step (baselines/cudagraph.py)."""
        return torch.optim.Adam(list(self.meta.values()), lr=self.outer_lr, capturable=on_cuda(self.device))

    def ensure_setup(self, ep: Episode) -> None:
        """Set up from the first episode seen when the harness did not call setup."""
        if self.info is None:
            c, h, w = ep.support_x.shape[1:]
            self.setup(TaskInfo((int(c), int(h), int(w)), ep.way, max(ep.classes) + 1))

    # --- training -----------------------------------------------------------------------
    def task_loss(self, ep: Episode) -> torch.Tensor:
        """Outer loss of one task, differentiable w.r.t. self.meta."""
        raise NotImplementedError

    def training_loss(self, ep: Episode) -> torch.Tensor:
        """`task_loss(ep)` in meta-training: with dropblock > 0, ResNet-12's dropout/DropBlock masks are
        drawn from a generator of this task alone, seeded by (seed, outer step, episode index), so
        tasks may run side by side and a resumed run draws the same masks."""
        if not self.dropblock:
            return self.task_loss(ep)
        from baselines.backbones import dropping

        with dropping(self.dropblock, new_generator(self.seed, DROP_SALT, self.fit_steps, ep.index)):
            return self.task_loss(ep)

    def current_outer_lr(self) -> float | None:
        """The outer learning rate of the next update (a schedule); None keeps the optimizer's."""
        return None

    def meta_grad_clamp(self) -> float:
        """Element-wise clamp applied to the meta-gradient before the update (0: none)."""
        return 0.0

    def outer_step(self, batch: list[Episode]) -> None:
        """One outer update on a meta-batch: mean task loss, optional clamp, one optimizer step
        (at `current_outer_lr` when the method schedules it)."""
        lr = self.current_outer_lr()
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.backward_tasks(batch)
        limit = self.meta_grad_clamp()
        if limit > 0:
            for v in self.meta.values():
                if v.grad is not None:
                    v.grad.clamp_(-limit, limit)
        self.optimizer.step()

    @property
    def tasks_side_by_side(self) -> bool:
        """Whether meta-training runs the tasks of a meta-batch on the task pool: PARALLEL_TASKS, on a backbone
        whose tasks are small enough to gain from it (`Backbone.pool_tasks`: Conv-4, not the ResNets)."""
        return self.PARALLEL_TASKS and self.net.pool_tasks

    @property
    def adapts_side_by_side(self) -> bool:
        """Whether evaluation adapts (MAML's task-batched adapt_many, TASK_BATCHED) and predicts on the task pool,
        each slice of tasks and each prediction on one thread: on a backbone that pools tasks, with the pool on, on
        the CPU (on a GPU the whole chunk is one pass: launches, not cores, bound it there).
        The numbers then do not depend on the number of workers or of torch's threads."""
        return self.TASK_BATCHED and self.net.pool_tasks and task_workers() > 0 and not on_cuda(self.device)

    def map_predictions(self, calls: Sequence[tuple[Predictor, torch.Tensor]]) -> list[torch.Tensor]:
        if not self.adapts_side_by_side:
            return super().map_predictions(calls)

        def predict(call: tuple[Predictor, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                return call[0](call[1])

        return list(map_tasks(predict, calls, single_here=False))

    def backward_tasks(self, batch: list[Episode]) -> None:
        """Add the gradient of the mean task loss over `batch` to the meta-parameters' .grad
        (tasks side by side on a thread pool when `tasks_side_by_side`, else one after another)."""
        n = len(batch)
        if not self.tasks_side_by_side:
            for ep in batch:
                (self.training_loss(ep) / n).backward()
            return
        params = list(self.meta.values())
        for p, g in zip(params, summed_grads(lambda ep: self.training_loss(ep) / n, batch, params)):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def episodes_per_step(self) -> int:
        """How many stream episodes the next outer update consumes (default: meta_batch)."""
        return self.meta_batch

    def largest_task_block(self, batch: Sequence[Episode]) -> int:
        """Bytes of the largest activation one task of `batch` allocates on the task pool: the first conv's float32
        output [n, C', H, W] for the larger of its support and query sets (the body's first map is its largest
        on the backbones that pool tasks); 0 where the tasks do not run on the pool."""
        if not self.tasks_side_by_side:
            return 0
        _, _, c_out, _ = self.net.layers()[0]
        return max(max(len(ep.support_x), len(ep.query_x)) * c_out * ep.support_x.shape[-2] * ep.support_x.shape[-1] * 4
                   for ep in batch)

    def fit(self, episodes: Iterator[Episode], steps: int) -> "GradientLearner":
        for _ in range(steps):
            batch = next_batch(episodes, self.episodes_per_step())
            self.ensure_setup(batch[0])
            tune_malloc_for(self, batch)  # glibc, once: each step's freed graph kept for the next
            for ep in batch:
                self.check_way(ep)
            self.outer_step(batch)
            self.fit_episodes += len(batch)
            self.fit_steps += 1
        return self

    # --- adaptation ---------------------------------------------------------------------
    def adapt_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        """Parameters adapted to a support set (detached)."""
        raise NotImplementedError

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        if self.info is None:
            raise RuntimeError(f"{type(self).__name__}: call setup(info) or fit before adapt")
        with torch.enable_grad():
            fast = self.adapt_params(support_x, support_y)
        return self.predictor({k: v.detach() for k, v in fast.items()}, int(support_y.max()) + 1)

    @property
    def test_steps(self) -> int | None:
        """The test-time inner steps (inner_steps_test, else inner_steps; None for a method without them)."""
        from bench.results import inner_steps_of  # (results imports pandas: not at baselines' import time)

        steps = inner_steps_of(self.params())
        return None if steps < 0 else steps

    def adapt_steps(self, supports: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    upto: int) -> tuple[list[Predictor], StepCurves, float]:
        """With STEP_TRACE: `adapt_many`'s predictors, and per task a predictor after each inner step
        0..max(test_steps, upto) recorded from the same inner loop (`tracing`), and the seconds spent
        beyond the test steps. A method that overrides `adapt_recorded`: its own record per task (the extra
        seconds then a callable, read by evaluate after the main predictions). Otherwise MetaLearner's single
        point."""
        if type(self).adapt_recorded is not GradientLearner.adapt_recorded:
            if self.info is None:
                raise RuntimeError(f"{type(self).__name__}: call setup(info) or fit before adapt")
            with torch.enable_grad():
                recorded = [self.adapt_recorded(x, y, upto) for x, y in supports]
            extras = [extra for _, _, extra in recorded]
            return ([main for main, _, _ in recorded], [curve for _, curve, _ in recorded],
                    (lambda: sum(e() if callable(e) else e for e in extras)))
        if not self.STEP_TRACE:
            return super().adapt_steps(supports, upto)
        with tracing(upto) as trace:
            predictors = self.adapt_many(supports)
        ways = [int(y.max()) + 1 for _, y in supports]
        if len(trace.calls) == len(supports):
            curves = [{s: self.predictor(p, way) for s, p in enumerate(states)}
                      for states, way in zip(trace.calls, ways)]
        elif len(trace.calls) == 1 and len(supports) > 1:  # one task-batched inner loop: parameters [T, ...]
            curves = [{s: self.predictor({k: v[t] for k, v in p.items()}, way) for s, p in enumerate(trace.calls[0])}
                      for t, way in enumerate(ways)]
        else:
            raise MethodError(f"{type(self).__name__} declares STEP_TRACE, but adapting {len(supports)} task(s) made "
                              f"{len(trace.calls)} inner_loop call(s); it must end in one call per task")
        return predictors, curves, trace.extra_seconds

    def adapt_recorded(self, support_x: torch.Tensor, support_y: torch.Tensor,
                       upto: int) -> tuple[Predictor, dict[int, Predictor], float | Callable[[], float]]:
        """A method with its own inner loop (not one `inner_loop` call: no STEP_TRACE) may override this to
        record its curve itself, in the same pass as its main number: `adapt`'s predictor for the support set
        (support_x [n, C, H, W], support_y [n]), {step: predictor after that many of its inner steps} for
        0..max(test_steps, upto) (the main predictor itself at test_steps; `step_curve`), and the seconds
        spent beyond test_steps (a callable when they are spent inside the predictor, read after it ran).
        `adapt_steps` then calls it per task, with gradients on."""
        raise NotImplementedError

    def predictor(self, fast: Params, way: int) -> Predictor:
        """query_x [n_query, C, H, W] -> logits [n_query, way] of the adapted parameters `fast`."""

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.forward(fast, query_x, way)

        return predict

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.info is None:
            raise RuntimeError(f"{type(self).__name__}: nothing to save before setup")
        return {
            "method": type(self).__name__,
            "hyperparameters": self.params(),
            "info": {"image_shape": list(self.info.image_shape), "max_way": self.info.max_way,
                     "n_classes": self.info.n_classes, "variable_way": self.info.variable_way},
            "meta": {k: v.detach().clone() for k, v in self.meta.items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(self.gen),
            "fit_episodes": self.fit_episodes,
            "fit_steps": self.fit_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> "GradientLearner":
        info = state["info"]
        self.setup(TaskInfo(tuple(info["image_shape"]), info["max_way"], info["n_classes"], info["variable_way"]))
        with torch.no_grad():
            for k, v in state["meta"].items():
                self.meta[k].copy_(v)
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.gen.set_state(state["rng"])
        self.fit_episodes = int(state["fit_episodes"])
        self.fit_steps = int(state["fit_steps"])
        return self

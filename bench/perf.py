"""The performance benchmark (`python -m bench.perf`, `metabench perf`): meta-training speed,
peak memory, evaluation throughput and achieved FLOP rate, side by side with learn2learn.

For each workload (a method's paper settings on a benchmark shape, `WORKLOADS`), implementation
("metabench" and its variants "metabench-batched" (on a GPU replayed as a CUDA graph: baselines/cudagraph.py),
"metabench-batched-eager" (the same without the graph), "metabench-lean", "metabench-fused" (with
baselines/fused.py's kernel) and "metabench-lean-fused" (both switches); "reference"; "l2l" when
learn2learn is installed) and method ("maml", "fomaml", or any registered gradient method for
metabench), one fresh worker process measures:

- sec_per_iter: median seconds of one meta-iteration (one outer update on a meta-batch) over
  `repeats` runs after `warmup` iterations;
- peak_mb: growth of the process's peak resident memory (VmHWM, reset through
  /proc/self/clear_refs) over all its training iterations (the first, the warm-up and the timed
  ones), over the resident memory just before the first, with nothing run in the process before it
  but building the model and data. What malloc holds free is given back first
  (bench.allocator.release_free_memory), or a block reusing pages an earlier one left resident
  would not show. The matmul probe runs after training: run first, its thread pool and allocator
  state took 100-120 MB off learn2learn's Omniglot 5-way 1-shot MAML peak (181-197 MB without it).
  On a GPU, torch.cuda.max_memory_allocated of those iterations;
- heap_peak_mb: growth of the bytes malloc has handed out and not yet had back (glibc's mallinfo2:
  in-use heap chunks plus mapped blocks, sampled every half millisecond by a thread) during the first
  training iteration (the sampling thread would disturb the timed ones): the memory the tensors need,
  without what the allocator keeps cached (which peak_mb includes and which depends on the allocator's
  history); NaN under another allocator;
- eval_eps_per_s: test episodes per second (adapt with the test-time steps, predict the query);
- eval_faults_per_ep: the process's minor page faults (getrusage) during that timed evaluation, per
  episode: memory the allocator had to fault in fresh (glibc growing and giving back the main thread's
  heap after the task pool trained, e.g.), a count that explains a slow evaluation without timing it;
- gflops, flop_fraction: the workload's FLOPs (convolutions and matmuls of one meta-iteration,
  counted once with torch's FlopCounterMode on a plain-autograd reference of the same math, so
  every implementation is credited the same work) per second, and that rate over the machine's
  large-matmul rate (a 2048x2048 float32 matmul timed in the same worker);
- tf32: on a GPU, whether cuDNN's convolutions and the matmuls may round through TF32 (torch's default: the
  convolutions do; `--no-tf32` turns both off); empty on the CPU.

Each worker runs under the requested allocator ("glibc", or "tcmalloc" preloaded with
LD_PRELOAD) and thread count. `--rounds R` runs the whole plan R times, a round at a time, every other
round with the implementations in reverse order: a ratio pairs two rows of one round (measured minutes
apart, not a whole run apart, on a machine whose speed drifts) and the report gives the median of the
rounds' ratios with each round's speed ratio. Inputs are seeded random images of the workload's shapes (speed
does not depend on pixel values). The report is a table on stdout and a CSV (written atomically);
ratios against learn2learn are printed per workload, method and allocator.

    python -m bench.perf --csv perf.csv
    python -m bench.perf --workloads omniglot-5w1s --methods maml --allocators glibc tcmalloc
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import functools
import importlib.machinery
import importlib.util
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from bench.allocator import libc_function, release_free_memory, tcmalloc_loaded, tcmalloc_path, tune_malloc_for
from bench.api import Episode, TaskInfo
from bench.errors import MetabenchError, unknown
from bench.runner import resolve_device
from bench.paths import atomic_write_text
from baselines.core import on_cuda
from baselines.parallel import task_workers

IMPLS = ("metabench", "metabench-batched", "metabench-batched-eager", "metabench-lean", "metabench-fused",
         "metabench-lean-fused", "reference", "l2l")
IMPL_ENV = {"metabench": {"METABENCH_FUSED": "0"}, "metabench-batched": {"METABENCH_FUSED": "0"},
            "metabench-batched-eager": {"METABENCH_FUSED": "0", "METABENCH_CUDA_GRAPHS": "0"},
            "metabench-lean": {"METABENCH_TASK_WORKERS": "0", "METABENCH_FUSED": "0"},
            "metabench-fused": {"METABENCH_FUSED": "1"},
            "metabench-lean-fused": {"METABENCH_TASK_WORKERS": "0", "METABENCH_FUSED": "1"}}
"""The environment that makes an implementation of metabench's own (baselines.parallel's pool switch,
baselines.fused's kernel switch, baselines.cudagraph's switch)."""
DEFAULT_IMPLS = ("metabench", "metabench-batched", "l2l")
"""What `--impls` defaults to for maml/fomaml; `--methods all` defaults to metabench and reference."""
ALLOCATORS = ("glibc", "tcmalloc")
COLUMNS = ["round", "workload", "inner_steps", "impl", "method", "allocator", "threads", "task_workers", "device",
           "sec_per_iter", "sec_min", "sec_max", "peak_mb", "heap_peak_mb", "eval_eps_per_s", "eval_faults_per_ep",
           "gflop_per_iter", "gflops", "matmul_gflops", "flop_fraction", "tf32", "torch"]


@dataclass(frozen=True)
class Workload:
    """One benchmark shape at a method's paper settings (Finn et al. 2017 for MAML); preset: the preset key.

    Episodes: `way` classes, `shot` support and `query` query examples per class, images
    [channels, size, size]; Conv-4 with `hidden` filters, or `backbone` (baselines/backbones.py) with
    `widths`; `meta_batch` tasks per outer update; `inner_steps` at training with `inner_lr`;
    `test_steps` when evaluating.
    """

    preset: str
    way: int
    shot: int
    query: int
    channels: int
    size: int
    hidden: int
    meta_batch: int
    inner_steps: int
    inner_lr: float
    test_steps: int
    backbone: str = "conv4"
    widths: str = ""

    def network(self) -> Any:
        """The workload's baselines.backbones.Backbone."""
        from baselines.backbones import get_backbone

        return get_backbone(self.backbone, self.widths, self.hidden)


WORKLOADS: dict[str, Workload] = {
    "omniglot-5w1s": Workload("omniglot-5w", 5, 1, 15, channels=1, size=28, hidden=64, meta_batch=32, inner_steps=1,
                              inner_lr=0.4, test_steps=10),
    "omniglot-20w1s": Workload("omniglot-20w", 20, 1, 15, channels=1, size=28, hidden=64, meta_batch=16, inner_steps=5,
                               inner_lr=0.1, test_steps=10),
    "miniimagenet-5w1s": Workload("miniimagenet", 5, 1, 15, channels=3, size=84, hidden=32, meta_batch=4,
                                  inner_steps=5, inner_lr=0.01, test_steps=10),
    # MAML's miniImageNet settings (Finn et al.) on ResNet-12 as MetaOptNet's (64-160-320-640)
    "miniimagenet-5w1s-resnet12": Workload("miniimagenet", 5, 1, 15, channels=3, size=84, hidden=32, meta_batch=4,
                                           inner_steps=5, inner_lr=0.01, test_steps=10, backbone="resnet12",
                                           widths="64-160-320-640"),
}


# --- measurement primitives ---------------------------------------------------------------
def synthetic_episodes(w: Workload, n: int, seed: int = 0) -> list[Episode]:
    """`n` episodes of the workload's shapes with seeded random pixels."""
    gen = torch.Generator().manual_seed(seed)
    c, size = w.channels, w.size
    sy = torch.arange(w.way).repeat_interleave(w.shot)
    qy = torch.arange(w.way).repeat_interleave(w.query)
    episodes = []
    for i in range(n):
        sx, qx = torch.rand(len(sy), c, size, size, generator=gen), torch.rand(len(qy), c, size, size, generator=gen)
        episodes.append(Episode(sx, sy, qx, qy, tuple(range(w.way)), "train", i, f"perf-{i}"))
    return episodes


def workload_flops(w: Workload, first_order: bool) -> float:
    """FLOPs of one meta-iteration (convolutions and matmuls), counted on a plain-autograd reference."""
    from torch.utils.flop_counter import FlopCounterMode

    from baselines.core import head_forward

    net = w.network()
    gen = torch.Generator().manual_seed(0)
    p = {k: v.requires_grad_(True) for k, v in net.init(gen, w.channels, w.way, w.size).items()}
    ep = synthetic_episodes(w, 1)[0]

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return head_forward(params, net.features(params, x))

    with FlopCounterMode(display=False) as counter:
        fast = dict(p)
        for _ in range(w.inner_steps):
            loss = F.cross_entropy(forward(fast, ep.support_x), ep.support_y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - w.inner_lr * g for (k, v), g in zip(fast.items(), grads)}
        F.cross_entropy(forward(fast, ep.query_x), ep.query_y).backward()
    return float(counter.get_total_flops()) * w.meta_batch


def matmul_gflops(device: str, n: int = 2048, repeats: int = 10) -> float:
    """The large-matmul rate now: GFLOP/s of an n x n float32 matmul (median of `repeats`).

    `measure` takes the better of a reading after training and one after evaluation: a neighbour
    slowing one reading would otherwise inflate the FLOP fraction (a 108% row was seen)."""
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    times = []
    for _ in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[2:]) / 1e9


def sync(device: str) -> None:
    """Wait for queued device work (a no-op on the CPU)."""
    if on_cuda(device):
        torch.cuda.synchronize()


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB; NaN where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def minor_faults() -> int:
    """Minor page faults of this process so far (getrusage: pages first touched, none read from disk)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident size (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h), ten size_t fields."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc's mallinfo2, looked up once (the sampler calls it every half millisecond); None where it is
    not there or another allocator is loaded."""
    if tcmalloc_loaded(dict(os.environ)):
        return None
    fn = libc_function("mallinfo2")
    if fn is None:
        return None
    fn.restype = _MallInfo2
    return fn


def heap_in_use_mb() -> float:
    """MB malloc has handed out and not had back (glibc mallinfo2: in-use chunks of every arena plus mapped
    blocks); NaN where glibc's malloc is not the allocator (tcmalloc preloaded) or has no mallinfo2."""
    fn = _mallinfo2()
    if fn is None:
        return math.nan
    info = fn()
    return (info.uordblks + info.hblkhd) / 2**20


@contextmanager
def heap_peak(every: float = 0.0005) -> Iterator[list[float]]:
    """Yields a list that holds, after the block, the peak growth of `heap_in_use_mb` during it (MB; NaN
    where it cannot be read), sampled every `every` seconds by a thread."""
    base = heap_in_use_mb()
    peak, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], heap_in_use_mb())
            stop.wait(every)

    out = [math.nan]
    thread = threading.Thread(target=sample, daemon=True)
    if not math.isnan(base):
        thread.start()
    try:
        yield out
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
            out[0] = max(peak[0], heap_in_use_mb()) - base


def timed(fn: Callable[[], None], device: str) -> float:
    """Seconds of one call of `fn`, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# --- the implementations under test ------------------------------------------------------
Step = Callable[[], None]
Evaluate = Callable[[list[Episode]], None]


def make_learner(w: Workload, method: str, task_batch: int = 1, device: str = "cpu") -> Any:
    """Method `method` set up for the workload's images on `device`. maml and fomaml take the workload's settings
    (they are MAML's paper settings); every other method its own preset for the workload's preset key
    (its paper settings), on the workload's backbone. task_batch > 1 only for methods that have it."""
    from baselines import registry

    network = {}
    if w.backbone != "conv4":  # (the backbone's own preset may set the order: the method's name decides here)
        network = dict(backbone=w.backbone, widths=w.widths)
        if method in ("maml", "fomaml"):
            network["first_order"] = method == "fomaml"
    if task_batch > 1:
        network["task_batch"] = task_batch
    if method in ("maml", "fomaml"):
        m = registry.make(method, w.preset, seed=0, hidden=w.hidden, meta_batch=w.meta_batch,
                          inner_steps=w.inner_steps, inner_lr=w.inner_lr, inner_steps_test=w.test_steps, **network)
    else:
        m = registry.make(method, w.preset, seed=0, **network)
    m.device = resolve_device(device)  # (on CUDA, as a run: cuDNN's deterministic algorithms)
    if hasattr(m, "setup"):
        m.setup(TaskInfo((w.channels, w.size, w.size), w.way, w.way))
    return m


def episodes_per_step(m: Any, w: Workload) -> int:
    """Episodes one outer step of `m` consumes (the workload's meta-batch for methods without the notion)."""
    return m.episodes_per_step() if hasattr(m, "episodes_per_step") else w.meta_batch


def metabench_impl(w: Workload, method: str, device: str, batched: bool = False) -> tuple[Step, Evaluate]:
    """metabench's method at the workload's settings (`make_learner`): one `fit` step per call; `evaluate`.
    batched: train the whole meta-batch as one task-batched network (task_batch = meta_batch; on a GPU, replayed
    as a CUDA graph unless METABENCH_CUDA_GRAPHS=0, baselines/cudagraph.py)."""
    m = make_learner(w, method, w.meta_batch if batched else 1, device)
    batch = [ep.to(device) for ep in synthetic_episodes(w, episodes_per_step(m, w))]
    tune_malloc_for(m, batch)  # as fit would, but before `measure` starts its sampling thread (bench/allocator.py)

    def step() -> None:
        m.fit(iter(batch), 1)

    return step, m.evaluate


def uses_plain_outer_step(m: Any) -> bool:
    """Whether `m`'s outer update is GradientLearner's (mean task loss, optional clamp, optimizer step;
    MAML's with task_batch 1 is), which `reference_step` writes out; other methods keep their own."""
    from baselines.core import GradientLearner
    from baselines.maml import MAML

    own = getattr(type(m), "outer_step", None)
    return isinstance(m, GradientLearner) and (own is GradientLearner.outer_step
                                               or (own is MAML.outer_step and m.task_batch < 2))


@contextmanager
def plain_path() -> Iterator[None]:
    """The reference's setting: NCHW everywhere (`higher_order` keeps conv_layout from channels-last)
    and the task pool off (METABENCH_TASK_WORKERS=0: tasks one after another in this thread)."""
    from baselines.core import higher_order

    from baselines.parallel import workers_set

    with workers_set("0"), higher_order():
        yield


def reference_step(m: Any, batch: list[Episode]) -> None:
    """One outer step of `m` as a plain per-task autograd loop (`plain_path`: NCHW, no task pool, no
    task batching, `.backward()` per task).

    For methods with GradientLearner's outer update, that update (learning-rate schedule, meta-gradient
    clamp, optimizer step) runs with the per-task loop written here in place of `backward_tasks`;
    methods with their own outer update (Reptile, iMAML, LEO, ProtoNet's merged tasks, scale-and-shift)
    run it on the plain path, where their tasks are computed one after another.
    """
    from baselines.core import GradientLearner

    def plain_backward(tasks: list[Episode]) -> None:
        for ep in tasks:
            (m.training_loss(ep) / len(tasks)).backward()

    with plain_path():
        if not uses_plain_outer_step(m):
            m.fit(iter(batch), 1)
            return
        m.ensure_setup(batch[0])
        m.backward_tasks = plain_backward  # (an instance attribute: this learner only)
        try:
            GradientLearner.outer_step(m, batch)
        finally:
            del m.backward_tasks
        m.fit_episodes += len(batch)
        m.fit_steps += 1


def reference_impl(w: Workload, method: str, device: str) -> tuple[Step, Evaluate]:
    """The method in the plain per-task autograd loop (`reference_step`); evaluation adapts one
    episode at a time on the plain path (no task-batched adaptation)."""
    m = make_learner(w, method, device=device)
    batch = [ep.to(device) for ep in synthetic_episodes(w, episodes_per_step(m, w))]

    def evaluate(episodes: list[Episode]) -> None:
        with plain_path():
            for ep in episodes:
                m.adapt(ep.support_x, ep.support_y)(ep.query_x).argmax(1)

    return (lambda: reference_step(m, batch)), evaluate


def method_flops(w: Workload, method: str) -> float:
    """FLOPs (convolutions and matmuls) of one outer step of `method` at the workload's settings, counted
    as run cards count them (bench.axes.count_flops: the per-task reference path) on a fresh learner."""
    from bench.axes import count_flops

    m = make_learner(w, method)
    batch = synthetic_episodes(w, episodes_per_step(m, w))
    return float(count_flops(m, iter(batch), batch[0])["outer_step"])


def import_learn2learn_maml() -> type:
    """learn2learn's MAML class without running learn2learn/__init__.py (which imports gym,
    torchvision and its datasets: none is needed by MAML, and torchvision does not import beside
    this torch). The package and its algorithms package are registered as bare namespaces."""
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or not spec.submodule_search_locations:
        raise MetabenchError("learn2learn is not installed (see README: Performance, for how to install it)")
    root = Path(list(spec.submodule_search_locations)[0])
    for name, path in (("learn2learn", root), ("learn2learn.algorithms", root / "algorithms")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)  # (find_spec reads it)
            module.__spec__.submodule_search_locations = [str(path)]
            sys.modules[name] = module
    from learn2learn.algorithms.maml import MAML as L2LMAML

    return L2LMAML


def conv4_module(w: Workload) -> torch.nn.Module:
    """The same Conv-4 as baselines.core as a torch.nn module (batch statistics, no running ones).
    Load its parameters with `load_functional_params`; building it leaves the global RNG as it was."""
    layers: list[torch.nn.Module] = []
    c = w.channels
    with torch.random.fork_rng(devices=[]):  # torch's default init draws from the global RNG; callers overwrite it
        for _ in range(4):
            norm = torch.nn.BatchNorm2d(w.hidden, track_running_stats=False)
            layers += [torch.nn.Conv2d(c, w.hidden, 3, padding=1), norm, torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
            c = w.hidden
        size = w.size // 16
        layers += [torch.nn.Flatten(), torch.nn.Linear(w.hidden * size * size, w.way)]
    return torch.nn.Sequential(*layers)


class ResNet12Module(torch.nn.Module):
    """The same ResNet-12 as baselines/backbones.py as a torch.nn module (batch statistics, no running
    ones); parameter "blocks.<b>.<layer>.<w>" is the functional "block<b>.<layer>.<w>"."""

    def __init__(self, w: Workload) -> None:
        super().__init__()
        c, widths = w.channels, w.network().widths
        self.blocks = torch.nn.ModuleList()
        with torch.random.fork_rng(devices=[]):  # torch's default init draws from the global RNG; callers overwrite it
            for width in widths:
                block = torch.nn.Module()
                for name, c_in, k in (("1", c, 3), ("2", width, 3), ("3", width, 3), ("_s", c, 1)):
                    block.add_module("conv" + name, torch.nn.Conv2d(c_in, width, k, padding=k // 2, bias=False))
                    block.add_module("bn" + name, torch.nn.BatchNorm2d(width, track_running_stats=False))
                self.blocks.append(block)
                c = width
            self.head = torch.nn.Linear(widths[-1], w.way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from baselines.backbones import LEAKY_SLOPE

        for b in self.blocks:
            out = F.leaky_relu(b.bn1(b.conv1(x)), LEAKY_SLOPE)
            out = F.leaky_relu(b.bn2(b.conv2(out)), LEAKY_SLOPE)
            out = b.bn3(b.conv3(out)) + b.bn_s(b.conv_s(x))
            x = F.max_pool2d(F.leaky_relu(out, LEAKY_SLOPE), 2)
        return self.head(x.mean(dim=(2, 3)))


def network_module(w: Workload) -> torch.nn.Module:
    """The workload's network as a torch.nn module (for learn2learn): Conv-4 or ResNet-12."""
    if w.backbone == "conv4":
        return conv4_module(w)
    if w.backbone == "resnet12":
        return ResNet12Module(w)
    raise MetabenchError(f"the learn2learn comparison has no module for backbone {w.backbone!r}")


def load_functional_params(module: torch.nn.Module, p: dict[str, torch.Tensor]) -> None:
    """Copy a functional parameter dict (baselines.core / backbones) into `network_module`'s parameters."""
    if isinstance(module, ResNet12Module):
        keys = [re.sub(r"^blocks\.(\d+)\.", r"block\1.", name) for name, _ in module.named_parameters()]
        if sorted(keys) != sorted(p):
            raise MetabenchError(f"ResNet-12 module and parameter dict differ: {sorted(set(keys) ^ set(p))[:4]}")
    else:
        keys = [f"{kind}{i}.{w}" for i in range(4) for kind in ("conv", "bn") for w in ("weight", "bias")]
        keys += ["head.weight", "head.bias"]
    with torch.no_grad():
        for param, key in zip(module.parameters(), keys, strict=True):
            param.copy_(p[key])


def l2l_impl(w: Workload, method: str, device: str) -> tuple[Step, Evaluate]:
    """learn2learn's MAML wrapper on the same network (Conv-4 or ResNet-12, initialised from a seeded
    generator through baselines' functional init, not the global RNG), used as its examples do: per
    task clone(), adapt() `inner_steps` times, backward of the query loss / meta_batch; Adam 1e-3."""
    if method not in ("maml", "fomaml"):
        raise MetabenchError(f"the learn2learn comparison covers maml and fomaml, not {method!r}")
    model = network_module(w)
    load_functional_params(model, w.network().init(torch.Generator().manual_seed(0), w.channels, w.way, w.size))
    model = model.to(device)
    maml = import_learn2learn_maml()(model, lr=w.inner_lr, first_order=method == "fomaml")
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    batch = [ep.to(device) for ep in synthetic_episodes(w, w.meta_batch)]

    def adapted(ep: Episode, n: int) -> torch.nn.Module:
        learner = maml.clone()
        for _ in range(n):
            learner.adapt(F.cross_entropy(learner(ep.support_x), ep.support_y))
        return learner

    def step() -> None:
        opt.zero_grad()
        for ep in batch:
            (F.cross_entropy(adapted(ep, w.inner_steps)(ep.query_x), ep.query_y) / len(batch)).backward()
        opt.step()

    def evaluate(episodes: list[Episode]) -> None:
        for ep in episodes:
            learner = adapted(ep, w.test_steps)
            with torch.no_grad():
                learner(ep.query_x).argmax(1)

    return step, evaluate


# --- one worker ----------------------------------------------------------------------------
def require_fused_kernel() -> None:
    """Build baselines.fused's kernel now, or stop: a fused row must never time the unfused ops."""
    from baselines import fused

    if not fused.available():
        raise MetabenchError(f"the fused kernel could not be built ({fused.build_error()})")


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run one (workload, impl, method) job in this process and return its row."""
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    w, device = WORKLOADS[job["workload"]], job["device"]
    if job.get("no_tf32"):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if job.get("inner_steps"):
        w = dataclasses.replace(w, inner_steps=int(job["inner_steps"]))
    if job["impl"] == "l2l":
        step, evaluate = l2l_impl(w, job["method"], device)
    elif job["impl"] == "reference":
        step, evaluate = reference_impl(w, job["method"], device)
    else:
        if IMPL_ENV.get(job["impl"], {}).get("METABENCH_FUSED") == "1":
            require_fused_kernel()  # built before the timed iterations (the first build compiles for ~20 s)
        step, evaluate = metabench_impl(w, job["method"], device, batched=job["impl"].startswith("metabench-batched"))
    if on_cuda(device):
        torch.cuda.reset_peak_memory_stats()
    release_free_memory()  # nothing kept free from earlier work counts as already resident
    before = proc_status_mb("VmRSS")  # nothing timed or probed before: see the module docstring
    reset_peak_rss()
    with heap_peak() as heap:
        first = timed(step, device)
    for _ in range(job["warmup"]):
        timed(step, device)
    times = [timed(step, device) for _ in range(job["repeats"])]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if on_cuda(device)
            else proc_status_mb("VmHWM") - before)
    matmul_trained = matmul_gflops(device)
    episodes = [ep.to(device) for ep in synthetic_episodes(w, job["eval_episodes"], seed=1)]
    faults = minor_faults()
    eval_seconds = timed(lambda: evaluate(episodes), device)
    faults = minor_faults() - faults
    flops = (workload_flops(w, first_order=job["method"] == "fomaml") if job["method"] in ("maml", "fomaml")
             else method_flops(w, job["method"]))
    matmul = max(matmul_trained, matmul_gflops(device))
    workers = task_workers() if job["impl"] not in ("l2l", "reference") and w.network().pool_tasks else 0
    median = statistics.median(times)
    return {"round": job.get("round", 1), "workload": job["workload"], "inner_steps": w.inner_steps,
            "impl": job["impl"], "method": job["method"],
            "allocator": job["allocator"], "threads": torch.get_num_threads(),
            "task_workers": workers, "device": device,
            "sec_per_iter": median, "sec_min": min(times), "sec_max": max(times), "first_iter_s": first,
            "peak_mb": peak, "heap_peak_mb": heap[0],
            "eval_eps_per_s": len(episodes) / eval_seconds, "eval_faults_per_ep": faults / len(episodes),
            "gflop_per_iter": flops / 1e9,
            "gflops": flops / median / 1e9, "matmul_gflops": matmul, "flop_fraction": flops / median / 1e9 / matmul,
            "tf32": tf32_state(device), "torch": torch.__version__}


def tf32_state(device: str) -> str:
    """Whether float32 convolutions and matmuls may round through TF32 on this CUDA device ('' on the CPU)."""
    if not on_cuda(device):
        return ""
    on = {True: "on", False: "off"}
    return f"conv {on[torch.backends.cudnn.allow_tf32]}, matmul {on[torch.backends.cuda.matmul.allow_tf32]}"


def run_worker(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run `job` in a fresh interpreter under its allocator; returns its row (or raises)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env["METABENCH_ALLOCATOR"] = job["allocator"]  # not the parent's: it may run under tcmalloc itself
    env.update(IMPL_ENV.get(job["impl"], {}))
    if job["allocator"] == "tcmalloc":
        lib = tcmalloc_path()
        if lib is None:
            raise MetabenchError("tcmalloc is not installed (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
        env["LD_PRELOAD"] = lib
    if job.get("threads"):
        env["OMP_NUM_THREADS"] = str(job["threads"])
    what = f"perf worker {job['impl']}/{job['method']}/{job['workload']}"
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.perf", "--worker", json.dumps(job)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MetabenchError(f"{what} took longer than --timeout {timeout:g} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise MetabenchError(f"{what} failed: {' | '.join(tail)}")
    return json.loads(lines[-1])


# --- the report ----------------------------------------------------------------------------
def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows, then the ratios against learn2learn and the plain per-task loop. Each ratio
    pairs two rows of one round (`round`, 1 when absent); over several rounds the line gives the median of the
    rounds' ratios and each round's speed ratio."""
    rounds = sorted({int(r.get("round", 1)) for r in rows})
    several = len(rounds) > 1
    head = (("| round " if several else "") + "| workload | inner steps | impl | method | alloc | s/iter (median) | "
            "peak MB | heap peak MB | eval ep/s | eval faults/ep | GFLOP/s | of matmul |\n"
            + ("|---" if several else "") + "|---|---|---|---|---|---|---|---|---|---|---|---|")
    body = [(f"| {int(r.get('round', 1))} " if several else "")
            + f"| {r['workload']} | {r['inner_steps']} | {r['impl']} | {r['method']} | {r['allocator']} | "
            f"{r['sec_per_iter']:.3f} | {r['peak_mb']:.0f} | {float(r.get('heap_peak_mb', math.nan)):.0f} | "
            f"{r['eval_eps_per_s']:.1f} | {float(r.get('eval_faults_per_ep', math.nan)):.0f} | {r['gflops']:.1f} | "
            f"{100 * r['flop_fraction']:.0f}% |"
            for r in rows]
    by_key = {(int(r.get("round", 1)), r["workload"], r["impl"], r["method"], r["allocator"]): r for r in rows}
    cells = list(dict.fromkeys(key[1:] for key in by_key))
    ratios = []
    for against, name in (("l2l", "learn2learn's"), ("reference", "the plain per-task loop's")):
        for wl, impl, method, alloc in cells:
            if impl in ("l2l", "reference"):
                continue
            pairs = [(by_key[(n, wl, impl, method, alloc)], by_key[(n, wl, against, method, alloc)]) for n in rounds
                     if (n, wl, impl, method, alloc) in by_key and (n, wl, against, method, alloc) in by_key]
            if not pairs:
                continue
            speed = [ref["sec_per_iter"] / r["sec_per_iter"] for r, ref in pairs]
            memory = [r["peak_mb"] / max(ref["peak_mb"], 1e-9) for r, ref in pairs]
            evaluation = [r["eval_eps_per_s"] / ref["eval_eps_per_s"] for r, ref in pairs]
            heaps = [heap_ratio(r, ref) for r, ref in pairs]
            heap = f" (heap {statistics.median(heaps):.2f}x)" if not any(map(math.isnan, heaps)) else ""
            each = f" (median of {len(pairs)} rounds; speed {', '.join(f'{x:.2f}x' for x in speed)})" if several else ""
            ratios.append(f"{wl} {impl} {method} {alloc}: {statistics.median(speed):.2f}x {name} speed, peak memory "
                          f"{statistics.median(memory):.2f}x{heap}, evaluation {statistics.median(evaluation):.2f}x{each}")
    return "\n".join([head, *body, "", *ratios])


def heap_ratio(r: dict[str, Any], ref: dict[str, Any]) -> float:
    """r's heap peak over ref's, where both were measured; NaN otherwise."""
    a, b = float(r.get("heap_peak_mb", math.nan)), float(ref.get("heap_peak_mb", math.nan))
    return math.nan if math.isnan(a) or math.isnan(b) or b <= 0 else a / b


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The rows as CSV (COLUMNS), written atomically."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The jobs to run (learn2learn rows only for maml/fomaml, and only when it is installed; batched rows
    only for methods with `task_batch`). `--methods all`: every registered method, by default on
    omniglot-5w1s against the reference loop."""
    from baselines import registry

    device = str(resolve_device(args.device))  # a device this machine lacks fails here, before any worker starts
    if args.rounds < 1:
        raise MetabenchError(f"--rounds must be at least 1, not {args.rounds}")
    if args.no_tf32 and not on_cuda(device):
        raise MetabenchError(f"--no-tf32 is for a CUDA device (TF32 is a GPU's); --device is {args.device}")
    every = args.methods == ["all"]
    methods = registry.METHODS.names() if every else args.methods
    workloads = args.workloads or (["omniglot-5w1s"] if every else list(WORKLOADS))
    impls = args.impls or (["metabench", "reference"] if every else list(DEFAULT_IMPLS))
    for name, known, what in ((workloads, WORKLOADS, "workload"), (impls, IMPLS, "implementation"),
                              (args.allocators, ALLOCATORS, "allocator")):
        for n in name:
            if n not in known:
                raise unknown(what, n, list(known))
    have_l2l = importlib.util.find_spec("learn2learn") is not None
    if "l2l" in impls and not have_l2l:
        print("learn2learn is not installed: its rows are skipped (README: Performance)", file=sys.stderr)
    batched = {m for m in methods if any(f.name == "task_batch" for f in dataclasses.fields(registry.method_class(m)))}
    jobs = []
    for n in range(1, args.rounds + 1):
        for alloc in args.allocators:
            for wl in workloads:
                for method in methods:
                    for impl in (impls if n % 2 else impls[::-1]):  # (every other round the other order: drift cancels)
                        if ((impl == "l2l" and (not have_l2l or method not in ("maml", "fomaml")))
                                or (impl.startswith("metabench-batched") and method not in batched)):
                            continue
                        jobs.append({"round": n, "workload": wl, "impl": impl, "method": method, "allocator": alloc,
                                     "threads": args.threads, "device": device, "repeats": args.repeats,
                                     "warmup": args.warmup, "eval_episodes": args.eval_episodes,
                                     "inner_steps": args.inner_steps, "no_tf32": args.no_tf32})
    return jobs


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by `python -m bench.perf` and `metabench perf`)."""
    p.add_argument("--workloads", nargs="+", default=None,
                   help=f"of {', '.join(WORKLOADS)} (default: all; with --methods all: omniglot-5w1s)")
    p.add_argument("--methods", nargs="+", default=["maml", "fomaml"],
                   help="registered methods (default maml fomaml); 'all': every registered method at its paper "
                        "settings, against the plain per-task loop")
    p.add_argument("--impls", nargs="+", default=None,
                   help="metabench (the default mode: tasks on the task pool; on a GPU the whole meta-batch as a CUDA graph, as "
                        "metabench-batched), metabench-batched (whole meta-batch "
                        "at once; on a GPU replayed as a CUDA graph), metabench-batched-eager (the same without the graph), metabench-lean (METABENCH_TASK_WORKERS=0: no pool, one task's graph at a time), "
                        "metabench-fused (the default mode with METABENCH_FUSED=1: batch norm, max-pool and ReLU "
                        "as one kernel, baselines/fused.py), metabench-lean-fused (both switches), "
                        "reference (plain per-task autograd loop, NCHW, no pool), l2l (learn2learn) "
                        f"(default: {' '.join(DEFAULT_IMPLS)}; with --methods all: metabench reference)")
    p.add_argument("--allocators", nargs="+", default=["glibc"] + (["tcmalloc"] if tcmalloc_path() else []),
                   help="allocators to time under: glibc, tcmalloc (default: both where tcmalloc is installed)")
    p.add_argument("--repeats", type=int, default=5, help="timed meta-iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed meta-iterations after the first")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every job this many times, a round at a time (every other round in the reverse order of "
                        "--impls); a ratio pairs rows of one round and the report gives the rounds' median")
    p.add_argument("--eval-episodes", type=int, default=64, help="test episodes timed for evaluation throughput")
    p.add_argument("--inner-steps", type=int, default=None,
                   help="override the workloads' inner steps at training (e.g. peak memory at 1, 5, 10 steps)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU rows: peak memory is torch's max_memory_allocated)")
    p.add_argument("--no-tf32", action="store_true",
                   help="on a GPU, float32 convolutions and matmuls without TF32 (torch's default rounds cuDNN's "
                        "convolutions through TF32; the CSV's tf32 column says which)")
    p.add_argument("--csv", type=Path, default=Path("perf.csv"), help="where the CSV goes (default perf.csv)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")


def cmd_perf(args: argparse.Namespace) -> int:
    """Run the plan a job at a time, the CSV rewritten after each row; a job that fails or runs past --timeout
    is named and skipped, the others still run, and the exit status is then 1."""
    rows, failed = [], []
    for job in plan(args):
        try:
            row = run_worker(job, args.timeout)
        except MetabenchError as e:
            failed.append(f"round {job['round']}: {e}")
            print(failed[-1], file=sys.stderr, flush=True)
            continue
        print(f"round {row['round']}: {row['workload']} {row['impl']} {row['method']} {row['allocator']}: "
              f"{row['sec_per_iter']:.3f} s/iter", file=sys.stderr, flush=True)
        rows.append(row)
        write_csv(rows, args.csv)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}")
    print(format_table(rows))
    print(f"CSV: {args.csv}")
    for line in failed:
        print(f"not measured: {line}")
    return 1 if failed else 0


def add_cli(subparsers: Any) -> None:
    """Register `metabench perf`."""
    p = subparsers.add_parser("perf", help="speed, memory and FLOP rate of meta-training, beside learn2learn")
    add_arguments(p)
    p.set_defaults(func=cmd_perf)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0
    try:
        return cmd_perf(args)
    except MetabenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

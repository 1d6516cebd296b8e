"""A task-batched outer step replayed as one captured CUDA graph (the GPU fast path's launch cost).

On a GPU a meta-batch of small tasks is bound by kernel launches, not arithmetic: a second-order MAML
step on Conv-4 is a few hundred small kernels, each launched from Python. The task-batched path
(baselines/taskbatch.py) already makes that one set of kernels for the whole meta-batch; this module
records that set once with torch.cuda.graph and replays it for each new meta-batch of the same shapes,
so an outer step costs a few copies into the graph's input buffers and one launch.

- Switch: `METABENCH_CUDA_GRAPHS=0` in the environment turns it off (read at each step); on by default.
  It applies to MAML-family methods (MAML, first-order MAML, Meta-SGD, ANIL, BOIL: `TASK_BATCHED`)
  training task-batched on a CUDA device (`task_batch` 1, the default, is the whole meta-batch there; K >= 2
  is K tasks at a time); everywhere else the step runs eagerly.
- The same kernels run in the same order, so a replay gives the bits of the eager step (the first
  `WARMUP` outer steps run eagerly, on a side stream, as CUDA graphs require, then the step is captured
  and replayed). tests/test_cuda.py checks graph against eager on a GPU.
- The outer optimizer is Adam with `capturable=True` on CUDA (its step count on the device), graphs on
  or off, so the two modes compute the same numbers.
- A capture belongs to one optimizer object and one set of input shapes: `setup` and `load_state_dict`
  make a new optimizer, and a meta-batch of other shapes (another way, shot or query) is captured anew.
"""

from __future__ import annotations

import os
from typing import Callable, Hashable, Sequence

import torch

WARMUP = 2
"""Eager outer steps before the capture (CUDA graphs need the libraries' lazy set-up done first)."""


def enabled() -> bool:
    """Whether the switch is on: METABENCH_CUDA_GRAPHS unset or 1 (0 turns it off)."""
    value = os.environ.get("METABENCH_CUDA_GRAPHS", "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"METABENCH_CUDA_GRAPHS must be 0 or 1, got {value!r}")
    return value != "0"


class CapturedStep:
    """`run(*inputs)` (an outer step: forward, backward and optimizer step on inputs of fixed shapes) run
    eagerly `WARMUP` times on a side stream, then captured once and replayed with new inputs copied in.

    `key` names what the capture depends on besides the inputs' shapes (the optimizer object, the way);
    `matches` says whether this capture can run a step of that key and those inputs.
    """

    def __init__(self, run: Callable[..., None], key: Hashable) -> None:
        self.run, self.key = run, key
        self.shapes: tuple | None = None
        self.eager_steps = 0
        self.static: list[torch.Tensor] = []
        self.graph: torch.cuda.CUDAGraph | None = None

    def matches(self, key: Hashable, inputs: Sequence[torch.Tensor]) -> bool:
        return key == self.key and (self.shapes is None or self.shapes == signature(inputs))

    def __call__(self, inputs: Sequence[torch.Tensor]) -> None:
        if self.shapes is None:  # (later calls come through `matches`: the same signature)
            self.shapes = signature(inputs)
        if self.graph is not None:
            for buffer, x in zip(self.static, inputs):
                buffer.copy_(x)
            self.graph.replay()
            return
        if self.eager_steps < WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.run(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
            return
        self.static = [x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.run(*self.static)
        self.graph = graph
        graph.replay()  # (capturing records the kernels without running them)


def signature(inputs: Sequence[torch.Tensor]) -> tuple:
    """Shapes, dtypes and devices of the inputs: what a capture is specific to."""
    return tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)

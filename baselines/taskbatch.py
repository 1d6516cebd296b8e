"""Task-batched backbones: a meta-batch of tasks run as one wide network (the fast path).

T tasks with their own parameters are evaluated in one pass: parameter dicts carry a leading
task dimension ([T, *shape]), images are laid out as [N, T*C, H, W], each convolution is one
grouped convolution (groups=T), batch norm takes per-task statistics (they are per channel, and
every task owns its channels), and the head is one batched matmul. Activations, pooling and
residual sums are per channel already, so any backbone written in `core.Ops` (Conv-4, ResNet-12,
ResNet-18) runs task-batched with `TaskOps`. The result equals running the backbone per task (up
to floating-point summation order); tests/test_taskbatch.py and tests/test_backbones.py check
values and second-order meta-gradients in float64 against the per-task reference.

Requires every task of a batch to have the same number of support and query examples (fixed
way/shot benchmarks); methods fall back to the per-task loop otherwise (variable-way episodes).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from bench.api import Episode
from baselines.core import LossFn, Ops, Params, conv4_features


def stack_params(p: Mapping[str, torch.Tensor], n_tasks: int) -> Params:
    """Each parameter expanded (not copied) to [n_tasks, *shape]; gradients flow back summed."""
    return {k: v.unsqueeze(0).expand(n_tasks, *v.shape) for k, v in p.items()}


def task_layout(x: torch.Tensor) -> torch.Tensor:
    """Images [T, N, C, H, W] -> [N, T*C, H, W] (task t owns channels t*C .. t*C+C-1)."""
    t, n, c, h, w = x.shape
    return x.transpose(0, 1).reshape(n, t * c, h, w)


class TaskOps(Ops):
    """Layer operations on T tasks side by side: parameters [T, *shape], activations [N, T*C, H, W]."""

    def __init__(self, n_tasks: int) -> None:
        self.n_tasks = n_tasks

    def conv(self, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, stride: int = 1,
             padding: int = 1) -> torch.Tensor:
        w, b = p[name + ".weight"], p.get(name + ".bias")
        return F.conv2d(x, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1), stride, padding,
                        groups=self.n_tasks)

    def bn_affine(self, p: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return p[name + ".weight"].reshape(-1), p[name + ".bias"].reshape(-1)


Features = Callable[..., torch.Tensor]
"""A backbone's body (p, x [N, C, H, W], ops) -> [N, feat] (core.conv4_features, Backbone.features)."""


def features_tasks(features: Features, p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A backbone body of T tasks at once: p[k] [T, *shape], x [T, N, C, H, W] -> features [T, N, feat]."""
    n_tasks = x.shape[0]
    h = features(p, task_layout(x), TaskOps(n_tasks))
    return h.reshape(h.shape[0], n_tasks, -1).transpose(0, 1)


def forward_tasks(features: Features, p: Mapping[str, torch.Tensor], x: torch.Tensor,
                  way: int | None = None) -> torch.Tensor:
    """Logits of T tasks: x [T, N, C, H, W] -> [T, N, way] (first `way` head rows; all when None)."""
    w, b = p["head.weight"], p["head.bias"]
    if way is not None:
        w, b = w[:, :way], b[:, :way]
    return torch.baddbmm(b.unsqueeze(1), features_tasks(features, p, x), w.transpose(1, 2))


def conv4_features_tasks(p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Conv-4 body of T tasks at once: p[k] [T, *shape], x [T, N, C, H, W] -> features [T, N, feat]."""
    return features_tasks(conv4_features, p, x)


def conv4_forward_tasks(p: Mapping[str, torch.Tensor], x: torch.Tensor, way: int | None = None) -> torch.Tensor:
    """Conv-4 logits of T tasks: x [T, N, C, H, W] -> [T, N, way] (first `way` head rows; all when None)."""
    return forward_tasks(conv4_features, p, x, way)


def tasks_loss(forward: Callable[..., torch.Tensor], way: int | None = None) -> LossFn:
    """Sum over tasks of each task's mean cross-entropy, so d/d(task t's params) is task t's gradient.

    The returned loss takes (p [T, ...], x [T, N, C, H, W], y [T, N]); way: the classes, read from y when
    None (a read back to the host, which a CUDA graph cannot capture).
    """

    def loss(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = forward(p, x, int(y.max()) + 1 if way is None else way)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]

    return loss


def same_shapes(batch: Sequence[Episode]) -> bool:
    """True when every episode has the same way and support/query shapes (batchable)."""
    first = batch[0]
    return all(ep.way == first.way and ep.support_x.shape == first.support_x.shape
               and ep.query_x.shape == first.query_x.shape for ep in batch)


def stack_episodes(batch: Sequence[Episode]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support x [T, n_s, C, H, W], y [T, n_s], query x [T, n_q, C, H, W], y [T, n_q]."""
    return (torch.stack([ep.support_x for ep in batch]), torch.stack([ep.support_y for ep in batch]),
            torch.stack([ep.query_x for ep in batch]), torch.stack([ep.query_y for ep in batch]))

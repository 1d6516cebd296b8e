"""MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks").

Learns the initial weights of Conv-4 so that a few gradient steps on a task's support set
solve it. Second order by default; `first_order=True` is first-order MAML (FOMAML), which
drops the second derivatives (the `--stop_grad` flag of the reference code): one class, a flag.

Defaults per benchmark family live in baselines/registry.py (from the paper and cbfinn/maml:
Omniglot 5-way inner lr 0.4, 1 step at train, 10 at test, meta-batch 32, Adam 1e-3; 20-way
0.1, 5 steps, meta-batch 16; miniImageNet 0.01, 5 steps, 10 at test, meta-batch 4, Conv-4 32).
One difference from the reference code, stated: Conv-4 here uses 2x2 max-pooling after every
block (the reference code's miniImageNet variant) for Omniglot too, instead of strided convs.

Speed: when the method's per-task computation is MAML's own (subclasses that only change which
keys adapt or their learning rates: FOMAML, ANIL, BOIL, Meta-SGD) and the tasks have equal
shapes, evaluation adapts EVAL_CHUNK tasks at once as one task-batched network
(baselines/taskbatch.py, `adapt_many`), and training does so for `task_batch` tasks at a time
when asked (it trades memory for speed). Both paths compute the same function
(tests/test_taskbatch.py compares them in float64 and over several float32 steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F

from bench.api import Episode, Predictor, Tags
from baselines.core import GradientLearner, Params, episode_loss, inner_loop
from baselines.taskbatch import conv4_forward_tasks, same_shapes, stack_episodes, stack_params, tasks_loss


@dataclass
class MAML(GradientLearner):
    """MAML / FOMAML on Conv-4.

    inner_lr, inner_steps: the inner SGD loop at meta-training; inner_steps_test: at test.
    first_order: drop second-order terms of the meta-gradient.
    task_batch: an implementation setting, not part of the method: how many tasks of a
        meta-batch train together as one task-batched network. 1 (default) trains task by task,
        with the peak memory of one task's graph; k > 1 holds k tasks' graphs at once (memory
        grows k-fold) and can be faster where small support sets leave cores idle (see
        `python -m bench.perf`). Evaluation always adapts EVAL_CHUNK tasks together (its graphs
        are small).
    """

    inner_lr: float = 0.4
    inner_steps: int = 1
    inner_steps_test: int = 10
    first_order: bool = False
    task_batch: int = 1

    PARALLEL_TASKS: ClassVar[bool] = True  # task_loss only reads self (subclasses that write say False)

    @property
    def tags(self) -> Tags:
        return Tags(bn_mode="transductive", order="first" if self.first_order else "second",
                    transductive=True, variable_way=True, deterministic=True)

    def adapted_keys(self) -> list[str]:
        """Which meta-parameters the inner loop updates (all of them for MAML)."""
        return list(self.meta)

    def inner_lrs(self) -> float | Mapping[str, torch.Tensor]:
        """Inner learning rate: one float, or a tensor per adapted key (Meta-SGD)."""
        return self.inner_lr

    def inner(self, x: torch.Tensor, y: torch.Tensor, steps: int, first_order: bool) -> Params:
        """Run the inner loop from the meta-parameters on (x [n, C, H, W], y [n])."""
        return inner_loop(episode_loss(self.forward), self.meta, self.adapted_keys(), (x, y),
                          steps, self.inner_lrs(), first_order)

    # --- the task-batched fast path -----------------------------------------------------
    def can_batch(self, shapes_equal: bool) -> bool:
        """True when the fast path computes this method: MAML's own forward, inner loop, task loss
        and adaptation (only `adapted_keys` / `inner_lrs` overridden) and equal task shapes."""
        cls = type(self)
        own = all(getattr(cls, name) is getattr(MAML, name)
                  for name in ("forward", "inner", "task_loss", "adapt_params", "outer_step"))
        return own and shapes_equal

    def inner_tasks(self, start: Params, data: tuple[torch.Tensor, torch.Tensor], steps: int,
                    first_order: bool) -> Params:
        """The inner loop of T tasks at once from `start`: data x [T, n, C, H, W], y [T, n] ->
        parameters [T, ...] (each task's own adapted copy)."""
        x, y = data
        return inner_loop(tasks_loss(conv4_forward_tasks), stack_params(start, x.shape[0]), self.adapted_keys(),
                          (x, y), steps, self.inner_lrs(), first_order)

    def outer_step(self, batch: list[Episode]) -> None:
        if self.task_batch < 2 or len(batch) < 2 or not self.can_batch(same_shapes(batch)):
            return super().outer_step(batch)
        self.optimizer.zero_grad(set_to_none=True)
        for first in range(0, len(batch), self.task_batch):
            sx, sy, qx, qy = stack_episodes(batch[first:first + self.task_batch])
            fast = self.inner_tasks(self.meta, (sx, sy), self.inner_steps, self.first_order)
            (tasks_loss(conv4_forward_tasks)(fast, qx, qy) / len(batch)).backward()
        self.optimizer.step()

    def adapt_many(self, supports: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[Predictor]:
        shapes_equal = len({(tuple(x.shape), int(y.max())) for x, y in supports}) == 1
        if len(supports) < 2 or not self.can_batch(shapes_equal):
            return super().adapt_many(supports)
        x, y = torch.stack([s[0] for s in supports]), torch.stack([s[1] for s in supports])
        with torch.enable_grad():
            fast = self.inner_tasks({k: v.detach() for k, v in self.meta.items()}, (x, y), self.inner_steps_test, True)
        way = int(y.max()) + 1
        return [self.predictor({k: v[t].detach() for k, v in fast.items()}, way) for t in range(len(supports))]

    def task_loss(self, ep: Episode) -> torch.Tensor:
        fast = self.inner(ep.support_x, ep.support_y, self.inner_steps, self.first_order)
        return F.cross_entropy(self.forward(fast, ep.query_x, ep.way), ep.query_y)

    def adapt_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return self.inner(support_x, support_y, self.inner_steps_test, True)

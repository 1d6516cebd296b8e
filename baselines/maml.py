"""MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks").

Learns the initial weights of Conv-4 so that a few gradient steps on a task's support set
solve it. Second order by default; `first_order=True` is first-order MAML (FOMAML), which
drops the second derivatives (the `--stop_grad` flag of the reference code): one class, a flag.

Defaults per benchmark family live in baselines/registry.py (from the paper and cbfinn/maml:
Omniglot 5-way inner lr 0.4, 1 step at train, 10 at test, meta-batch 32, Adam 1e-3; 20-way
0.1, 5 steps, meta-batch 16; miniImageNet 0.01, 5 steps, 10 at test, meta-batch 4, Conv-4 32).
One difference from the reference code, stated: Conv-4 here uses 2x2 max-pooling after every
block (the reference code's miniImageNet variant) for Omniglot too, instead of strided convs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.api import Episode, Tags
from baselines.core import GradientLearner, Params, episode_loss, inner_loop


@dataclass
class MAML(GradientLearner):
    """MAML / FOMAML on Conv-4.

    inner_lr, inner_steps: the inner SGD loop at meta-training; inner_steps_test: at test.
    first_order: drop second-order terms of the meta-gradient.
    """

    inner_lr: float = 0.4
    inner_steps: int = 1
    inner_steps_test: int = 10
    first_order: bool = False

    @property
    def tags(self) -> Tags:
        return Tags(bn_mode="transductive", order="first" if self.first_order else "second",
                    transductive=True, variable_way=True, deterministic=True)

    def adapted_keys(self) -> list[str]:
        """Which meta-parameters the inner loop updates (all of them for MAML)."""
        return list(self.meta)

    def inner(self, x: torch.Tensor, y: torch.Tensor, steps: int, first_order: bool) -> Params:
        """Run the inner loop from the meta-parameters on (x [n, C, H, W], y [n])."""
        return inner_loop(episode_loss(self.forward), self.meta, self.adapted_keys(), (x, y),
                          steps, self.inner_lr, first_order)

    def task_loss(self, ep: Episode) -> torch.Tensor:
        fast = self.inner(ep.support_x, ep.support_y, self.inner_steps, self.first_order)
        return F.cross_entropy(self.forward(fast, ep.query_x, ep.way), ep.query_y)

    def adapt_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return self.inner(support_x, support_y, self.inner_steps_test, True)

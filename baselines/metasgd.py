"""Meta-SGD (Li, Zhou, Chen, Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
arXiv:1707.09835).

MAML with a learned learning rate for every parameter: the inner update is
theta' = theta - alpha * grad (alpha a tensor of the same shape as theta, element-wise product),
and alpha is meta-learned jointly with theta by the outer optimizer. One inner step at training
and at test (the paper's one-step adaptation).

Implementation: alpha lives in the meta-parameter dict under "lr.<name>" (so it is saved,
restored and optimized like every other meta-parameter); the inner loop is the shared
`core.inner_loop` with a per-key learning-rate mapping. The inner loop adapts every network
parameter (not the alphas).

Choices where the sources are silent (published_hyperparameters.csv: "init not confirmed",
meta-batch, outer lr and iterations "not confirmed"): alpha is initialised uniformly in
[inner_lr * (1 - alpha_spread), inner_lr * (1 + alpha_spread)] around MAML's inner learning rate
of the benchmark family (alpha_spread = 0.5: Omniglot 5-way [0.2, 0.6], 20-way [0.05, 0.15],
miniImageNet [0.005, 0.015]); the paper initialises alpha randomly (its interval for
classification was not retrieved), learn2learn/torchmeta use a constant. Meta-batch, Adam 1e-3,
Conv-4 width and the number of outer steps follow MAML (Finn et al. 2017), since Meta-SGD uses
MAML's architecture and setup.

Backbones: any (one learning rate per parameter of the backbone). The paper has no ResNet settings:
a ResNet run takes the benchmark's preset with the backbone set over it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Mapping

import torch

from bench.api import Preset, TaskInfo, with_meta_dataset
from baselines.core import Params
from baselines.maml import FINN_KEYS, MAML

LR_PREFIX = "lr."


REGISTER = {"metasgd": "MetaSGD"}


@dataclass
class MetaSGD(MAML):
    """MAML with meta-learned per-parameter inner learning rates (one inner step).

    inner_lr: centre of alpha's initialisation; alpha_spread: relative half-width of it.
    """

    STEP_TRACE: ClassVar[bool] = True  # adaptation ends in one inner_loop call (test-time steps axis)
    PARALLEL_TASKS: ClassVar[bool] = True
    TASK_BATCHED: ClassVar[bool] = True
    PRESETS: ClassVar[Mapping[str, Preset]] = with_meta_dataset({
        key: replace(p, values={**p.values, "inner_steps": 1, "inner_steps_test": 1, "alpha_spread": 0.5},
                     paper="Li, Zhou, Chen, Li. Meta-SGD: Learning to Learn Quickly for Few-Shot Learning. "
                           "arXiv:1707.09835, 2017",
                     note="one inner step; per-parameter learning rates initialised uniformly at MAML's inner lr "
                          "+-50% (our choice); meta-batch, outer Adam 1e-3, width and steps as MAML, not confirmed "
                          "from the paper")
        for key, p in MAML.PRESETS.items() if key in FINN_KEYS})

    inner_steps: int = 1
    inner_steps_test: int = 1
    alpha_spread: float = 0.5

    CHECK_PARAMS = dict(inner_steps_test=1)  # conformance suite (bench/checks.py): one step, as the method

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        net = super().init_meta(info, gen)
        lo, hi = self.inner_lr * (1 - self.alpha_spread), self.inner_lr * (1 + self.alpha_spread)
        lrs = {LR_PREFIX + k: lo + (hi - lo) * torch.rand(v.shape, generator=gen) for k, v in net.items()}
        return net | lrs

    def adapted_keys(self) -> list[str]:
        return [k for k in self.meta if not k.startswith(LR_PREFIX)]

    def inner_lrs(self) -> dict[str, torch.Tensor]:
        return {k: self.meta[LR_PREFIX + k] for k in self.adapted_keys()}

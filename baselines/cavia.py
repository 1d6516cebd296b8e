"""CAVIA (Zintgraf, Shiarlis, Kurin, Hofmann, Whiteson 2019, "Fast Context Adaptation via
Meta-Learning", ICML 2019).

The subspace member of the family: the inner loop adapts only a small context vector phi
(`n_context` numbers, reset to zero for every task), never the network weights; the network
weights, including a FiLM layer that maps phi to a per-channel scale and shift, are
meta-learned in the outer loop. Here, as in the paper's classification network
(lmzintgraf/cavia classification/models.py with context_in = [F, F, T, F, F]), the FiLM layer is
one linear map phi -> [gamma, beta] (2 x hidden numbers) applied to the third conv block after
its batch norm and before its ReLU: h3 = gamma * BN(conv3(h2)) + beta (gamma is the linear
output itself, not 1 + output, as in the reference code). One difference, stated: pooling stays
after the ReLU as in the shared Conv-4 (the reference pools right after the batch norm).

Defaults (lmzintgraf/cavia classification/arguments.py, main.py; published_hyperparameters.csv):
miniImageNet: 100 context parameters, inner lr 1.0, 2 inner steps at train and test, 16 tasks
per meta-update, Adam 1e-3 decayed x0.9 every 5000 steps, meta-gradient clamped to [-10, 10],
32 filters, 60000 outer steps, second order. (The paper's text reportedly uses meta-batch 4 for
1-shot and 2 for 5-shot; we keep the code's 16.) The paper has no Omniglot classification
experiments; for the Omniglot keys we chose the same CAVIA settings with MAML's Omniglot
meta-batch (32 / 16), width 64 and 40000 steps.
Initialisation: the shared Conv-4 initialisation (core.conv4_init) for the network; the FiLM
layer as PyTorch's nn.Linear after the reference's kaiming init: weight U(+-sqrt(3 / n_context)),
bias U(+-1 / sqrt(n_context)).

Backbones: any; FiLM modulates the output of the last batch norm of block `film_block` (Conv-4:
before the ReLU, as above; ResNet-12: the block's third batch norm, before the residual sum;
ResNet-18: the stage's last batch norm, before the residual sum), with 2 x that block's width
outputs. The paper has no ResNet settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F

from bench.api import Preset, TaskInfo, with_meta_dataset
from baselines.core import Ops, Params, episode_loss, head_forward, inner_loop, step_decay
from baselines.maml import MAML

CONTEXT = "context"


class FiLMOps(Ops):
    """The plain layer operations, with the output of batch norm `layer` scaled by gamma and shifted by beta."""

    def __init__(self, layer: str, gamma: torch.Tensor, beta: torch.Tensor) -> None:
        self.layer, self.gamma, self.beta = layer, gamma, beta

    def bn(self, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
        x = super().bn(p, name, x)
        return self.gamma * x + self.beta if name == self.layer else x


REGISTER = {"cavia": "CAVIA"}


@dataclass
class CAVIA(MAML):
    """Context adaptation: inner loop on a zero-initialised context vector that FiLMs one conv block.

    n_context: size of the context vector; film_block: which conv block (0-based) it modulates;
    outer_lr_decay / outer_lr_decay_every: step decay of the outer learning rate;
    grad_clip: element-wise clamp of the meta-gradient (0 disables).
    """

    STEP_TRACE: ClassVar[bool] = True  # adaptation ends in one inner_loop call (test-time steps axis)
    PARALLEL_TASKS: ClassVar[bool] = True
    PRESETS: ClassVar[Mapping[str, Preset]] = with_meta_dataset({
        key: Preset(dict(n_context=100, inner_lr=1.0, inner_steps=2, inner_steps_test=2, meta_batch=batch,
                         outer_lr=1e-3, outer_lr_decay=0.9, outer_lr_decay_every=5000, hidden=hidden), steps,
                    "Zintgraf, Shiarlis, Kurin, Hofmann, Whiteson. Fast Context Adaptation via Meta-Learning. ICML 2019",
                    "lmzintgraf/cavia", "classification/arguments.py + main.py",
                    "100 context parameters FiLM-ing conv block 3, inner lr 1.0, 2 steps, 16 tasks per update, Adam "
                    "1e-3 x0.9 every 5000, grad clamp 10, 32 filters, 60000 steps; Omniglot is not in the paper: the "
                    "same with MAML's Omniglot meta-batch and width, our choice")
        for key, batch, hidden, steps in (("omniglot-5w", 32, 64, 40000), ("omniglot-20w", 16, 64, 40000),
                                          ("miniimagenet", 16, 32, 60000))})

    meta_batch: int = 16
    inner_lr: float = 1.0
    inner_steps: int = 2
    inner_steps_test: int = 2
    n_context: int = 100
    film_block: int = 2
    outer_lr_decay: float = 0.9
    outer_lr_decay_every: int = 5000
    grad_clip: float = 10.0

    CHECK_PARAMS = dict(inner_steps_test=2)  # conformance suite (bench/checks.py): the paper's 2 test steps

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """The backbone, then the FiLM layer film.weight [2 C, n_context], film.bias [2 C] (C: the
        channels of the modulated batch norm, backbones.Backbone.film_layer)."""
        p = super().init_meta(info, gen)
        _, channels = self.net.film_layer(self.film_block)
        w_bound, b_bound = math.sqrt(3.0 / self.n_context), 1.0 / math.sqrt(self.n_context)
        p["film.weight"] = (torch.rand(2 * channels, self.n_context, generator=gen) * 2 - 1) * w_bound
        p["film.bias"] = (torch.rand(2 * channels, generator=gen) * 2 - 1) * b_bound
        return p

    def forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, way: int | None = None) -> torch.Tensor:
        context = p[CONTEXT] if CONTEXT in p else p["film.bias"].new_zeros(self.n_context)
        film = F.linear(context, p["film.weight"], p["film.bias"])
        layer, channels = self.net.film_layer(self.film_block)
        gamma, beta = film[:channels].view(1, -1, 1, 1), film[channels:].view(1, -1, 1, 1)
        return head_forward(p, self.features(p, x, FiLMOps(layer, gamma, beta)), way)

    def adapted_keys(self) -> list[str]:
        return [CONTEXT]

    def inner(self, x: torch.Tensor, y: torch.Tensor, steps: int, first_order: bool) -> Params:
        start = {**self.meta, CONTEXT: self.meta["film.bias"].detach().new_zeros(self.n_context)}  # reset per task
        return inner_loop(episode_loss(self.forward), start, [CONTEXT], (x, y), steps, self.inner_lr, first_order)

    def current_outer_lr(self) -> float:
        """Step decay of the outer learning rate (the reference's scheduler)."""
        return step_decay(self.outer_lr, self.outer_lr_decay, self.outer_lr_decay_every, self.fit_steps)

    def meta_grad_clamp(self) -> float:
        """The reference's element-wise meta-gradient clamp."""
        return self.grad_clip

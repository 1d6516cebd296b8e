"""UNICORN-MAML (Ye, Chao 2022, "How to Train Your MAML to Excel in Few-Shot Classification", ICLR 2022;
reference code: Han-Jia/UNICORN-MAML, model/models/mamlone.py, the `MAMLOne` model of its README).

MAML whose linear head is initialised from ONE meta-learned head vector: a weight row w [1, feat]
and a bias b [1], copied to every one of the episode's `way` rows before the inner loop, which
then adapts the whole network (body and the `way` copies) as MAML does. Every class starts from
the same head, so adaptation does not depend on which class got which label: permuting the support
labels permutes the columns of the logits and nothing else (tests/test_unicorn.py shows it, and
that MAML, whose N head rows are meta-learned separately, is not invariant). The outer gradient
reaches w and b through the copy, summed over the `way` rows (the reference's
`fcone.weight.repeat(way, 1)`).

What follows the paper and its code: the shared head init and its summed gradient; the same
number of inner steps at meta-training and meta-testing, many more than MAML's usual 1-5 (the
paper's first finding; the presets below); the query logits divided by a `temperature` in the
outer loss and at prediction, never in the inner loop (the reference's `/ args.temperature`).
The inner loop is second order by default like our MAML; `first_order=True` detaches the inner
gradients (the reference's update_params is always first order, so the miniImageNet preset
sets it).

Our choices, stated: Conv-4 trained from scratch with Adam instead of the reference's pre-trained
ResNet-12 (FEAT weights) fine-tuned with SGD (Nesterov momentum 0.9, weight decay 5e-4, lr 0.001,
x10 for the head vector, x0.1 every 20 epochs), which suit a pre-trained backbone, not a random
one; batch norm on the statistics of the batch being predicted (as all our MAML variants); the
head vector's initialisation is the shared one (core.conv4_init with a one-row head, Xavier) where
the reference uses torch's nn.Linear(640, 1) default.

Backbones: any. `miniimagenet-resnet12` is the paper's own setting (ResNet-12, 1-shot command); see
its note for what is not taken over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F

from bench.api import Episode, Predictor, Preset, TaskInfo, with_meta_dataset
from baselines.core import Params, episode_loss, inner_loop
from baselines.maml import MAML, YE_CHAO as _YE

REGISTER = {"unicorn-maml": "UnicornMAML"}


def shared_head(p: Mapping[str, torch.Tensor], way: int) -> Params:
    """`p` with its one-row head (weight [1, feat], bias [1]) copied to `way` rows: weight [way, feat],
    bias [way] (differentiable: the gradient of the copy is the sum over its rows)."""
    return {**p, "head.weight": p["head.weight"].repeat(way, 1), "head.bias": p["head.bias"].repeat(way)}


@dataclass
class UnicornMAML(MAML):
    """MAML with one shared head vector copied to every class before the inner loop.

    inner_lr, inner_steps, inner_steps_test, first_order, meta_batch, outer_lr, hidden: as MAML.
    temperature: the query logits are divided by it in the outer loss and at prediction (1: none).
    """

    temperature: float = 1.0

    LABEL_PERMUTATION_INVARIANT: ClassVar[bool] = True  # one shared head vector copied to every row
    STEP_TRACE: ClassVar[bool] = True  # adaptation ends in one inner_loop call (test-time steps axis)
    PARALLEL_TASKS: ClassVar[bool] = True  # task_loss only reads self
    PRESETS: ClassVar[Mapping[str, Preset]] = with_meta_dataset({
        **{key: Preset(dict(inner_lr=0.1, inner_steps=10, inner_steps_test=10, meta_batch=batch, outer_lr=1e-3,
                            hidden=64), 40000, _YE, "Han-Jia/UNICORN-MAML", "model/models/mamlone.py",
                       "Omniglot is not in the paper: MAML's Omniglot settings (Finn et al. 2017: Adam 1e-3, "
                       f"meta-batch {batch}, 40000 steps, Conv-4 64) with the paper's finding applied, our choice: "
                       "10 inner steps at train and at test alike (MAML's test count), at MAML's 20-way inner lr "
                       "0.1 so that 10 steps do not overshoot; second order like MAML")
           for key, batch in (("omniglot-5w", 32), ("omniglot-20w", 16))},
        "miniimagenet": Preset(dict(inner_lr=0.1, inner_steps=20, inner_steps_test=20, meta_batch=1, outer_lr=1e-3,
                                    hidden=32, temperature=0.5, first_order=True), 10000, _YE,
                               "Han-Jia/UNICORN-MAML", "README.md (MAMLOne, MiniImageNet 5-shot command); "
                               "model/models/mamlone.py; model/utils.py",
                               "inner lr (gd_lr) 0.1 and 20 inner steps at train and test (the README's 5-shot "
                               "command; its 1-shot command uses 0.1 and 5, MAML's 1-shot 0.05 and 15: one preset "
                               "key cannot tell the shots apart), first-order inner loop as the reference code, "
                               "temperature 0.5, one task per update, 100 epochs x 100 tasks = 10000 updates "
                               "(the paper: at most 10,000 tasks); not taken over: the pre-trained ResNet-12 and "
                               "its SGD (momentum 0.9, weight decay 5e-4, lr 1e-3, x10 for the head vector, x0.1 "
                               "every 20 epochs): Conv-4 32 from scratch with MAML's Adam 1e-3 here, our choice"),
        "miniimagenet-resnet12": Preset(dict(inner_lr=0.1, inner_steps=5, inner_steps_test=5, meta_batch=1, outer_lr=1e-3,
                                             temperature=0.5, first_order=True, backbone="resnet12"), 10000, _YE,
                                        "Han-Jia/UNICORN-MAML", "README.md (MAMLOne, MiniImageNet 1-shot command); "
                                        "model/models/mamlone.py",
                                        "the paper's own network, ResNet-12 as MetaOptNet's (64-160-320-640, "
                                        "average-pooled): inner lr (gd_lr) 0.1 and 5 inner steps at train and test (the "
                                        "1-shot command; the 5-shot one, in the miniimagenet preset: 0.1 and 20), "
                                        "temperature 0.5, first order, one task per update, 10000 updates; not taken "
                                        "over: the FEAT pre-trained initialisation and its SGD (Adam 1e-3 from scratch "
                                        "here), running batch-norm statistics for the query at test (batch statistics "
                                        "here)"),
    })

    # conformance suite (bench/checks.py): 3 inner steps at train and test (MAML's check-time test count)
    # instead of the Omniglot preset's 10 second-order steps, which made check_learns take ~80 s
    CHECK_PARAMS = dict(inner_steps=3)

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """The backbone with a one-row head: head.weight [1, feat], head.bias [1] (the shared head vector)."""
        return self.init_net(info, gen, 1)

    def inner(self, x: torch.Tensor, y: torch.Tensor, steps: int, first_order: bool) -> Params:
        """The inner loop on (x [n, C, H, W], y [n]) from the meta-parameters with the head vector
        copied to the y.max() + 1 classes; adapts every parameter, the head rows separately."""
        start = shared_head(self.meta, int(y.max()) + 1)
        return inner_loop(episode_loss(self.forward), start, list(start), (x, y), steps, self.inner_lr, first_order)

    def task_loss(self, ep: Episode) -> torch.Tensor:
        fast = self.inner(ep.support_x, ep.support_y, self.inner_steps, self.first_order)
        return F.cross_entropy(self.forward(fast, ep.query_x, ep.way) / self.temperature, ep.query_y)

    def predictor(self, fast: Params, way: int) -> Predictor:
        """query_x [n_query, C, H, W] -> logits / temperature [n_query, way] of the adapted parameters."""

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.forward(fast, query_x, way) / self.temperature

        return predict


"""Proto-MAML (Triantafillou et al. 2020, "Meta-Dataset: A Dataset of Datasets for Learning to Learn
from Few Examples", ICLR 2020), first order (fo-Proto-MAML, the variant the paper runs).

MAML whose linear head is not meta-learned but built per task from the support prototypes of
the body's features: with c_k the mean support embedding of class k (baselines.protonet.prototypes),
the head starts at W_k = 2 c_k, b_k = -||c_k||^2 (so its logits equal the Prototypical Network's
-||f(x) - c_k||^2 up to a per-query constant), and the inner loop then adapts the whole network,
body and that head. The head has exactly as many rows as the episode has ways, so variable-way
episodes (Meta-Dataset) need nothing else. The head init stays in the graph of the body: the
outer (query) loss reaches the body both directly and through the prototypes, while the inner
gradients are detached (first order), as in google-research/meta-dataset
(MAMLLearner.proto_maml_fc_layer_init with first_order=True). `first_order=False` would
differentiate through the inner steps as well (MAML's flag; not the paper's setting).

Outer Adam with step decay: lr * outer_lr_decay ** (step // outer_lr_decay_every), the
reference Trainer's decay (Meta-Dataset best configs). Differences, stated: Conv-4 at 84 px
instead of the pretrained ResNet-18 at 126 px; batch norm statistics of the batch being
predicted (the reference normalises the query with support moments); batch-norm parameters are
adapted in the inner loop like every other parameter (as our MAML does; the reference has
adapt_batch_norm=False); the reference's L2 weight decay on the outer loss is not applied.

Backbones: any. The paper's own network is ResNet-18 (pre-trained, 126 px; --set backbone=resnet18
builds it, untrained); no preset switches to it, since the pre-training is not available here, and
the paper has no ResNet-12 settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Mapping

import torch

from bench.api import Preset, TaskInfo
from baselines.core import Params, episode_loss, inner_loop, step_decay
from baselines.maml import FINN_KEYS, MAML
from baselines.protonet import prototypes


def proto_head(protos: torch.Tensor) -> Params:
    """The prototype-equivalent linear head: protos [way, d] -> weight 2c [way, d], bias -||c||^2 [way]."""
    return {"head.weight": 2 * protos, "head.bias": -protos.pow(2).sum(-1)}


REGISTER = {"protomaml": "ProtoMAML"}

_TRIANTAFILLOU = ("Triantafillou, Zhu, Dumoulin, Lamblin, Evci, Xu, Goroshin, Gelada, Swersky, Manzagol, "
                  "Larochelle. Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few Examples. "
                  "ICLR 2020")


@dataclass
class ProtoMAML(MAML):
    """First-order MAML with a per-task head initialised from the support prototypes.

    outer_lr_decay / outer_lr_decay_every: step decay of the outer learning rate (0: constant).
    """

    LABEL_PERMUTATION_INVARIANT: ClassVar[bool] = True  # head from the prototypes
    STEP_TRACE: ClassVar[bool] = True  # adaptation ends in one inner_loop call (test-time steps axis)
    PARALLEL_TASKS: ClassVar[bool] = True
    PRESETS: ClassVar[Mapping[str, Preset]] = {
        **{key: replace(p, values={**p.values, "first_order": True}, paper=_TRIANTAFILLOU,
                        note="fo-Proto-MAML; Omniglot / miniImageNet are not in the paper: MAML's settings and steps, "
                             "first order, our choice")
           for key, p in MAML.PRESETS.items() if key in FINN_KEYS},
        "meta-dataset": Preset(dict(inner_lr=0.005435, inner_steps=6, inner_steps_test=6, meta_batch=1,
                                    outer_lr=3.634e-4, outer_lr_decay=0.648, outer_lr_decay_every=2500, hidden=64,
                                    first_order=True), 75000, _TRIANTAFILLOU, "google-research/meta-dataset",
                               "learn/gin/best/maml_init_with_proto_imagenet.gin",
                               "fo-Proto-MAML, the ImageNet-only best config: inner lr 0.005435, 6 steps (+0 at "
                               "evaluation), one episode per update, Adam 3.634e-4 x0.648 every 2500, 75000 updates; "
                               "not taken over: pretrained ResNet-18 at 126 px, adapt_batch_norm=False, weight decay "
                               "1.37e-5, and the all-datasets config maml_init_with_proto_all.gin (0.01988, 1 step +5, "
                               "2.981e-4 x0.766 every 500), which one preset key cannot tell apart"),
    }

    first_order: bool = True
    outer_lr_decay: float = 1.0
    outer_lr_decay_every: int = 0

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """The backbone's body only: the head is built per task from prototypes."""
        p = super().init_meta(info, gen)
        return {k: v for k, v in p.items() if not k.startswith("head.")}

    def initial_params(self, x: torch.Tensor, y: torch.Tensor) -> Params:
        """The meta-parameters plus the prototype head of the support set (x [n, C, H, W], y [n]),
        differentiable w.r.t. the body through the prototypes."""
        protos = prototypes(self.features(self.meta, x), y, int(y.max()) + 1)
        return {**self.meta, **proto_head(protos)}

    def inner(self, x: torch.Tensor, y: torch.Tensor, steps: int, first_order: bool) -> Params:
        start = self.initial_params(x, y)
        return inner_loop(episode_loss(self.forward), start, list(start), (x, y), steps, self.inner_lr, first_order)

    def current_outer_lr(self) -> float:
        return step_decay(self.outer_lr, self.outer_lr_decay, self.outer_lr_decay_every, self.fit_steps)

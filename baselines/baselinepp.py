"""`baseline++` (Chen, Liu, Kira, Wang, Huang 2019, "A Closer Look at Few-shot Classification",
ICLR 2019).

`finetune` (the paper's "Baseline") with a cosine classifier instead of a linear one, both in
pre-training (over all training classes) and in the per-task head fitted on the support
features: logits[i, k] = s * cos(f(x_i), w_k), with features and class weight vectors
L2-normalised (x / (||x|| + 1e-5), as wyharveychen/CloserLookFewShot backbone.distLinear) and
no bias. The scale s follows the reference code: 2 for a classifier of at most 200 classes
(every few-shot head, and miniImageNet's pre-training head), 10 above (Omniglot's pre-training
over thousands of classes). Everything else is `finetune`'s: Adam 1e-3 pre-training, then 100
full-batch SGD steps (lr 0.01, momentum 0.9, weight decay 1e-3) on a fresh head per task.

The fresh head is drawn like PyTorch's nn.Linear (U(+-1/sqrt(d))) from a generator seeded by
`seed` anew in every adapt call, so adaptation is repeatable and leaves the method's RNG alone.
Differences from the reference code, stated: the class weight vectors are plain unit vectors
(the paper's cosine); the code's distLinear additionally learns a per-class norm through weight
normalisation (its issues #4 and #8), not reproduced. The code's fine-tuning uses mini-batches of
4 and dampening 0.9; here it is `finetune`'s full-batch recipe.

Backbones: any. The paper also runs ResNet-10/18/34 (its own variants, 224 px); no preset for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

from bench.api import Preset, TaskInfo, new_generator
from baselines.core import Params
from baselines.finetune import Finetune

NORM_EPS = 1e-5  # added to the norms before dividing (CloserLookFewShot distLinear)
HEAD_SALT = 2  # generator salt of the per-task head (the meta-parameters use salt 1)


def cosine_logits(feats: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * cos(feats[i], weight[k]): feats [n, d], weight [k, d] -> [n, k]."""
    f = feats / (feats.norm(dim=1, keepdim=True) + NORM_EPS)
    w = weight / (weight.norm(dim=1, keepdim=True) + NORM_EPS)
    return scale * f @ w.T


REGISTER = {"baseline++": "BaselinePP"}


@dataclass
class BaselinePP(Finetune):
    """Baseline with cosine classifiers.

    scale_factor: the scale of a classifier of at most `many_classes` classes;
    scale_factor_many: the scale of a larger one (the reference: 2, 10 and 200).
    """

    PRESETS: ClassVar[Mapping[str, Preset]] = {
        key: Preset(dict(meta_batch=4, outer_lr=1e-3, hidden=hidden, head_steps=100, head_lr=0.01, scale_factor=2.0,
                         scale_factor_many=10.0, many_classes=200), 40000,
                    "Chen, Liu, Kira, Wang, Huang. A Closer Look at Few-shot Classification. ICLR 2019",
                    "wyharveychen/CloserLookFewShot", "backbone.py (distLinear)",
                    "'Baseline++': cosine classifier in pre-training and fine-tuning, scale 2 up to 200 classes and "
                    "10 above; the rest as `finetune`: pre-training Adam 1e-3, fine-tuning SGD 0.01, momentum 0.9, "
                    "weight decay 1e-3, 100 iterations; budget and widths as `finetune`, our choice: the paper "
                    "pre-trains Conv-4 64 with batch 16 for 400 epochs on miniImageNet, 5 on Omniglot")
        for key, hidden in (("*", 64), ("miniimagenet", 32))}

    scale_factor: float = 2.0
    scale_factor_many: float = 10.0
    many_classes: int = 200

    PARALLEL_TASKS: ClassVar[bool] = True  # task_loss only reads self

    def scale(self, n_classes: int) -> float:
        """The cosine scale of a classifier over `n_classes` classes."""
        return self.scale_factor if n_classes <= self.many_classes else self.scale_factor_many

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """Conv-4 with a bias-free classifier weight [n_classes, feat] over all source classes."""
        p = super().init_meta(info, gen)
        del p["head.bias"]
        return p

    def forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, way: int | None = None) -> torch.Tensor:
        """Pre-training logits [N, n_classes] (first `way` when given) of the cosine classifier."""
        w = p["head.weight"]
        return cosine_logits(self.features(p, x), w if way is None else w[:way], self.scale(w.shape[0]))

    def new_head(self, way: int, feat_dim: int) -> Params:
        """Class weight vectors [way, feat_dim], U(+-1/sqrt(feat_dim)) from a per-call seeded generator."""
        gen = new_generator(self.seed, HEAD_SALT)
        bound = 1.0 / math.sqrt(feat_dim)
        return {"weight": (torch.rand(way, feat_dim, generator=gen) * 2 - 1) * bound}

    def head_logits(self, head: Params, feats: torch.Tensor) -> torch.Tensor:
        return cosine_logits(feats, head["weight"], self.scale(head["weight"].shape[0]))

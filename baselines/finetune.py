"""`finetune`: the transfer-learning baseline ("Baseline", Chen et al. 2019, "A Closer Look at
Few-shot Classification").

Meta-training is plain supervised pre-training of Conv-4 with one linear head over all classes
of the source, on the images (support and query) of the training episodes. Adaptation freezes
the backbone and trains a fresh linear head on the support features; the paper's fine-tuning
recipe is SGD lr 0.01, momentum 0.9, weight decay 1e-3, 100 iterations (here full-batch, so it
is deterministic). Pre-training: Adam 1e-3 (paper), one outer step per `meta_batch` episodes.

`pretraining_loss` (supervised pre-training on absolute class ids) is shared with scale-shift
(baselines/scaleshift.py); the per-task head is two hooks (`new_head`, `head_logits`) that
Baseline++ (baselines/baselinepp.py) overrides with its cosine classifier.

Backbones: any. The paper also runs ResNet-10/18/34 (its own variants, 224 px); no preset for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F

from bench.api import Episode, Predictor, Preset, Tags, TaskInfo
from baselines.core import GradientLearner, Params


def pretraining_loss(forward: Callable[..., torch.Tensor], p: Params, ep: Episode) -> torch.Tensor:
    """Supervised pre-training loss: cross-entropy of forward(p, x) [n, n_classes] on an episode's
    support and query images, labelled with their absolute class ids."""
    x = torch.cat([ep.support_x, ep.query_x])
    y = torch.tensor(ep.classes, device=ep.support_y.device)[torch.cat([ep.support_y, ep.query_y])]
    return F.cross_entropy(forward(p, x), y)


REGISTER = {"finetune": "Finetune"}


@dataclass
class Finetune(GradientLearner):
    """Pre-train on all training classes, then fit a new linear head per task."""

    LABEL_PERMUTATION_INVARIANT: ClassVar[bool] = True  # fresh all-zero head
    PRESETS: ClassVar[Mapping[str, Preset]] = {
        key: Preset(dict(meta_batch=4, outer_lr=1e-3, hidden=hidden, head_steps=100, head_lr=0.01), 40000,
                    "Chen, Liu, Kira, Wang, Huang. A Closer Look at Few-shot Classification. ICLR 2019",
                    note="'Baseline'; pre-training Adam 1e-3; fine-tuning SGD 0.01, momentum 0.9, weight decay 1e-3, "
                         "100 iterations; budget and widths our choice")
        for key, hidden in (("*", 64), ("miniimagenet", 32))}

    meta_batch: int = 4
    head_steps: int = 100
    head_lr: float = 0.01
    head_momentum: float = 0.9
    head_weight_decay: float = 1e-3

    TAGS = Tags(bn_mode="transductive", order="none", transductive=True, variable_way=True, deterministic=True)
    PARALLEL_TASKS: ClassVar[bool] = True  # task_loss only reads self

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """The backbone with a classifier over all n_classes source classes."""
        return self.init_net(info, gen, info.n_classes)

    def task_loss(self, ep: Episode) -> torch.Tensor:
        return pretraining_loss(self.forward, self.meta, ep)

    @property
    def test_steps(self) -> int | None:
        """Its test-time steps are the head's SGD steps (its single point on the steps axis)."""
        return self.head_steps

    def new_head(self, way: int, feat_dim: int) -> Params:
        """A fresh per-task head: zero weight [way, feat_dim] and bias [way]."""
        return {"weight": torch.zeros(way, feat_dim), "bias": torch.zeros(way)}

    def head_logits(self, head: Params, feats: torch.Tensor) -> torch.Tensor:
        """Logits [n, way] of the per-task head on features [n, feat_dim]."""
        return F.linear(feats, head["weight"], head["bias"])

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        if self.info is None:
            raise RuntimeError("Finetune: call setup(info) or fit before adapt")
        way = int(support_y.max()) + 1
        body = {k: v.detach() for k, v in self.meta.items()}
        with torch.no_grad():
            feats = self.features(body, support_x)
        head = {k: v.to(feats.device).requires_grad_(True) for k, v in self.new_head(way, feats.shape[1]).items()}
        opt = torch.optim.SGD(list(head.values()), lr=self.head_lr, momentum=self.head_momentum,
                              weight_decay=self.head_weight_decay)
        with torch.enable_grad():
            for _ in range(self.head_steps):
                opt.zero_grad()
                F.cross_entropy(self.head_logits(head, feats), support_y).backward()
                opt.step()
        head = {k: v.detach() for k, v in head.items()}

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.head_logits(head, self.features(body, query_x))

        return predict

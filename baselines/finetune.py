"""`finetune`: the transfer-learning baseline ("Baseline", Chen et al. 2019, "A Closer Look at
Few-shot Classification").

Meta-training is plain supervised pre-training of Conv-4 with one linear head over all classes
of the source, on the images (support and query) of the training episodes. Adaptation freezes
the backbone and trains a fresh linear head on the support features; the paper's fine-tuning
recipe is SGD lr 0.01, momentum 0.9, weight decay 1e-3, 100 iterations (here full-batch, so it
is deterministic). Pre-training: Adam 1e-3 (paper), one outer step per `meta_batch` episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.api import Episode, Predictor, Tags, TaskInfo
from baselines.core import GradientLearner, Params, conv4_features, conv4_init


@dataclass
class Finetune(GradientLearner):
    """Pre-train on all training classes, then fit a new linear head per task."""

    meta_batch: int = 4
    head_steps: int = 100
    head_lr: float = 0.01
    head_momentum: float = 0.9
    head_weight_decay: float = 1e-3

    TAGS = Tags(bn_mode="transductive", order="none", transductive=True, variable_way=True, deterministic=True)

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        c, h, _ = info.image_shape
        return conv4_init(gen, c, self.hidden, info.n_classes, h)

    def task_loss(self, ep: Episode) -> torch.Tensor:
        x = torch.cat([ep.support_x, ep.query_x])
        y = torch.tensor(ep.classes)[torch.cat([ep.support_y, ep.query_y])]
        return F.cross_entropy(self.forward(self.meta, x), y)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        if self.info is None:
            raise RuntimeError("Finetune: call setup(info) or fit before adapt")
        way = int(support_y.max()) + 1
        body = {k: v.detach() for k, v in self.meta.items()}
        with torch.no_grad():
            feats = conv4_features(body, support_x)
        w = torch.zeros(way, feats.shape[1], requires_grad=True)
        b = torch.zeros(way, requires_grad=True)
        opt = torch.optim.SGD([w, b], lr=self.head_lr, momentum=self.head_momentum,
                              weight_decay=self.head_weight_decay)
        with torch.enable_grad():
            for _ in range(self.head_steps):
                opt.zero_grad()
                F.cross_entropy(F.linear(feats, w, b), support_y).backward()
                opt.step()
        w, b = w.detach(), b.detach()

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return F.linear(conv4_features(body, query_x), w, b)

        return predict

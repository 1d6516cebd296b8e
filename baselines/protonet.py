"""Prototypical Networks (Snell, Swersky, Zemel 2017, "Prototypical Networks for Few-shot Learning",
NeurIPS 2017).

A metric method: the Conv-4 body (no head) embeds images, each class's prototype is the mean
embedding of its support examples, and a query's logits are its negative squared Euclidean
distances to the prototypes: logits[q, k] = -||f(x_q) - c_k||^2. Meta-training minimises the
query cross-entropy of these logits, episode by episode, with Adam (1e-3, halved every 2000
episodes: paper Sec. 3.1 and jakesnell/prototypical-networks run_train.py). Adaptation only
computes prototypes: there is no gradient step at test time, so Tags.order is "none".

The paper trains with more ways than it tests (Omniglot 60-way; miniImageNet 30-way for 1-shot,
20-way for 5-shot). The harness stream has the benchmark's way, so `episodes_per_task`
consecutive stream episodes are merged into one training task (`merge_episodes`: classes keyed
by absolute id; a class already present is dropped from the later episode, so no image can be
both support and query): 12 x 5-way gives the paper's 60-way Omniglot episodes (at most 60
ways; fewer when episodes share a class). `meta_batch` such tasks make one outer update (the
paper: one). Differences, stated: batch norm uses the statistics of the batch being embedded
(support and query sets separately, as at test time; the reference code embeds support and
query in one batch while training and uses running statistics at test), and the query count
per class is the benchmark's (15) rather than the reference's 5 for Omniglot training.

`prototypes` and `squared_distances` are shared with Proto-MAML (baselines/protomaml.py).

Backbones: any. The paper uses Conv-4 only; no ResNet preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F

from bench.api import Episode, Predictor, Preset, Tags, TaskInfo
from baselines.core import GradientLearner, Params, step_decay


def prototypes(feats: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
    """Class means of the support features: feats [n_support, d], labels [n_support] -> [way, d]."""
    onehot = F.one_hot(labels, way).to(feats.dtype)  # [n_support, way]
    return (onehot.T @ feats) / onehot.sum(0).unsqueeze(1)


def squared_distances(feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """||feats[q] - protos[k]||^2: feats [n_query, d], protos [way, d] -> [n_query, way]."""
    return (feats.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)


def merge_episodes(episodes: list[Episode]) -> Episode:
    """One higher-way training task from consecutive episodes.

    Classes are keyed by absolute id; a class that an earlier episode already brought is dropped
    from the later one (with its support and query examples), so the merged task has distinct
    classes and no image is both support and query. Relative labels are renumbered 0..way-1 in
    order of first appearance.
    """
    if len(episodes) == 1:
        return episodes[0]
    seen: dict[int, int] = {}
    parts: dict[str, list[torch.Tensor]] = {"sx": [], "sy": [], "qx": [], "qy": []}
    for ep in episodes:
        for rel, cls in enumerate(ep.classes):
            if cls in seen:
                continue
            seen[cls] = len(seen)
            s, q = ep.support_y == rel, ep.query_y == rel
            parts["sx"].append(ep.support_x[s])
            parts["qx"].append(ep.query_x[q])
            parts["sy"].append(torch.full((int(s.sum()),), seen[cls], dtype=torch.long, device=s.device))
            parts["qy"].append(torch.full((int(q.sum()),), seen[cls], dtype=torch.long, device=q.device))
    first = episodes[0]
    return Episode(torch.cat(parts["sx"]), torch.cat(parts["sy"]), torch.cat(parts["qx"]), torch.cat(parts["qy"]),
                   tuple(seen), first.split, first.index, "+".join(ep.spec_hash for ep in episodes))


REGISTER = {"protonet": "ProtoNet"}


@dataclass
class ProtoNet(GradientLearner):
    """Prototypical Networks on the Conv-4 body.

    meta_batch: training tasks per outer update; episodes_per_task: stream episodes merged into
    one training task (the paper's higher-way training; 1 = the benchmark's way);
    lr_decay / lr_decay_every: Adam's learning rate is multiplied by lr_decay every
    lr_decay_every outer updates (0: constant).
    """

    LABEL_PERMUTATION_INVARIANT: ClassVar[bool] = True  # per-class prototypes
    PRESETS: ClassVar[Mapping[str, Preset]] = {
        key: Preset(dict(meta_batch=1, outer_lr=1e-3, lr_decay=0.5, lr_decay_every=2000, hidden=64,
                         episodes_per_task=merged), 20000,
                    "Snell, Swersky, Zemel. Prototypical Networks for Few-shot Learning. NeurIPS 2017",
                    "jakesnell/prototypical-networks", "run_train.py",
                    "Adam 1e-3 halved every 2000 episodes (paper Sec. 3.1; code: lr 0.001, decay_every 20 epochs of "
                    "100 episodes), one episode per update, Conv-4 64; training ways above the test way (Omniglot 60, "
                    "miniImageNet 30 for 1-shot / 20 for 5-shot) reproduced by merging consecutive stream episodes "
                    "(60 / 30-way; 5-shot miniImageNet also gets 30); steps: the paper early-stops on validation "
                    "(code: at most 10000 x 100 episodes, patience 200 epochs), 20000 is our choice (the lr has then "
                    "been halved 10 times)")
        for key, merged in (("*", 1), ("omniglot-5w", 12), ("omniglot-20w", 3), ("miniimagenet", 6))}

    meta_batch: int = 1
    outer_lr: float = 1e-3
    hidden: int = 64
    episodes_per_task: int = 1
    lr_decay: float = 0.5
    lr_decay_every: int = 2000

    TAGS = Tags(bn_mode="transductive", order="none", transductive=True, variable_way=True, deterministic=True)
    PARALLEL_TASKS: ClassVar[bool] = True  # task_loss only reads self
    CHECK_PARAMS = dict(meta_batch=1)  # conformance suite (bench/checks.py): one (merged) task per update, as the paper

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """The Conv-4 body only (the embedding has no head)."""
        p = super().init_meta(info, gen)
        return {k: v for k, v in p.items() if not k.startswith("head.")}

    def logits(self, p: Params, support: tuple[torch.Tensor, torch.Tensor], query_x: torch.Tensor) -> torch.Tensor:
        """-||f(query) - c_k||^2 [n_query, way] with prototypes c of support = (x [n, C, H, W], y [n])."""
        x, y = support
        protos = prototypes(self.features(p, x), y, int(y.max()) + 1)
        return -squared_distances(self.features(p, query_x), protos)

    def episodes_per_step(self) -> int:
        return self.meta_batch * self.episodes_per_task

    def task_loss(self, ep: Episode) -> torch.Tensor:
        return F.cross_entropy(self.logits(self.meta, (ep.support_x, ep.support_y), ep.query_x), ep.query_y)

    def outer_step(self, batch: list[Episode]) -> None:
        """Merge each group of `episodes_per_task` episodes into one task; Adam on the mean query loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = step_decay(self.outer_lr, self.lr_decay, self.lr_decay_every, self.fit_steps)
        n = self.episodes_per_task
        super().outer_step([merge_episodes(batch[i:i + n]) for i in range(0, len(batch), n)])

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        if self.info is None:
            raise RuntimeError("ProtoNet: call setup(info) or fit before adapt")
        body = {k: v.detach() for k, v in self.meta.items()}
        with torch.no_grad():
            protos = prototypes(self.features(body, support_x), support_y, int(support_y.max()) + 1)

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return -squared_distances(self.features(body, query_x), protos)

        return predict

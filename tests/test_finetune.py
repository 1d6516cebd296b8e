"""finetune: pre-training uses absolute class ids; adaptation trains only a fresh head."""

from __future__ import annotations

import numpy as np
import torch

from baselines.finetune import Finetune


def test_head_covers_all_source_classes(synthetic_set):
    m = Finetune(hidden=8, meta_batch=2).setup(synthetic_set.task_info())
    assert m.meta["head.weight"].shape[0] == synthetic_set.source.n_classes


def test_adapt_leaves_backbone_untouched_and_learns(synthetic_set):
    m = Finetune(hidden=16, meta_batch=2, seed=0).setup(synthetic_set.task_info())
    m.fit(synthetic_set.stream("train"), 30)
    before = {k: v.clone() for k, v in m.meta.items()}
    test = synthetic_set.episodes("test", 20)
    acc = np.mean([r["accuracy"] for r in m.evaluate(test)])
    for k, v in m.meta.items():
        assert torch.equal(v, before[k])
    assert acc > 0.5  # chance is 0.2


def test_pretraining_loss_decreases(synthetic_set):
    m = Finetune(hidden=8, meta_batch=2, seed=0).setup(synthetic_set.task_info())
    ep = synthetic_set.episode("train", 0)
    first = m.task_loss(ep).item()
    m.fit(iter([ep] * 40), 20)
    assert m.task_loss(ep).item() < first

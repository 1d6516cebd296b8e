"""Every method learns real few-shot tasks: a CI-sized run on omniglot-small-5w1s (the real
Omniglot subsets in ../shared/data) ends well above the 20% chance of 5-way.

Budgets are sized for CI (under a minute of CPU per method, measured 15-45 s on one core): 100
outer steps, a narrower Conv-4 (16 or 32 filters), smaller meta-batches and fewer test-time
steps than the papers; the overrides are listed per method. Skipped when the shared data folder
or its Omniglot archives are absent. Accuracies measured with these plans (one thread): maml
0.60, fomaml 0.55, anil 0.49, boil 0.63, metasgd 0.50, cavia 0.52, finetune 0.51, reptile 0.60,
mamlpp 0.63, imaml 0.61, mixture 0.56 (K = 2; K = 1 0.61, K = 4 0.58), protonet 0.65,
protomaml 0.54, baseline++ 0.56, scale-shift 0.54, leo 0.53, mt-net 0.60, unicorn-maml 0.70, metal 0.54.
"""

from __future__ import annotations

import numpy as np
import pytest

from baselines import registry

BENCHMARK = "omniglot-small-5w1s"
FLOOR = 0.4  # chance is 0.2

_MAML_CI = dict(meta_batch=4, hidden=16, inner_steps_test=5)
# method -> (outer steps, test episodes, overrides of the paper defaults for a CI-sized run)
PLANS = {
    "maml": (100, 100, _MAML_CI),
    "fomaml": (100, 100, _MAML_CI),
    "anil": (100, 100, _MAML_CI),
    "boil": (100, 100, _MAML_CI),
    "metasgd": (100, 100, dict(meta_batch=2, hidden=32)),
    # CAVIA starts slowly (the head is shared, only the context adapts): 3x the paper's outer lr
    "cavia": (100, 100, dict(meta_batch=4, hidden=32, outer_lr=0.003)),
    "finetune": (100, 100, dict(hidden=16)),
    # Reptile's paper inner Adam lr (0.00044) and 86 test steps are sized for 200000 outer steps; here
    # the paper appendix's lr 0.001, 20 test steps, the meta step annealed over the short run, and 40
    # test episodes (its non-transductive prediction costs one support-sized batch per query)
    "reptile": (100, 40, dict(hidden=32, inner_lr=0.001, inner_steps_test=20, total_steps=100)),
    # MAML++: the paper's whole schedule compressed into the run (100 epochs of 1 outer step: multi-step
    # loss for the first 10 steps, outer lr cosine-annealed over the 100), paper outer lr
    "mamlpp": (100, 100, dict(meta_batch=4, hidden=16, epoch_steps=1)),
    # iMAML: the paper's lam 2, 5 CG steps and plain GD at test (lam_test 0); its 16 inner steps at lr 0.1
    # cost ~16 forward/backward passes per task, so 3 steps at lr 0.2 and meta-batch 2 here, 10 test steps
    "imaml": (100, 100, dict(meta_batch=2, hidden=16, inner_steps=3, inner_lr=0.2, inner_steps_test=10)),
    "mixture": (100, 100, _MAML_CI),  # K = 2 MAML initialisations (registry default)
    # ProtoNet: 15-way training tasks (3 merged episodes) instead of the paper's 60 (12), which cost 4x
    "protonet": (100, 100, dict(hidden=16, episodes_per_task=3)),
    "protomaml": (100, 100, _MAML_CI),
    # baseline++: 24 filters (16 reach only ~0.41: pre-training over ~1000 classes with the cosine scale 10 is slower)
    "baseline++": (100, 100, dict(hidden=24)),
    # scale-shift: 70 pre-training + 30 meta steps; inner lr 0.5: the paper's 0.01 is sized for 640-d ResNet
    # features and 10000 meta steps that shrink the head init; on 32-d features 50 steps at 0.01 barely move
    # the head (test accuracy ~0.22), 10x head lr like the checks
    "scale-shift": (100, 100, dict(hidden=32, pretrain_steps=70, inner_lr=0.5, head_lr=0.01)),
    # LEO: 70 pre-training + 30 LEO steps of 4 tasks (paper: 12), paper settings otherwise
    "leo": (100, 100, dict(hidden=32, pretrain_steps=70, meta_batch=4)),
    "mt-net": (100, 100, _MAML_CI),
    # UNICORN-MAML: the paper's equal train/test inner steps, 3 at lr 0.2 (its Omniglot preset's 10 second-order
    # steps cost 10x MAML's one), meta-batch 2
    "unicorn-maml": (100, 100, dict(meta_batch=2, hidden=16, inner_lr=0.2, inner_steps=3, inner_steps_test=3)),
    # MeTAL: every inner step forwards support + 75 queries (its transductive loss), ~2.5x MAML's plan; 2 steps
    # (2 loss networks) at lr 0.15, the paper's meta-batch 2, outer lr 3e-3 (1e-3 learns too slowly in 100 steps:
    # 0.49 with 3 steps at 0.1; at 3e-3 0.65, but ~4x MAML's time)
    "metal": (100, 100, dict(meta_batch=2, hidden=16, inner_lr=0.15, inner_steps=2, inner_steps_test=2,
                             outer_lr=3e-3)),
}


def test_every_learning_method_has_a_plan():
    assert set(PLANS) == set(registry.METHODS) - {"chance"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: with 2 threads on a busy 2-core machine these small convolutions ran ~40x
    slower (every op waits at an OpenMP barrier for a core another process holds)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(PLANS))
def test_method_learns_omniglot_small(omniglot_small, method):
    es = omniglot_small
    steps, n_test, overrides = PLANS[method]
    m = registry.make(method, es.bench.preset, seed=0, **overrides)
    m.setup(es.task_info())
    m.fit(es.stream("train"), steps)
    acc = float(np.mean([r["accuracy"] for r in m.evaluate(es.episodes("test", n_test))]))
    assert acc >= FLOOR, f"{method}: {acc:.3f} test accuracy after {steps} steps (chance 0.2)"

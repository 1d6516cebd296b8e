"""Benchmark script (not a test): metabench's MAML and learn2learn's MAML reach the same accuracy.

Both start from the same Conv-4 initialisation, see the same training episodes of
`omniglot-small-5w1s` (the real Omniglot subset) in the same order with the paper's Omniglot
5-way settings (meta-batch 32, inner lr 0.4, 1 inner step, Adam 1e-3), and are tested on the
same test episodes with 10 adaptation steps. Prints accuracy with 95% CI, the paired difference
and the fit time of each. Needs learn2learn (README: Performance).

    python scripts/perf_accuracy.py --steps 100 --root ~/.cache/metabench
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench import benchmarks
from bench.api import score
from bench.paths import resolve_root
from bench.perf import WORKLOADS, conv4_module, import_learn2learn_maml, load_functional_params
from bench.stats import ci95
from baselines import registry
from baselines.core import next_batch

BENCHMARK = "omniglot-small-5w1s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--root", default=None)
    args = p.parse_args()
    es = benchmarks.load(BENCHMARK, resolve_root(args.root))
    w = WORKLOADS["omniglot-5w1s"]
    ours = registry.make("maml", es.bench.preset, seed=0)
    ours.setup(es.task_info())
    model = conv4_module(w)
    load_functional_params(model, ours.meta)
    maml = import_learn2learn_maml()(model, lr=w.inner_lr)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)

    start = time.perf_counter()
    ours.fit(es.stream("train"), args.steps)
    ours_seconds = time.perf_counter() - start
    start, stream = time.perf_counter(), es.stream("train")
    for _ in range(args.steps):
        batch = next_batch(stream, w.meta_batch)
        opt.zero_grad()
        for ep in batch:
            learner = maml.clone()
            learner.adapt(F.cross_entropy(learner(ep.support_x), ep.support_y))
            (F.cross_entropy(learner(ep.query_x), ep.query_y) / len(batch)).backward()
        opt.step()
    l2l_seconds = time.perf_counter() - start

    test = es.episodes("test", args.test_episodes)
    acc_ours = np.array([r["accuracy"] for r in ours.evaluate(test)])
    acc_l2l = []
    for ep in test:
        learner = maml.clone()
        for _ in range(w.test_steps):
            learner.adapt(F.cross_entropy(learner(ep.support_x), ep.support_y), first_order=True)
        with torch.no_grad():
            acc_l2l.append(score(learner(ep.query_x), ep)["accuracy"])
    acc_l2l = np.array(acc_l2l)
    diff = acc_ours - acc_l2l
    print(f"{BENCHMARK}, {args.steps} outer steps, {len(test)} test episodes, torch {torch.__version__}")
    print(f"metabench maml:   {100 * acc_ours.mean():.2f}% ± {100 * ci95(acc_ours):.2f}  (fit {ours_seconds:.0f} s)")
    print(f"learn2learn MAML: {100 * acc_l2l.mean():.2f}% ± {100 * ci95(acc_l2l):.2f}  (fit {l2l_seconds:.0f} s)")
    print(f"paired difference: {100 * diff.mean():+.2f} ± {100 * ci95(diff):.2f} points")


if __name__ == "__main__":
    main()

"""The evaluation axes beside a run's main number: accuracy per test-time inner step, sensitivity to the
label permutation, and the FLOPs of meta-training and adaptation; computed on the run's own test episodes.

- Steps: `MetaLearner.evaluate(episodes, steps_upto=steps_upto(learner))` records the query accuracy
  after each inner step 0, 1, ..., 2x the method's test steps in the same adaptation pass as the main
  number (`step_rows` turns it into rows). A method without an inner loop it can record has one point.
- Permutations: `label_permutations(spec_hash, way, n)` are the identity and n-1 other class-to-label
  assignments drawn from a generator seeded by the episode hash; `permutation_rows` evaluates each
  (the identity's accuracy is the main number's).
- FLOPs: `count_flops` counts one outer step and one adaptation (adapt on the support set, predict the
  query set) with torch.utils.flop_counter.FlopCounterMode on a copy of the learner whose fast paths are
  off (the per-task reference path), so every implementation is credited the same work. FlopCounterMode
  counts matrix products and convolutions (forward and backward), not elementwise operations, batch norm
  or pooling, nor the optimizer.

Summaries for the leaderboard: `step_summary`, `permutation_summary`, `equal_budget`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pandas as pd
import torch

from bench.api import EVAL_CHUNK, Episode, MetaLearner, new_generator
from bench.stats import ci95

DEFAULT_PERMUTATIONS = 4
"""Label permutations per test episode (the identity included) unless a run asks for another number."""
PERM_SALT = 17
"""Generator salt of the permutation draws (mixed with the episode hash)."""
REFERENCE_PATH = ("per-task reference path (fast paths off: PARALLEL_TASKS, TASK_BATCHED), counted by "
                  "torch.utils.flop_counter.FlopCounterMode: matrix products and convolutions, forward and backward")


# --- test-time inner steps ------------------------------------------------------------------------------
def steps_upto(learner: MetaLearner) -> int:
    """How many test-time inner steps the steps axis records: twice the method's test steps (0 without)."""
    return 2 * (learner.test_steps or 0)


def step_rows(episode: int, episode_hash: str, result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The steps-axis rows of one evaluated episode (`result` from evaluate(..., steps_upto=...))."""
    return [{"episode": episode, "episode_hash": episode_hash, "step": int(s), "accuracy": float(acc),
             "loss": float(loss)} for s, acc, loss in result["steps"]]


# --- label permutations ---------------------------------------------------------------------------------
def label_permutations(spec_hash: str, way: int, n: int) -> list[tuple[int, ...]]:
    """The identity, then distinct random permutations of range(way), n in all (at most way!).

    perm[c] is the new label of the class labelled c. Drawn from a generator seeded by the episode's
    spec hash (hex), so episode i gets the same permutations in every run, on every worker.
    """
    n = min(int(n), math.factorial(way))
    perms = [tuple(range(way))]
    gen = new_generator(int(spec_hash[:15], 16), PERM_SALT)
    while len(perms) < n:
        p = tuple(int(i) for i in torch.randperm(way, generator=gen))
        if p not in perms:
            perms.append(p)
    return perms


def permuted(ep: Episode, perm: Sequence[int]) -> Episode:
    """`ep` with class c relabelled perm[c] (support and query labels; `classes` follows)."""
    table = torch.tensor(perm, dtype=ep.support_y.dtype, device=ep.support_y.device)
    classes = [0] * ep.way
    for c, new in enumerate(perm):
        classes[new] = ep.classes[c]
    return dataclasses.replace(ep, support_y=table[ep.support_y], query_y=table[ep.query_y], classes=tuple(classes))


def labels_text(perm: Sequence[int]) -> str:
    """A permutation as the perms file writes it: "2-0-1-4-3"."""
    return "-".join(str(int(i)) for i in perm)


def permutation_rows(learner: MetaLearner, episodes: Sequence[Episode], identity_accuracy: Sequence[float],
                     n: int) -> list[dict[str, Any]]:
    """The perms-axis rows of `episodes`: n permutations each (`label_permutations`), perm 0 the identity
    with the main number's accuracy (`identity_accuracy`, one per episode), the others evaluated here, in
    chunks as `evaluate` adapts them (episode.index is the row's episode)."""
    rows, todo = [], []
    for ep, acc in zip(episodes, identity_accuracy):
        perms = label_permutations(ep.spec_hash, ep.way, n)
        rows.append({"episode": ep.index, "episode_hash": ep.spec_hash, "perm": 0, "labels": labels_text(perms[0]),
                     "accuracy": float(acc)})
        todo += [(ep, k, p) for k, p in enumerate(perms) if k > 0]
    for first in range(0, len(todo), EVAL_CHUNK):
        part = todo[first:first + EVAL_CHUNK]
        for (ep, k, p), r in zip(part, learner.evaluate([permuted(ep, p) for ep, _, p in part])):
            rows.append({"episode": ep.index, "episode_hash": ep.spec_hash, "perm": k, "labels": labels_text(p),
                         "accuracy": float(r["accuracy"])})
    return sorted(rows, key=lambda r: (r["episode"], r["perm"]))


# --- FLOPs ----------------------------------------------------------------------------------------------
def reference_copy(learner: MetaLearner) -> MetaLearner:
    """A copy of `learner` (through state_dict) with every fast path off: the per-task reference path."""
    from baselines.core import CAPABILITIES

    ref = type(learner)(**learner.params())
    ref.device = learner.device
    ref.load_state_dict(copy.deepcopy(learner.state_dict()))
    for name in CAPABILITIES:
        if hasattr(ref, name):
            setattr(ref, name, False)
    return ref


def count_flops(learner: MetaLearner, train: Iterator[Episode], test: Episode) -> dict[str, Any]:
    """FLOPs of one outer step (on the next episodes of `train`) and of one adaptation (adapt on `test`'s
    support set, predict its query set), counted on a reference copy (`reference_copy`); `learner` is not
    changed. Returns {"outer_step": int, "adaptation": int, "path": REFERENCE_PATH}."""
    from torch.utils.flop_counter import FlopCounterMode

    ref = reference_copy(learner)
    with FlopCounterMode(display=False) as counter:
        ref.fit(train, 1)
    outer = counter.get_total_flops()
    ref = reference_copy(learner)
    with FlopCounterMode(display=False) as counter:
        predict = ref.adapt(test.support_x, test.support_y)
        with torch.no_grad():
            predict(test.query_x)
    return {"outer_step": int(outer), "adaptation": int(counter.get_total_flops()), "path": REFERENCE_PATH}


# --- summaries (leaderboard) ----------------------------------------------------------------------------
def _mean_ci(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group of `by`: accuracy averaged over seeds per episode, then its mean, 95% CI and count."""
    per_episode = frame.groupby(by + ["episode"], sort=True)["accuracy"].mean().reset_index()
    out = per_episode.groupby(by, sort=True)["accuracy"].agg(
        accuracy="mean", ci95=lambda v: ci95(v.to_numpy()), n_episodes="size").reset_index()
    return out


def step_summary(frames: Iterable[tuple[str, int, pd.DataFrame]]) -> pd.DataFrame:
    """Accuracy with 95% CI over episodes at each test-time inner step, per method.

    frames: (method, seed, steps-axis table). Columns method, steps, accuracy, ci95, n_episodes (the
    input of bench.plots.plot_steps)."""
    parts = [f.assign(method=m, seed=s) for m, s, f in frames]
    if not parts:
        return pd.DataFrame(columns=["method", "steps", "accuracy", "ci95", "n_episodes"])
    return _mean_ci(pd.concat(parts, ignore_index=True), ["method", "step"]).rename(columns={"step": "steps"})


def permutation_summary(frames: Iterable[tuple[str, int, pd.DataFrame]]) -> pd.DataFrame:
    """Per method, over its runs' perms-axis tables ((method, seed, table)):

    - mean: accuracy averaged over permutations, episodes and seeds;
    - spread: the within-episode spread, max - min accuracy over an episode's permutations, averaged;
    - gap: the best minus the worst permutation index (0 = identity, k = the k-th drawn one) by mean
      accuracy over episodes and seeds: how far one consistent choice of assignment moves the number;
    - identity: the main number (perm 0); n_perms, n_episodes, n_seeds.
    """
    rows = []
    for method, group in pd.concat([f.assign(method=m, seed=s) for m, s, f in frames]).groupby("method", sort=True):
        per_run_episode = group.groupby(["seed", "episode"])["accuracy"]
        by_perm = group.groupby("perm")["accuracy"].mean()
        rows.append({"method": str(method), "mean": float(group["accuracy"].mean()),
                     "spread": float((per_run_episode.max() - per_run_episode.min()).mean()),
                     "gap": float(by_perm.max() - by_perm.min()),
                     "identity": float(group.loc[group["perm"] == 0, "accuracy"].mean()),
                     "n_perms": int(group.groupby(["seed", "episode"]).size().max()),
                     "n_episodes": int(group["episode"].nunique()), "n_seeds": int(group["seed"].nunique())})
    return pd.DataFrame(rows, columns=["method", "mean", "spread", "gap", "identity", "n_perms", "n_episodes",
                                       "n_seeds"])


def training_flops(card: Mapping[str, Any], step: int | None = None) -> float | None:
    """Meta-training FLOPs of a run card at outer step `step` (default: its last step): outer-step FLOPs x
    steps; None when the card has no FLOP count."""
    flops = card.get("flops") or {}
    if not isinstance(flops.get("outer_step"), (int, float)):
        return None
    return float(flops["outer_step"]) * float(card.get("fit_steps", 0) if step is None else step)


def equal_budget(cards: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[float | None, pd.DataFrame]:
    """Each method's validation-selected accuracy at the meta-training budget of the cheapest run.

    cards: (method, run card) pairs with "flops" and a validation "curve". The budget is the smallest
    meta-training FLOPs (outer-step FLOPs x steps) of any run that trained (runs of 0 FLOPs, e.g. chance,
    set no budget). For each run, of the curve's checkpoints at or below the budget (steps <= budget /
    outer-step FLOPs) the one of best validation accuracy is taken, as the runner selects (earliest on a
    tie); a method's row averages its runs. Read from the validation curve as recorded: no interpolation
    between checkpoints, and the accuracy is the validation accuracy (the test episodes were run only
    at each run's finally selected checkpoint). Returns (budget, table of method, step, flops,
    val_accuracy, full_val_accuracy, n_runs); budget None when no card has FLOPs.
    """
    usable = [(m, c) for m, c in cards if (training_flops(c) or 0) > 0 and c.get("curve")]
    if not usable:
        return None, pd.DataFrame(columns=["method", "step", "flops", "val_accuracy", "full_val_accuracy", "n_runs"])
    budget = min(training_flops(c) for _, c in usable)
    rows = []
    for method, card in usable:
        per_step = float(card["flops"]["outer_step"])
        curve = [p for p in card["curve"] if p["step"] * per_step <= budget * (1 + 1e-12)]
        best = max(curve, key=lambda p: (p["val_accuracy"], -p["step"]))
        full = max(card["curve"], key=lambda p: (p["val_accuracy"], -p["step"]))
        rows.append({"method": method, "step": best["step"], "flops": best["step"] * per_step,
                     "val_accuracy": best["val_accuracy"], "full_val_accuracy": full["val_accuracy"]})
    table = pd.DataFrame(rows).groupby("method", sort=True).agg(
        step=("step", "mean"), flops=("flops", "mean"), val_accuracy=("val_accuracy", "mean"),
        full_val_accuracy=("full_val_accuracy", "mean"), n_runs=("step", "size")).reset_index()
    return budget, table.sort_values(["val_accuracy", "method"], ascending=[False, True], kind="mergesort")


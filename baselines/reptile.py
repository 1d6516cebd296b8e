"""Reptile (Nichol, Achiam, Schulman 2018, "On First-Order Meta-Learning Algorithms",
arXiv:1803.02999; code: openai/supervised-reptile).

For each task of a meta-batch: start from the meta-parameters phi, run `inner_steps` Adam steps
on mini-batches of the task's data to get W_i; then move phi towards the average:
phi <- phi + eps * (mean_i W_i - phi). The interpolation is done as one SGD step with
learning rate eps on the "gradient" phi - mean_i W_i (so `outer_lr` is the meta step size
eps), and eps is annealed linearly from `outer_lr` to `outer_lr_final` over `total_steps`
outer steps (the reference's --meta-step / --meta-step-final / --meta-iters:
eps_i = outer_lr + (outer_lr_final - outer_lr) * i / total_steps). First order by nature.

As in the reference code (supervised_reptile/reptile.py, models.py):
- The inner optimizer is Adam with beta1 = 0 (betas (0, 0.999), TF-style epsilon 1e-8). Its
  second-moment state is *not* reset between tasks: the reference rolls back only the
  trainable variables after each task, so the Adam slots carry over across tasks and
  meta-steps, and evaluation starts from them too (and restores them afterwards). Here that
  state (`inner_state`: one second-moment tensor per parameter plus the step count) is part of
  the meta-state, saved by `state_dict`, and `adapt` starts from a copy of it.
- Inner mini-batches of `inner_batch` examples are drawn without replacement, reshuffling the
  task's examples whenever they run out (`_mini_batches`), `inner_steps` of them.
- Evaluation fine-tunes on the support set only, `inner_steps_test` steps of batches of
  `eval_batch`. Non-transductive by default: each query is predicted in one batch together with
  the whole support set (batch-norm statistics of support + that query), so predictions of one
  query never depend on the other queries (Tags.bn_mode "inductive"); `transductive=True`
  predicts all queries in one batch (the reference's --transductive).
  The test-time steps axis (`adapt_recorded`) records this loop after every Adam step (one step =
  one mini-batch) and runs it on to 2 x inner_steps_test steps with the same mini-batch stream.
The reference has no query split at training time (a task is `train_shots` examples per class);
here training episodes come with support and query sets, so the inner loop uses all of an
episode's images (support + query) at training, and only the support set at test.

Defaults per family, from the README commands "used for the paper" (published_hyperparameters.csv):
Omniglot 5-way 1-shot: Adam lr 0.00044, inner batch 5, 12 inner steps, meta-batch 3, meta step
1.0 -> 0, 200000 steps, eval batch 5, 86 eval steps; Omniglot 20-way 1-shot: 0.00046, batch 15,
12 steps, meta-batch 3, 1.0 -> 0, 200000, eval batch 10, 97 steps; miniImageNet 5-way 1-shot:
0.0012, batch 3, 19 steps, meta-batch 2, 0.235 -> 0, 200000, eval batch 3, 55 steps, 32 filters.
Conv-4 here is the shared max-pool variant (the reference's Omniglot net uses strided convs).
A run shorter than the paper's should set `total_steps` to its length so eps still reaches 0.

Backbones: any (the inductive prediction, support plus one query, works on each). No ResNet settings
in the paper; DropBlock is not supported (its outer step draws no per-task masks: an error at
construction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from bench.api import Episode, Predictor, Preset, Tags, TaskInfo, new_generator, with_meta_dataset
from baselines.core import GradientLearner, Params, record_steps, step_curve

# Inductive prediction forwards, for each query, the support set plus that query; queries go through in
# vmapped chunks of at most this many input values (2**22: a layer's map holds hidden / channels times as
# many, 512 MiB at 32 channels on grey images), so a large episode (Meta-Dataset: ~300 support and ~450 query
# images at 84 px) never holds all of them at once.
INDUCTIVE_CHUNK_VALUES = 2 ** 22


def _mini_batches(n: int, batch: int, count: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """`count` index batches of size min(batch, n) over range(n): shuffle, cut, reshuffle when exhausted
    (none, and no draw, for count <= 0)."""
    if count <= 0:
        return
    batch = min(batch, n)
    cur: list[torch.Tensor] = []
    have, made = 0, 0
    while True:
        for i in torch.randperm(n, generator=gen):
            cur.append(i)
            have += 1
            if have < batch:
                continue
            yield torch.stack(cur)
            cur, have, made = [], 0, made + 1
            if made == count:
                return


REGISTER = {"reptile": "Reptile"}

AdamState = tuple[Params, Params, int]
"""The inner loop's state: parameters, Adam second moments (one per parameter), Adam step count."""


@dataclass
class Reptile(GradientLearner):
    """Reptile on Conv-4: Adam(beta1=0) inner loop, interpolation outer step with linear annealing.

    inner_lr, inner_batch, inner_steps: the inner Adam loop at meta-training (on support + query);
    eval_batch, inner_steps_test: the inner loop at test (on the support set);
    outer_lr -> outer_lr_final over total_steps: the meta step size eps (linear annealing);
    adam_beta2, adam_eps: the inner Adam's second-moment decay and epsilon (beta1 is 0);
    transductive: predict all queries in one batch (batch norm over the query set).
    """

    PRESETS: ClassVar[Mapping[str, Preset]] = with_meta_dataset({
        key: Preset({**values, "outer_lr_final": 0.0, "total_steps": 200000}, 200000,
                    "Nichol, Achiam, Schulman. On First-Order Meta-Learning Algorithms. arXiv:1803.02999, 2018",
                    "openai/supervised-reptile", "README.md (the commands 'used for the paper', 1-shot rows)",
                    "inner Adam beta1=0; meta step annealed linearly to 0")
        for key, values in (
            ("omniglot-5w", dict(inner_lr=0.00044, inner_batch=5, inner_steps=12, eval_batch=5, inner_steps_test=86,
                                 meta_batch=3, outer_lr=1.0, hidden=64)),
            ("omniglot-20w", dict(inner_lr=0.00046, inner_batch=15, inner_steps=12, eval_batch=10, inner_steps_test=97,
                                  meta_batch=3, outer_lr=1.0, hidden=64)),
            ("miniimagenet", dict(inner_lr=0.0012, inner_batch=3, inner_steps=19, eval_batch=3, inner_steps_test=55,
                                  meta_batch=2, outer_lr=0.235, hidden=32)))})

    meta_batch: int = 3
    outer_lr: float = 1.0
    outer_lr_final: float = 0.0
    total_steps: int = 200000
    inner_lr: float = 0.00044
    inner_batch: int = 5
    inner_steps: int = 12
    eval_batch: int = 5
    inner_steps_test: int = 86
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    transductive: bool = False

    DROPBLOCK_TASKS: ClassVar[bool] = False  # its outer step runs the inner Adam loops itself (no task_loss)
    # conformance-suite settings (bench/checks.py): meta step 1 annealed over the learning check's 60
    # steps, and a larger inner Adam step so that Reptile visibly learns within that budget
    CHECK_PARAMS = dict(outer_lr=1.0, total_steps=60, inner_lr=0.003, inner_batch=10, inner_steps=5,
                        eval_batch=5, inner_steps_test=10)

    @property
    def tags(self) -> Tags:
        return Tags(bn_mode="transductive" if self.transductive else "inductive", order="first",
                    transductive=self.transductive, variable_way=True, deterministic=True)

    # --- construction and state ---------------------------------------------------------
    def setup(self, info: TaskInfo) -> "Reptile":
        super().setup(info)
        self.inner_state = self.fresh_inner_state()
        return self

    def fresh_inner_state(self) -> dict[str, Any]:
        """Adam(beta1=0) state: a zero second moment per meta-parameter and step count 0."""
        return {"v": {k: torch.zeros_like(v) for k, v in self.meta.items()}, "t": 0}

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Plain SGD: one step with lr eps on phi - mean(W) is the interpolation phi + eps (mean(W) - phi)."""
        return torch.optim.SGD(list(self.meta.values()), lr=self.outer_lr)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["inner_state"] = {"v": {k: v.clone() for k, v in self.inner_state["v"].items()},
                                "t": int(self.inner_state["t"])}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> "Reptile":
        super().load_state_dict(state)
        inner = state["inner_state"]
        self.inner_state = {"v": {k: v.clone() for k, v in inner["v"].items()}, "t": int(inner["t"])}
        return self

    # --- the inner loop -----------------------------------------------------------------
    def meta_step_size(self) -> float:
        """eps of the current outer step: linear from outer_lr to outer_lr_final over total_steps."""
        frac = min(1.0, self.fit_steps / max(1, self.total_steps))
        return self.outer_lr + (self.outer_lr_final - self.outer_lr) * frac

    def inner_adam(self, x: torch.Tensor, y: torch.Tensor, way: int, batch: int, steps: int,
                   state: Mapping[str, Any], gen: torch.Generator) -> tuple[Params, dict[str, Any]]:
        """`steps` Adam(beta1=0) steps from the meta-parameters on mini-batches of (x, y).

        Returns the adapted parameters and the new Adam state (the inputs are not modified).
        TF's Adam update: w -= lr * sqrt(1 - beta2^t) * g / (sqrt(v) + eps).
        """
        current: AdamState = ({k: v.detach() for k, v in self.meta.items()}, dict(state["v"]), int(state["t"]))
        for idx in _mini_batches(len(y), batch, steps, gen):
            current = self.adam_step(current, (x[idx], y[idx]), way)
        fast, v, t = current
        return fast, {"v": v, "t": t}

    def adam_step(self, state: AdamState, batch: tuple[torch.Tensor, torch.Tensor], way: int) -> AdamState:
        """One inner Adam(beta1=0) step on a mini-batch (x [b, C, H, W], y [b]) from state (parameters,
        second moments, step count); returns the new state (the input is not modified)."""
        def loss(p: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.forward(p, xb, way), yb)

        fast, v, t = dict(state[0]), dict(state[1]), state[2] + 1
        g = grad(loss)(fast, *batch)
        scale = self.inner_lr * (1 - self.adam_beta2 ** t) ** 0.5
        for k in fast:
            v[k] = self.adam_beta2 * v[k] + (1 - self.adam_beta2) * g[k] * g[k]
            fast[k] = fast[k] - scale * g[k] / (v[k].sqrt() + self.adam_eps)
        return fast, v, t

    # --- training -----------------------------------------------------------------------
    def outer_step(self, batch: list[Episode]) -> None:
        eps = self.meta_step_size()
        total = {k: torch.zeros_like(v) for k, v in self.meta.items()}
        state = self.inner_state
        for ep in batch:
            x = torch.cat([ep.support_x, ep.query_x])
            y = torch.cat([ep.support_y, ep.query_y])
            fast, state = self.inner_adam(x, y, ep.way, self.inner_batch, self.inner_steps, state, self.gen)
            for k in total:
                total[k] += fast[k]
        self.inner_state = state
        for group in self.optimizer.param_groups:
            group["lr"] = eps
        with torch.no_grad():
            for k, p in self.meta.items():
                p.grad = p.detach() - total[k] / len(batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # --- adaptation ---------------------------------------------------------------------
    def adapt_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        way = int(support_y.max()) + 1
        fast, _ = self.inner_adam(support_x, support_y, way, self.eval_batch, self.inner_steps_test,
                                  self.inner_state, self.eval_generator())
        return fast

    def eval_generator(self) -> torch.Generator:
        """The generator of adaptation's mini-batches: fixed per call, so adapt is repeatable and leaves self.gen alone."""
        return new_generator(self.seed, 2)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        if self.info is None:
            raise RuntimeError("Reptile: call setup(info) or fit before adapt")
        with torch.enable_grad():
            fast = self.adapt_params(support_x, support_y)
        return self.predictor_with(fast, (support_x, support_y))

    def predictor_with(self, fast: Params, support: tuple[torch.Tensor, torch.Tensor]) -> Predictor:
        """The prediction of adapted parameters `fast` (detached here) for the support set (x [n, C, H, W],
        y [n]): inductive (each query [C, H, W] in one batch with the support images), or all queries in
        one batch when transductive (GradientLearner.predictor)."""
        fast, way = {k: v.detach() for k, v in fast.items()}, int(support[1].max()) + 1
        if self.transductive:
            return self.predictor(fast, way)
        sx = support[0].detach()

        def one(q: torch.Tensor) -> torch.Tensor:
            return self.forward(fast, torch.cat([sx, q.unsqueeze(0)]), way)[-1]

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            per_query = sx[0].numel() * (len(sx) + 1)  # input values of one query's batch
            chunk = max(1, INDUCTIVE_CHUNK_VALUES // per_query)
            with torch.no_grad():
                return vmap(one, chunk_size=chunk if chunk < len(query_x) else None)(query_x)

        return predict

    def adapt_recorded(self, support_x: torch.Tensor, support_y: torch.Tensor,
                       upto: int) -> tuple[Predictor, dict[int, Predictor], float]:
        """The step curve, from adapt's own inner loop run on (`record_steps`): a step is one inner Adam step on
        one mini-batch of `eval_batch` support examples; past inner_steps_test the same mini-batch stream goes
        on (reshuffled as it runs out) with the same Adam state, so steps 0..inner_steps_test are adapt's."""
        way, own = int(support_y.max()) + 1, self.inner_steps_test
        fast = {k: v.detach() for k, v in self.meta.items()}
        batches = _mini_batches(len(support_y), self.eval_batch, max(own, upto), self.eval_generator())

        def step(state: AdamState, s: int) -> AdamState:
            idx = next(batches)
            return self.adam_step(state, (support_x[idx], support_y[idx]), way)

        states, extra = record_steps(step, (fast, dict(self.inner_state["v"]), int(self.inner_state["t"])), own, upto)
        main, curve = step_curve(states, own, lambda state, s: self.predictor_with(state[0], (support_x, support_y)))
        return main, curve, extra

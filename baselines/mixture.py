"""`mixture`: MAML with a mixture of K meta-learned initial conditions, hard-assigned per task.

The mixture-of-initialisations member of the family (cf. Jerfel, Grant, Griffiths, Heller 2019,
"Reconciling meta-learning and continual learning with online mixtures of tasks", NeurIPS 2019,
which clusters tasks around several MAML initialisations; TSA-MAML, Zhou et al. 2021, groups
tasks around 5 initialisations; MMAML (Vuorio et al. 2019) and HSML (Yao et al. 2019) instead
modulate one initialisation with a task embedding, which this is not).

- K Conv-4 parameter dicts, drawn one after the other from the seeded generator (component 0
  is exactly MAML's initialisation for the same seed), stored in one meta dict under "c<j>.".
- Assignment: for each task, run the MAML inner loop (`inner_steps`, `inner_lr`) from every
  component on the support set and take the component with the lowest post-adaptation SUPPORT
  loss (query labels are never looked at; ties go to the lowest index, so assignment is
  deterministic and needs no random draw). The same rule, with the training `inner_steps`,
  picks the component at test time; the chosen component is then adapted with
  `inner_steps_test` steps. The test-time steps axis (`adapt_recorded`) is the chosen component's
  inner loop recorded after every step, run on to 2 x inner_steps_test steps.
- Training: only the assigned component gets the task's outer (query) loss, so components
  that win no task of a meta-batch get no gradient and no Adam update. The K inner loops of
  training keep their graphs until the assignment is known (memory ~K x MAML's inner loop);
  the losing graphs are dropped unused.
- `assign_counts` (state_dict, int64 [K]) counts the training tasks each component has won.

Collapse (one component winning every task) is the expected failure of hard assignment: the
component that wins early gets all the outer updates and keeps winning. Nothing here prevents
it (the assignment rule is the method, and a usage bonus would let something other than the
support loss decide); `assign_counts` shows it, and with K = 1 the method is exactly MAML.

K (`n_components`) = 2 by default, our choice: training and adaptation cost K inner loops per
task. Measured on omniglot-small-5w1s at the CI budget (100 outer steps, meta-batch 4, Conv-4
16, 5 test steps, 100 test episodes, one thread): K = 1 / 2 / 4 reached 0.61 / 0.56 / 0.58
test accuracy, assignment counts [400] / [65, 335] / [57, 293, 0, 50], fit 45 / 42 / 62 s,
evaluation 12 / 14 / 19 s (times on a shared machine: rough). Omniglot tasks are one mode, and
splitting the outer updates over components did not pay off at this budget (a 100-episode
estimate, not a significance test); K = 2 is the cheapest real mixture, and K = 4 already left
one component unused.

Backbones: any (every component is the same network). No ResNet settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from bench.api import Episode, Predictor, Preset, TaskInfo, with_meta_dataset
from baselines.core import Params, episode_loss, inner_loop, step_curve, tracing
from baselines.maml import FINN_KEYS, MAML


REGISTER = {"mixture": "Mixture"}


@dataclass
class Mixture(MAML):
    """MAML with `n_components` initialisations; each task uses the one that fits its support set best.

    n_components: K, the number of initialisations (K = 1 is MAML).
    """

    PRESETS: ClassVar[Mapping[str, Preset]] = with_meta_dataset({
        key: replace(p, values={**p.values, "n_components": 2},
                     paper="Jerfel, Grant, Griffiths, Heller. Reconciling meta-learning and continual learning with "
                           "online mixtures of tasks. NeurIPS 2019",
                     note="a mixture of K MAML initialisations with hard per-task assignment by post-adaptation "
                          "support loss, related to the paper above and to TSA-MAML (Zhou et al. UAI 2021: 5 groups "
                          "of MAML initialisations, Carbonaraa/TSA-MAML README); inner loop, meta-batch, outer Adam, widths and steps: MAML's (Finn et al. 2017, cbfinn/maml), "
                          "as every component is a MAML initialisation; K = 2 is our choice: cost grows with K, and "
                          "K = 1 / 2 / 4 compared on omniglot-small-5w1s showed no gain from more components")
        for key, p in MAML.PRESETS.items() if key in FINN_KEYS})

    PARALLEL_TASKS: ClassVar[bool] = False  # task_loss counts assignments (assign_counts)

    n_components: int = 2

    # --- construction -------------------------------------------------------------------
    @staticmethod
    def prefix(j: int) -> str:
        """Key prefix of component j in the meta dict."""
        return f"c{j}."

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """K independent Conv-4 initialisations, drawn in order from `gen`."""
        if self.n_components < 1:
            raise ValueError(f"Mixture: n_components must be >= 1, got {self.n_components}")
        out: Params = {}
        for j in range(self.n_components):
            out.update({self.prefix(j) + k: v for k, v in super().init_meta(info, gen).items()})
        return out

    def setup(self, info: TaskInfo) -> "Mixture":
        super().setup(info)
        self.assign_counts = torch.zeros(self.n_components, dtype=torch.int64)
        return self

    def component(self, j: int) -> Params:
        """Component j as a plain Conv-4 dict (the meta tensors themselves, so gradients reach them)."""
        pre = self.prefix(j)
        return {k[len(pre):]: v for k, v in self.meta.items() if k.startswith(pre)}

    # --- assignment ---------------------------------------------------------------------
    def inner_from(self, j: int, x: torch.Tensor, y: torch.Tensor, steps: int, first_order: bool) -> Params:
        """The MAML inner loop from component j on (x [n, C, H, W], y [n])."""
        start = self.component(j)
        return inner_loop(episode_loss(self.forward), start, list(start), (x, y), steps, self.inner_lr, first_order)

    def assign(self, x: torch.Tensor, y: torch.Tensor,
               first_order: bool = True) -> tuple[int, list[Params], torch.Tensor]:
        """Adapt every component on the support set (x, y) with `inner_steps`; return the index with the
        lowest post-adaptation support loss (ties: lowest index), the adapted dicts, and the losses [K]."""
        fasts = [self.inner_from(j, x, y, self.inner_steps, first_order) for j in range(self.n_components)]
        loss = episode_loss(self.forward)
        with torch.no_grad():
            losses = torch.stack([loss(f, x, y) for f in fasts])
        return int(torch.argmin(losses)), fasts, losses  # argmin returns the first minimum

    # --- training and adaptation ---------------------------------------------------------
    def task_loss(self, ep: Episode) -> torch.Tensor:
        """Query loss of the assigned component only (and count the assignment)."""
        j, fasts, _ = self.assign(ep.support_x, ep.support_y, self.first_order)
        self.assign_counts[j] += 1
        return F.cross_entropy(self.forward(fasts[j], ep.query_x, ep.way), ep.query_y)

    def adapt_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        j, fasts, _ = self.assign(support_x, support_y)
        if self.inner_steps_test == self.inner_steps:
            return fasts[j]
        return self.inner_from(j, support_x, support_y, self.inner_steps_test, True)

    def adapt_recorded(self, support_x: torch.Tensor, support_y: torch.Tensor,
                       upto: int) -> tuple[Predictor, dict[int, Predictor], float]:
        """The step curve of the chosen component (a step is one MAML inner step of that component), from
        adapt's own inner loops (`tracing`): the assignment's K loops when inner_steps_test equals
        inner_steps (each run on to upto; the losers' extra steps are wasted, and counted as extra time),
        else the chosen component's test-time loop alone. Step 0 is the chosen component unadapted (the
        choice itself is made after inner_steps steps of every component)."""
        way, own = int(support_y.max()) + 1, self.inner_steps_test
        same = own == self.inner_steps
        with tracing(upto if same else 0) as trace:
            j, fasts, _ = self.assign(support_x, support_y)
        if same:
            states, extra = trace.calls[j], trace.extra_seconds
        else:
            with tracing(upto) as trace:
                self.inner_from(j, support_x, support_y, own, True)
            states, extra = trace.calls[0], trace.extra_seconds
        main, curve = step_curve(states, own, lambda fast, s: self.predictor(fast, way))
        return main, curve, extra

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "assign_counts": self.assign_counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> "Mixture":
        super().load_state_dict(state)
        self.assign_counts = state["assign_counts"].clone().to(torch.int64)
        return self

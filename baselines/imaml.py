"""iMAML (Rajeswaran, Finn, Kakade, Levine 2019, "Meta-Learning with Implicit Gradients", NeurIPS 2019).

The inner loop solves a proximally regularised problem from the meta-parameters theta,

    phi*(theta) = argmin_phi  L_support(phi) + (lam / 2) * ||phi - theta||^2,

here with `inner_steps` steps of plain gradient descent (the paper's "iMAML, GD" variant), run
detached: no graph of the inner trajectory is kept. At a minimiser the stationarity condition
grad L_support(phi*) + lam * (phi* - theta) = 0 gives, by the implicit function theorem,
d phi* / d theta = (I + H / lam)^{-1} with H = Hessian of L_support at phi*, so the task's
meta-gradient is

    g = (I + H / lam)^{-1} grad_phi L_query(phi*),

solved with `cg_steps` steps of conjugate gradient, whose only access to H is Hessian-vector
products of the support loss at phi* (autograd double backward: one graph of the support
gradient, reused by every CG step). Memory is therefore independent of the number of inner
steps (scripts/imaml_memory.py measures it against MAML). At a local minimum
of the regularised problem H + lam * I is positive semi-definite, so I + H / lam is too, which
is what CG needs.

Facts and sources (published_hyperparameters.csv row "iMAML"; aravindr93/imaml_dev):
- paper, Table 2 caption (Omniglot): inner gradient descent with 16 steps for 5-way and 25 for
  20-way, lam = 2.0, 5 CG steps for the task meta-gradient, meta-parameters updated with Adam,
  the MAML Omniglot architecture (Conv-4, 64 filters).
- imaml_dev examples/README.md training command (with its note on replicating the paper):
  inner lr 0.1, outer Adam lr 1e-3, 32 tasks per meta-batch, lam 2.0, 5 CG steps (cg_damping
  1.0), 16 inner steps, at least 20000 outer steps; accuracy measured with 16 inner steps at
  inner lr 0.1 and lam 0 (no proximal term at test: `lam_test` here).
  implicit_maml/learner_model.py: the outer Adam uses eps = 1e-3.
Differences from the reference code, stated: (1) its training inner loop runs 16 unregularised
SGD steps and then one SGD step on the proximal term only; we minimise the regularised objective
of the paper (Eq. 4) at every step. (2) Its CG operator is heavily damped,
(1 + cg_damping) * I + H / (lam + 10); we solve the paper's system (I + H / lam) g = grad.
(3) Conv-4 uses max-pooling (the shared backbone) instead of strided convolutions.
Adaptation at test follows the README (lam_test = 0); measured on omniglot-small-5w1s (100
outer steps, meta-batch 4, Conv-4 16, 5 inner steps at lr 0.1, 10 test steps) it beat keeping the
proximal term at test: 0.57 vs 0.43 accuracy over 100 test episodes.

Backbones: any. No ResNet settings in the paper; DropBlock is not supported (its outer update sums
implicit gradients itself: an error at construction).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F

from bench.api import Episode, Preset, Tags, with_meta_dataset
from baselines.core import GradientLearner, LossFn, Params, episode_loss, higher_order, inner_loop
from baselines.parallel import fold_tasks


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, steps: int,
                       tol: float = 1e-20) -> torch.Tensor:
    """Approximate solution x [n] of A x = b [n] by `steps` conjugate-gradient steps from x = 0.

    matvec(v) = A v for a symmetric positive-definite A. Stops early when the squared residual
    norm falls below `tol` (exact in at most n steps in exact arithmetic). Safeguard for an A
    that is not positive definite (iMAML's I + H / lam away from a minimum of the inner problem):
    at a direction of non-positive curvature it stops with the current x, or returns b when that
    happens at the first step (the solution for H = 0), as truncated CG does.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r.dot(r)
    for i in range(steps):
        if rr <= tol:
            break
        ap = matvec(p)
        curvature = p.dot(ap)
        if curvature <= 0:
            return b.clone() if i == 0 else x
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def flatten(p: Mapping[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    """The tensors p[k] for k in keys as one vector [sum of numels]."""
    return torch.cat([p[k].reshape(-1) for k in keys])


def unflatten(v: torch.Tensor, like: Mapping[str, torch.Tensor], keys: list[str]) -> Params:
    """Inverse of `flatten`: a dict of tensors shaped like like[k]."""
    out, i = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = v[i:i + n].view_as(like[k])
        i += n
    return out


def autograd_grad(outputs: torch.Tensor | list[torch.Tensor], inputs: list[torch.Tensor],
                  grad_outputs: list[torch.Tensor] | None = None, create_graph: bool = False,
                  retain_graph: bool = False) -> list[torch.Tensor]:
    """torch.autograd.grad with zeros for inputs the outputs do not depend on (retain_graph: keep
    the graph for further products; results are detached unless create_graph)."""
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    used = [i for i, o in enumerate(outs) if o.requires_grad]
    gs = torch.autograd.grad([outs[i] for i in used], inputs,
                             None if grad_outputs is None else [grad_outputs[i] for i in used],
                             retain_graph=retain_graph or create_graph, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


def proximal_loss(loss_fn: LossFn, anchor: Mapping[str, torch.Tensor], lam: float) -> LossFn:
    """loss_fn(p, x, y) + (lam / 2) * sum_k ||p[k] - anchor[k]||^2 over the keys of `anchor`."""

    def loss(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        reg = sum(((p[k] - a) ** 2).sum() for k, a in anchor.items())
        return loss_fn(p, x, y) + 0.5 * lam * reg

    return loss


REGISTER = {"imaml": "IMAML"}

_IMAML_OMNIGLOT = dict(inner_lr=0.1, inner_steps=16, inner_steps_test=16, lam=2.0, lam_test=0.0, cg_steps=5,
                       meta_batch=32, outer_lr=1e-3, adam_eps=1e-3, hidden=64)
"""iMAML (GD) on Omniglot 5-way: the paper's Table 2 caption and the imaml_dev README replication command."""


@dataclass
class IMAML(GradientLearner):
    """iMAML with gradient descent on the proximal inner problem and CG implicit meta-gradients.

    inner_lr, inner_steps: gradient descent on L_support + lam/2 ||phi - theta||^2 at training;
    inner_steps_test, lam_test: the same at test (lam_test = 0: plain gradient descent);
    lam: proximal strength; cg_steps: conjugate-gradient steps for the meta-gradient;
    adam_eps: eps of the outer Adam (1e-3 in the reference code).
    """

    STEP_TRACE: ClassVar[bool] = True  # adaptation ends in one inner_loop call (test-time steps axis)
    PRESETS: ClassVar[Mapping[str, Preset]] = with_meta_dataset({
        key: Preset({**_IMAML_OMNIGLOT, **changes}, steps,
                    "Rajeswaran, Finn, Kakade, Levine. Meta-Learning with Implicit Gradients. NeurIPS 2019",
                    "aravindr93/imaml_dev", "examples/README.md (replication command), implicit_maml/learner_model.py",
                    "'iMAML, GD'; Table 2 caption: 16 / 25 inner gradient-descent steps for 5- / 20-way, lam 2.0, 5 CG "
                    "steps for the meta-gradient, Adam; README: inner lr 0.1, outer lr 1e-3, 32 tasks per "
                    "meta-batch, at least 20000 outer steps, accuracy measured with 16 steps at lam 0; "
                    "learner_model.py: Adam eps 1e-3. Our choices: 20-way test steps = train steps (25) and "
                    "meta-batch 32 as 5-way; miniImageNet (paper ran only the Hessian-free variant there): MAML's "
                    "miniImageNet inner lr 0.01, meta-batch 4, width 32, 60000 steps")
        for key, changes, steps in (("omniglot-5w", {}, 20000),
                                    ("omniglot-20w", dict(inner_steps=25, inner_steps_test=25), 20000),
                                    ("miniimagenet", dict(inner_lr=0.01, meta_batch=4, hidden=32), 60000))})

    meta_batch: int = 32
    inner_lr: float = 0.1
    inner_steps: int = 16
    inner_steps_test: int = 16
    lam: float = 2.0
    lam_test: float = 0.0
    cg_steps: int = 5
    adam_eps: float = 1e-3

    TAGS = Tags(bn_mode="transductive", order="second", transductive=True, variable_way=True, deterministic=True)
    PARALLEL_TASKS: ClassVar[bool] = True  # meta_gradient only reads self
    DROPBLOCK_TASKS: ClassVar[bool] = False  # its outer step sums implicit gradients itself (no task_loss)
    # conformance suite (bench/checks.py): fewer inner steps on its tiny synthetic problems
    CHECK_PARAMS = dict(inner_steps=5, inner_steps_test=5)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(self.meta.values()), lr=self.outer_lr, eps=self.adam_eps)

    def solve_inner(self, x: torch.Tensor, y: torch.Tensor, steps: int, lam: float) -> Params:
        """phi after `steps` detached gradient steps on L(phi; x [n, C, H, W], y [n]) + lam/2 ||phi - theta||^2."""
        anchor = {k: v.detach() for k, v in self.meta.items()}
        loss = proximal_loss(episode_loss(self.forward), anchor, lam)
        fast = inner_loop(loss, anchor, list(anchor), (x, y), steps, self.inner_lr, first_order=True)
        return {k: v.detach() for k, v in fast.items()}

    def implicit_gradient(self, phi: Params, support: tuple[torch.Tensor, torch.Tensor],
                          query: tuple[torch.Tensor, torch.Tensor]) -> Params:
        """(I + H / lam)^{-1} grad L_query(phi) by CG, H the support-loss Hessian at phi; shapes like phi.

        Plain autograd (double backward) rather than torch.func here: for the query gradient of
        Conv-4 on 75 images torch.func.grad held about twice the memory (182 vs 96 MiB measured).
        """
        keys = list(phi)
        leaves = [phi[k].detach().requires_grad_(True) for k in keys]
        p = dict(zip(keys, leaves))
        way = int(support[1].max()) + 1
        with torch.enable_grad():
            g_query = autograd_grad(F.cross_entropy(self.forward(p, query[0], way), query[1]), leaves)
            with higher_order():  # differentiated again by every Hessian-vector product
                support_loss = episode_loss(self.forward)(p, *support)
            g_support = autograd_grad(support_loss, leaves, create_graph=True)

        def matvec(v: torch.Tensor) -> torch.Tensor:  # v + H v / lam, H v by double backward
            hv = autograd_grad(g_support, leaves, list(unflatten(v, p, keys).values()), retain_graph=True)
            return v + flatten(dict(zip(keys, hv)), keys) / self.lam

        g = conjugate_gradient(matvec, flatten(dict(zip(keys, g_query)), keys), self.cg_steps)
        return unflatten(g, phi, keys)

    def meta_gradient(self, ep: Episode) -> Params:
        """The implicit meta-gradient of one task w.r.t. self.meta (detached, shapes like self.meta)."""
        phi = self.solve_inner(ep.support_x, ep.support_y, self.inner_steps, self.lam)
        return self.implicit_gradient(phi, (ep.support_x, ep.support_y), (ep.query_x, ep.query_y))

    def outer_step(self, batch: list[Episode]) -> None:
        """Mean implicit meta-gradient of the meta-batch, one Adam step (each task's inner solve and CG
        side by side on the task pool, summed in meta-batch order)."""
        def add(total: Params, task: Params) -> Params:
            for k, g in task.items():
                total[k] += g / len(batch)
            return total

        start = {k: torch.zeros_like(v) for k, v in self.meta.items()}
        total = (fold_tasks(self.meta_gradient, batch, add, start) if self.tasks_side_by_side
                 else functools.reduce(add, map(self.meta_gradient, batch), start))
        self.optimizer.zero_grad(set_to_none=True)
        for k, v in self.meta.items():
            v.grad = total[k]
        self.optimizer.step()

    def adapt_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return self.solve_inner(support_x, support_y, self.inner_steps_test, self.lam_test)

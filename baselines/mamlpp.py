"""MAML++ (Antoniou, Edwards, Storkey 2019, "How to train your MAML", ICLR 2019; reference code:
AntreasAntoniou/HowToTrainYourMAMLPytorch, few_shot_learning_system.py,
meta_neural_network_architectures.py, inner_loop_optimizers.py).

MAML on Conv-4 with the paper's fixes, each as in the reference code:

- Multi-step loss (MSL): the outer loss of a task is sum_k v_k * L_query(theta_k), the query loss
  after every inner step k, for the first `msl_epochs` epochs; afterwards only the last step's
  query loss. The weights v follow `get_per_step_loss_importance_vector` (`msl_weights` here):
  uniform 1/N at epoch 0; every epoch the non-final weights drop by 1/(N * msl_epochs) (floored at
  0.03/N) and the final weight gains what they lose, so they always sum to 1.
- Per-layer per-step learned inner learning rates (LSLR): one scalar per adapted parameter tensor
  and inner step, initialised to `inner_lr`, meta-learned. They live in the meta-parameter dict
  as "lr.<name>" [inner_steps] (like Meta-SGD's alphas), so they are saved, restored and optimized.
- Per-step batch-norm weights and biases (BNWB): "bn{i}.weight" / "bn{i}.bias" are [inner_steps,
  C]; the forward pass of inner step k (support loss of step k, and query loss after step k) uses
  row k; the prediction after the last step uses row N - 1. As in the reference
  (enable_inner_loop_optimizable_bn_params = false) the batch-norm parameters are meta-learned
  only; the inner loop adapts the conv and head parameters.
- Per-step batch-norm running statistics (BNRS): the reference keeps running mean/variance per
  step ([inner_steps, C], momentum 0.1) and updates them on every training forward pass, but its
  batch norm always calls F.batch_norm(..., training=True): it normalises with the statistics of
  the batch being predicted at training and at test, and the running statistics never enter a
  prediction (evaluation backs them up and restores them). Here likewise: the statistics are
  tracked in `bn_stats` (updated by fit's forward passes, saved in state_dict, never changed by
  adapt), and normalisation is transductive (Tags bn_mode "transductive").
  The tasks of a meta-batch run side by side (PARALLEL_TASKS): each task logs its statistics
  updates instead of applying them, and the logs are applied in meta-batch order once every
  task's gradient exists, so the statistics equal those of a task-by-task loop.
- Derivative-order annealing (DA): first-order meta-gradients (inner gradients detached) for the
  first `first_order_epochs` epochs, second order after (the reference's
  first_order_to_second_order_epoch E corresponds to first_order_epochs = E + 1).
- Cosine annealing of the outer learning rate (CA): Adam whose learning rate at epoch e is
  min_outer_lr + (outer_lr - min_outer_lr) * (1 + cos(pi * e / total_epochs)) / 2 (the closed form
  of CosineAnnealingLR(T_max=total_epochs, eta_min=min_outer_lr) stepped with the epoch, as the
  reference does); it stays at min_outer_lr past total_epochs. A function of the outer-step count,
  so it survives state_dict/load_state_dict exactly.

All schedules are in epochs of `epoch_steps` outer steps (the reference: 500 iterations per epoch;
epoch = outer steps done // epoch_steps, as its int(current_iter / total_iter_per_epoch)). A short
run can compress the whole protocol by setting `epoch_steps` = run steps / total_epochs.

Evaluation uses exactly `inner_steps` steps, the number it was trained with: the per-step learning
rates and batch-norm parameters exist only for those steps, so there is no separate test-time
step count. The test-time steps axis (`adapt_recorded`) records the same loop after every step and
continues it to 2 x inner_steps with the last step's learning rates and batch-norm row (our choice;
those steps have no learned parameters of their own); the prediction after s steps uses the row of
the last step taken. Adaptation at test is first order (the reference evaluates with use_second_order=False;
it makes no difference to the adapted weights).

Defaults per family (baselines/registry.py), from the released configs of the reference repo
(experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_{5,20}_0.json,
mini-imagenet_maml++-mini-imagenet_1_2_0.01_48_5_0.json): 5 inner steps, LSLR init 0.1 (Omniglot) /
0.01 (miniImageNet), meta-batch 8 / 2, Adam 1e-3 cosine-annealed to 1e-5 / 1e-3, 100 epochs x 500
steps, MSL for 10 / 15 epochs, Conv-4 64 / 48, meta-gradient clamp 10 on miniImageNet only, and
second order from the start (first_order_to_second_order_epoch = -1 in every released config; the
paper's text describes first order for the first 50 epochs and the README template uses epoch 80
of 150; we follow the released per-benchmark configs).

Differences from the reference, stated: the shared Conv-4 (conv 3x3 -> batch norm -> ReLU -> 2x2
max-pool, four times; the reference uses leaky ReLU and Xavier-initialised convs, otherwise the same
4-stage max-pool network) with the shared initialisation (core.conv4_init); the LSLR vectors have
inner_steps entries (the reference allocates one unused extra); the query set size is the
benchmark's. Gradient clamping to [-10, 10] of the meta-gradient (the reference does it for
ImageNet datasets only) is the `grad_clip` field.

Backbones: any; per-step batch-norm weights, biases and running statistics exist for every batch
norm of the backbone (MAMLpp.bn_stats keys "<bn>.running_mean"). The paper has no ResNet settings
(Conv-4 only).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from bench.api import Episode, Predictor, Preset, Tags, TaskInfo, with_meta_dataset
from baselines import fused
from baselines.backbones import layer_kind
from baselines.core import (BN_EPS, GradientLearner, Ops, Params, conv_layout, head_forward, record_steps,
                            step_curve)

LR_PREFIX = "lr."


class StepOps(Ops):
    """Layer operations of inner step `step`: batch norm with the batch-norm row `step` of every
    "<bn>.weight" / "<bn>.bias" [inner_steps, C], and with track=True the running statistics of that
    step updated through `learner.track_stats`.

    Unfused (the default): NCHW, batch norm by its explicit formula. With baselines/fused.py's switch on,
    Conv-4's blocks run its kernel with the step's row, channels-last (as the plain layer operations do);
    the kernel gives no statistics out, so tracking takes them from the block's input, detached.
    """

    def __init__(self, learner: "MAMLpp", step: int, track: bool) -> None:
        self.learner, self.step, self.track = learner, step, track

    def fuses(self) -> bool:
        return fused.enabled() and fused.available()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return conv_layout(x) if self.fuses() else x

    def bn_affine(self, p: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return p[name + ".weight"][self.step], p[name + ".bias"][self.step]

    def fused_block(self, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
        if self.track:
            with torch.no_grad():
                self.track_batch(name, x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False), x)
        return super().fused_block(p, name, x)

    def bn(self, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        if self.track:
            self.track_batch(name, mean, var, x)
        w, b = self.bn_affine(p, name)
        return (x - mean) * torch.rsqrt(var + BN_EPS) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

    def track_batch(self, name: str, mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor) -> None:
        """Log the batch statistics (mean, biased var; C values each) of x [N, C, H, W] for this step."""
        self.learner.track_stats(name, self.step, mean, var, x.numel() // x.shape[1])


def msl_weights(steps: int, msl_epochs: int, epoch: int) -> list[float]:
    """Per-step query-loss weights [steps] of the multi-step loss at `epoch` (they sum to 1).

    While epoch < msl_epochs: the reference's annealing from uniform towards the last step;
    from msl_epochs on: the last step only ([0, ..., 0, 1]).
    """
    if epoch >= msl_epochs:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    w = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    w.append(min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return w


def cosine_lr(base: float, minimum: float, epoch: int, total_epochs: int) -> float:
    """Cosine-annealed learning rate at `epoch` (held at `minimum` past total_epochs)."""
    e = min(epoch, total_epochs)
    return minimum + (base - minimum) * (1 + math.cos(math.pi * e / total_epochs)) / 2


REGISTER = {"mamlpp": "MAMLpp"}


@dataclass
class MAMLpp(GradientLearner):
    """MAML++ on Conv-4: MSL, LSLR, per-step BN weights and statistics, DA, cosine outer lr.

    inner_lr: initial value of every per-layer per-step inner learning rate;
    inner_steps: inner steps at training and at test (the per-step parameters exist only for these);
    epoch_steps: outer steps per epoch (the unit of every schedule below);
    total_epochs: length of the cosine schedule, outer_lr -> min_outer_lr;
    msl_epochs: epochs with the multi-step loss (then the last step's loss only);
    first_order_epochs: epochs of first-order meta-gradients before second order;
    bn_momentum: momentum of the tracked per-step running statistics;
    grad_clip: element-wise clamp of the meta-gradient (0 disables).
    Tags.order is "second" (the order of the meta-gradient once annealing is over) unless
    first_order_epochs >= total_epochs.
    """

    PRESETS: ClassVar[Mapping[str, Preset]] = with_meta_dataset({
        key: Preset(values, 50000, "Antoniou, Edwards, Storkey. How to train your MAML. ICLR 2019",
                    "AntreasAntoniou/HowToTrainYourMAMLPytorch", file,
                    "5 inner steps at train and test (evaluates with the steps it was trained with: per-step lrs and "
                    "BN exist only for those), LSLR init 0.1 / 0.01, meta-batch 8 / 2, Adam 1e-3 cosine-annealed to "
                    "1e-5 / 1e-3 over 100 epochs x 500 steps, multi-step loss for 10 / 15 epochs, second order "
                    "throughout (first_order_to_second_order_epoch -1; the paper's text uses first order for the "
                    "first 50 epochs, the README template for 81 of 150), Conv-4 64 / 48, meta-grad clamp 10 on "
                    "miniImageNet; shared Conv-4 with ReLU instead of leaky ReLU")
        for key, file, values in (
            *((k, "experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_{5,20}_0.json",
               dict(inner_lr=0.1, inner_steps=5, meta_batch=8, outer_lr=1e-3, min_outer_lr=1e-5, hidden=64,
                    epoch_steps=500, total_epochs=100, msl_epochs=10, first_order_epochs=0, grad_clip=0.0))
              for k in ("omniglot-5w", "omniglot-20w")),
            ("miniimagenet", "experiment_config/mini-imagenet_maml++-mini-imagenet_1_2_0.01_48_5_0.json",
             dict(inner_lr=0.01, inner_steps=5, meta_batch=2, outer_lr=1e-3, min_outer_lr=1e-3, hidden=48,
                  epoch_steps=500, total_epochs=100, msl_epochs=15, first_order_epochs=0, grad_clip=10.0)))})

    meta_batch: int = 8
    outer_lr: float = 1e-3
    min_outer_lr: float = 1e-5
    hidden: int = 64
    inner_lr: float = 0.1
    inner_steps: int = 5
    epoch_steps: int = 500
    total_epochs: int = 100
    msl_epochs: int = 10
    first_order_epochs: int = 0
    bn_momentum: float = 0.1
    grad_clip: float = 0.0

    PARALLEL_TASKS: ClassVar[bool] = True  # statistics updates are logged per task and applied in order
    _stats_logs: ClassVar[threading.local] = threading.local()

    @property
    def tags(self) -> Tags:
        order = "first" if self.first_order_epochs >= self.total_epochs else "second"
        return Tags(bn_mode="transductive", order=order, transductive=True, variable_way=True, deterministic=True)

    # --- construction and state ---------------------------------------------------------
    def setup(self, info: TaskInfo) -> "MAMLpp":
        for name in ("inner_steps", "epoch_steps", "total_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"MAMLpp: {name} must be >= 1, got {getattr(self, name)}")
        super().setup(info)
        self.bn_stats = {}
        for name in self.net.bn_layers():
            channels = self.meta[name + ".weight"].shape[1]
            device = self.meta[name + ".weight"].device
            self.bn_stats[f"{name}.running_mean"] = torch.zeros(self.inner_steps, channels, device=device)
            self.bn_stats[f"{name}.running_var"] = torch.ones(self.inner_steps, channels, device=device)
        return self

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """The backbone with per-step BN rows [inner_steps, C] and a learning-rate vector per adapted tensor."""
        net = super().init_meta(info, gen)
        s = self.inner_steps
        for k in net:
            if layer_kind(k) == "bn":
                net[k] = net[k].expand(s, -1).clone()
        lrs = {LR_PREFIX + k: torch.full((s,), float(self.inner_lr)) for k in net if layer_kind(k) != "bn"}
        return net | lrs

    def adapted_keys(self) -> list[str]:
        """The parameters the inner loop updates: convs and head (not batch norm, not the lrs)."""
        return [k for k in self.meta if not (k.startswith(LR_PREFIX) or layer_kind(k) == "bn")]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["bn_stats"] = {k: v.clone() for k, v in self.bn_stats.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> "MAMLpp":
        super().load_state_dict(state)
        for k, v in state["bn_stats"].items():
            self.bn_stats[k].copy_(v)
        return self

    # --- schedules (functions of the outer steps done) ---------------------------------
    @property
    def epoch(self) -> int:
        """The current epoch: outer steps done // epoch_steps."""
        return self.fit_steps // self.epoch_steps

    def loss_weights(self) -> list[float]:
        """Multi-step loss weights [inner_steps] of the current epoch."""
        return msl_weights(self.inner_steps, self.msl_epochs, self.epoch)

    def second_order(self) -> bool:
        """Whether the current epoch uses second-order meta-gradients (derivative-order annealing)."""
        return self.epoch >= self.first_order_epochs

    def current_outer_lr(self) -> float:
        """The cosine-annealed outer learning rate of the current epoch."""
        return cosine_lr(self.outer_lr, self.min_outer_lr, self.epoch, self.total_epochs)

    # --- the network --------------------------------------------------------------------
    def forward_step(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, step: int, way: int | None = None,
                     track: bool = False) -> torch.Tensor:
        """Logits [N, way] of the backbone `p` on x [N, C, H, W] with the batch-norm row of inner step `step`.

        Batch norm uses the batch statistics of x; with track=True they also update the running
        statistics of `step` (no effect on the output).
        """
        return head_forward(p, self.features(p, x, StepOps(self, step, track)), way)

    def track_stats(self, bn: str, step: int, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Running-statistics update of F.batch_norm (unbiased variance) for one batch norm and step;
        inside `training_loss` it is logged for that task and applied later (`backward_tasks`)."""
        log = getattr(self._stats_logs, "entries", None)
        if log is not None:
            log.append((bn, step, mean.detach(), var.detach(), n))
            return
        self.apply_stats(bn, step, mean, var, n)

    def apply_stats(self, bn: str, step: int, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Apply one running-statistics update (momentum `bn_momentum`) of batch norm `bn` at inner step `step`."""
        m = self.bn_momentum
        with torch.no_grad():
            rm, rv = self.bn_stats[f"{bn}.running_mean"], self.bn_stats[f"{bn}.running_var"]
            rm[step].mul_(1 - m).add_(m * mean.detach().flatten().to(rm.dtype))
            rv[step].mul_(1 - m).add_(m * var.detach().flatten().to(rv.dtype) * n / max(1, n - 1))

    def forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, way: int | None = None) -> torch.Tensor:
        """Prediction after the inner loop: the batch-norm row of the last inner step."""
        return self.forward_step(p, x, self.inner_steps - 1, way)

    # --- the inner loop -----------------------------------------------------------------
    def inner_update(self, p: Params, x: torch.Tensor, y: torch.Tensor, step: int, first_order: bool,
                     track: bool = False) -> Params:
        """One LSLR gradient step (inner step `step`) on the support set x [n, C, H, W], y [n]."""
        keys = self.adapted_keys()
        loss = F.cross_entropy(self.forward_step(p, x, step, int(y.max()) + 1, track), y)
        grads = torch.autograd.grad(loss, [p[k] for k in keys], create_graph=not first_order)
        fast = dict(p)
        for k, g in zip(keys, grads):
            fast[k] = p[k] - p[LR_PREFIX + k][step] * (g.detach() if first_order else g)
        return fast

    def task_loss(self, ep: Episode) -> torch.Tensor:
        """Multi-step outer loss of one task: sum_k v_k * query loss after inner step k."""
        first_order = not self.second_order()
        fast: Params = dict(self.meta)
        loss = self.meta["head.bias"].new_zeros(())
        for step, weight in enumerate(self.loss_weights()):
            fast = self.inner_update(fast, ep.support_x, ep.support_y, step, first_order, track=True)
            if weight > 0:
                logits = self.forward_step(fast, ep.query_x, step, ep.way, track=True)
                loss = loss + weight * F.cross_entropy(logits, ep.query_y)
        return loss

    def meta_grad_clamp(self) -> float:
        return self.grad_clip

    def training_loss(self, ep: Episode) -> torch.Tensor:
        """The task's outer loss; inside `backward_tasks` its statistics updates are logged (in this
        thread) and applied by it, elsewhere they are applied at once."""
        pending = getattr(self, "_pending", None)
        if pending is None:
            return super().training_loss(ep)
        log: list[tuple[str, int, torch.Tensor, torch.Tensor, int]] = []
        self._stats_logs.entries = log
        try:
            loss = super().training_loss(ep)
        finally:
            self._stats_logs.entries = None
        pending.setdefault(id(ep), []).append(log)
        return loss

    def backward_tasks(self, batch: list[Episode]) -> None:
        """The tasks' meta-gradients (side by side), then their statistics updates in meta-batch order."""
        self._pending: dict[int, list[list[tuple[str, int, torch.Tensor, torch.Tensor, int]]]] = {}
        try:
            super().backward_tasks(batch)
            for ep in batch:
                for entry in self._pending[id(ep)].pop(0):
                    self.apply_stats(*entry)
        finally:
            del self._pending

    def adapt_start(self) -> Params:
        """The (detached) meta-parameters adaptation starts from, the adapted keys requiring gradients."""
        keys = set(self.adapted_keys())
        return {k: v.detach().requires_grad_(k in keys) for k, v in self.meta.items()}

    def adapt_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        """Exactly `inner_steps` first-order LSLR steps from (detached) meta-parameters."""
        fast = self.adapt_start()
        for step in range(self.inner_steps):
            fast = self.inner_update(fast, support_x, support_y, step, first_order=True)
        return fast

    @staticmethod
    def row_after(steps: int, inner_steps: int) -> int:
        """The batch-norm row a prediction after `steps` inner steps uses: that of the last step taken
        (min(steps, inner_steps) - 1, as the multi-step loss's query loss after each step), row 0 before any."""
        return max(0, min(steps, inner_steps) - 1)

    def adapt_recorded(self, support_x: torch.Tensor, support_y: torch.Tensor,
                       upto: int) -> tuple[Predictor, dict[int, Predictor], float]:
        """The step curve, from adapt_params' own loop run on (`record_steps`). A step is one first-order LSLR
        step. Steps 1..inner_steps use their learned per-step lrs and batch-norm rows; beyond them there is no
        learned row, and steps inner_steps + 1..upto reuse the last step's lrs and row (the prediction after
        s steps uses the row of the last step taken, `row_after`; step 0 predicts with row 0 unadapted)."""
        n, way = self.inner_steps, int(support_y.max()) + 1

        def step(fast: Params, s: int) -> Params:
            return self.inner_update(fast, support_x, support_y, min(s, n - 1), first_order=True)

        def make(fast: Params, s: int) -> Predictor:
            fast = {k: v.detach() for k, v in fast.items()}
            if s == n:  # exactly adapt's predictor
                return self.predictor(fast, way)

            def predict(query_x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return self.forward_step(fast, query_x, self.row_after(s, n), way)

            return predict

        states, extra = record_steps(step, self.adapt_start(), n, upto)
        main, curve = step_curve(states, n, make)
        return main, curve, extra

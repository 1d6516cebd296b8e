"""`scale-shift`: meta-transfer learning with scaling and shifting (Sun, Liu, Chua, Schiele 2019,
"Meta-Transfer Learning for Few-Shot Learning", CVPR 2019; MTL's SS operations, without its
hard-task meta-batch).

Two phases in one `fit` stream:

1. the first `pretrain_steps` outer steps pre-train Conv-4 with a linear classifier over all
   training classes (`finetune`'s supervised pre-training, baselines.finetune.pretraining_loss,
   `pretrain_batch` episodes per step) with the reference's optimizer: SGD, Nesterov momentum
   0.9, weight decay 5e-4, lr 0.1 x0.2 every 30 epochs;
2. the remaining steps freeze the pre-trained body (conv and batch-norm parameters) and
   meta-learn, per conv layer, a scale Phi_S1 (init 1) and a shift Phi_S2 (init 0) applied to
   its weights and bias, conv(x; W * Phi_S1, b + Phi_S2), plus the initialisation of a fresh
   linear head (the base-learner). The inner loop adapts only the head (`inner_steps` SGD steps
   of `inner_lr` on the support features); the outer loop (Adam, SS lr `outer_lr`, head lr
   `head_lr`, both x`meta_lr_decay` every `meta_lr_decay_every` phase-2 steps) updates SS and
   the head init with the query loss of the adapted head (paper Eqs. 4-5).

Phi_S1 has one number per 3x3 kernel, shape [c_out, c_in, 1, 1], and Phi_S2 one per output
channel, as in both reference implementations (yaoyao-liu/meta-transfer-learning: PyTorch
models/conv2d_mtl.py mtl_weight / mtl_bias; TensorFlow resnet12.py ss_weights [1, 1, c_in, c_out]).
Both phases keep their own optimizer in the state_dict, and the phase depends only on the step
counter, so fit(a) + fit(b) equals fit(a + b) across the phase boundary.

With batch norm (batch statistics) right after every conv, the shift and any factor common to all
scales of an output channel are normalised away, exactly as in the reference TF code (conv + bias
+ shift, then batch norm in training mode; the PyTorch code's convs have no bias, hence no shift):
what phase 2 learns is the relative weighting of each conv's input channels, and the head init.

Differences, stated: the paper's ResNet-12 is replaced by our Conv-4 in the presets but
`miniimagenet-resnet12` (batch norm on the statistics of the batch being predicted; every conv of a
ResNet, shortcuts included, gets its own scale and shift); the pre-training classifier is linear (the TF code's;
the PyTorch code uses a 640-1000-classes MLP); batch-norm parameters stay frozen in phase 2 (the
paper's Theta; the PyTorch code's optimizer also updates them); the meta-gradient is second order
through the head's inner loop (the TF code's tf.gradients; the PyTorch code detaches the inner
gradients: `first_order=True`); no hard-task (HT) meta-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F

from bench.api import Episode, Preset, TaskInfo
from baselines.core import HEAD_KEYS, PLAIN, Ops, Params, episode_loss, head_forward, inner_loop, step_decay
from baselines.finetune import pretraining_loss
from baselines.maml import MAML

CONV4_LAYERS = tuple(f"conv{i}" for i in range(4))


def body_keys(p: Mapping[str, torch.Tensor]) -> list[str]:
    """The backbone body's parameters (conv and batch norm): pre-trained in phase 1, frozen in phase 2."""
    return [k for k in p if not k.startswith(("ss", "pre.", "head."))]


def ss_keys(p: Mapping[str, torch.Tensor]) -> list[str]:
    """The scaling and shifting parameters (meta-learned in phase 2)."""
    return [k for k in p if k.startswith("ss")]


def scale_shift(p: Mapping[str, torch.Tensor], convs: Sequence[str] = CONV4_LAYERS) -> Params:
    """The body with its j-th conv (of `convs`, the backbone's in order) modulated: weight * ss{j}.scale
    [c_out, c_in, 1, 1], bias + ss{j}.shift [c_out] (the shift alone for a conv without bias)."""
    out = dict(p)
    for j, conv in enumerate(convs):
        out[f"{conv}.weight"] = p[f"{conv}.weight"] * p[f"ss{j}.scale"]
        bias = p.get(f"{conv}.bias")
        out[f"{conv}.bias"] = p[f"ss{j}.shift"] if bias is None else bias + p[f"ss{j}.shift"]
    return out


REGISTER = {"scale-shift": "ScaleShift"}


@dataclass
class ScaleShift(MAML):
    """Pre-train (phase 1), then meta-learn scale/shift and the head init on the frozen body (phase 2).

    Phase 2: inner_lr / inner_steps / inner_steps_test: the head's inner SGD loop; meta_batch:
    tasks per outer update; outer_lr: Adam lr of SS; head_lr: Adam lr of the head init;
    meta_lr_decay, meta_lr_decay_every: their step decay (in phase-2 steps).
    Phase 1: pretrain_steps: outer steps of pre-training (the split); pretrain_batch: episodes
    per pre-training step; pretrain_lr, pretrain_momentum (Nesterov), pretrain_weight_decay,
    pretrain_lr_decay, pretrain_lr_decay_every: its SGD.
    """

    STEP_TRACE: ClassVar[bool] = True  # adaptation ends in one inner_loop call (test-time steps axis)
    PARALLEL_TASKS: ClassVar[bool] = True
    PRESETS: ClassVar[Mapping[str, Preset]] = {
        "*": Preset(dict(meta_batch=1, outer_lr=1e-4, head_lr=1e-3, inner_lr=0.01, inner_steps=50, inner_steps_test=50,
                         meta_lr_decay=0.5, meta_lr_decay_every=1000, pretrain_steps=30000, pretrain_batch=2,
                         pretrain_lr=0.1, pretrain_momentum=0.9, pretrain_weight_decay=5e-4, pretrain_lr_decay=0.2,
                         pretrain_lr_decay_every=9000, hidden=64, first_order=False), 40000,
                    "Sun, Liu, Chua, Schiele. Meta-Transfer Learning for Few-Shot Learning. CVPR 2019",
                    "yaoyao-liu/meta-transfer-learning", "pytorch/main.py (defaults)",
                    "scaling and shifting without the hard-task meta-batch: inner lr 0.01, 50 steps at train and "
                    "test, Adam 1e-4 for SS and 1e-3 for the head, x0.5 every 10 epochs of 100 tasks (1000 updates), "
                    "one task per update, 100 epochs (10000 updates); pre-training SGD lr 0.1, Nesterov momentum 0.9, "
                    "weight decay 5e-4, x0.2 every 30 epochs, 100 epochs of batch 128 over miniImageNet's 38400 "
                    "images = 30000 iterations, here 2 episodes (160 images at 5w1s) per step: 30000 steps, decay "
                    "every 9000; second order as the paper's TF code; its ResNet-12 replaced by Conv-4 64, our "
                    "choice; Omniglot is not in the paper: the same settings, our choice"),
        "miniimagenet-resnet12": Preset(
            dict(backbone="resnet12", widths="64-128-256-512", meta_batch=2, outer_lr=1e-3, head_lr=1e-3,
                 inner_lr=0.01, inner_steps=20, inner_steps_test=100, meta_lr_decay=0.5, meta_lr_decay_every=1000,
                 pretrain_steps=30000, pretrain_batch=2, pretrain_lr=0.1, pretrain_momentum=0.9,
                 pretrain_weight_decay=5e-4, pretrain_lr_decay=0.2, pretrain_lr_decay_every=9000, first_order=False),
            50000, "Sun, Liu, Chua, Schiele. Meta-Transfer Learning for Few-Shot Learning. CVPR 2019",
            "yaoyao-liu/meta-transfer-learning", "tensorflow/models/resnet12.py, run_experiment.py, tensorflow/main.py",
            "the paper's ResNet-12 (4 residual blocks of three 3x3 convs and a 1x1 shortcut, 64-128-256-512, leaky "
            "ReLU, 2x2 max-pool, average-pooled) as our resnet12 at those widths; phase 2 from the TF code: 2 tasks "
            "per update, inner lr 0.01, 20 inner steps at train and 100 at test, Adam 1e-3 for SS and head x0.5 "
            "every 1000 updates (its floor of 1e-4 not taken over), 20000 updates, second order (tf.gradients); "
            "phase 1 as the '*' preset (the PyTorch code's SGD pre-training, 30000 steps; the TF code pre-trains "
            "with Adam 1e-3, batch 64); differences: our convs have no bias and the shortcut has batch norm and its "
            "own scale/shift (the TF code scales the three 3x3 convs only)"),
    }

    meta_batch: int = 1
    outer_lr: float = 1e-4
    head_lr: float = 1e-3
    inner_lr: float = 0.01
    inner_steps: int = 50
    inner_steps_test: int = 50
    meta_lr_decay: float = 0.5
    meta_lr_decay_every: int = 1000
    pretrain_steps: int = 30000
    pretrain_batch: int = 2
    pretrain_lr: float = 0.1
    pretrain_momentum: float = 0.9
    pretrain_weight_decay: float = 5e-4
    pretrain_lr_decay: float = 0.2
    pretrain_lr_decay_every: int = 9000

    # conformance suite (bench/checks.py): the paper's 50 test steps (cheap: head only), a phase
    # boundary after 2 steps so the resume checks (fit(2) + fit(1)) cross it, and the checks' 10x
    # outer learning rate for the head too
    CHECK_PARAMS = dict(inner_steps_test=50, pretrain_steps=2, head_lr=0.01)

    # --- parameters ---------------------------------------------------------------------
    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """The backbone with the pre-training classifier `pre.*` [n_classes, feat], SS at identity
        (scale 1 [c_out, c_in, 1, 1], shift 0 [c_out] for the j-th conv) and the head init [max_way, feat]
        (Kaiming-normal weight, zero bias, as the reference base-learner)."""
        p = self.init_net(info, gen, info.n_classes)
        p["pre.weight"], p["pre.bias"] = p.pop("head.weight"), p.pop("head.bias")
        for j, conv in enumerate(self.net.conv_layers()):
            w = p[f"{conv}.weight"]
            p[f"ss{j}.scale"] = torch.ones(w.shape[0], w.shape[1], 1, 1)
            p[f"ss{j}.shift"] = torch.zeros(w.shape[0])
        feat = p["pre.weight"].shape[1]
        p["head.weight"] = torch.randn(info.max_way, feat, generator=gen) * math.sqrt(2.0 / feat)
        p["head.bias"] = torch.zeros(info.max_way)
        return p

    def setup(self, info: TaskInfo) -> "ScaleShift":
        super().setup(info)
        self.meta_optimizer = torch.optim.Adam([
            {"params": [self.meta[k] for k in ss_keys(self.meta)], "lr": self.outer_lr},
            {"params": [self.meta[k] for k in HEAD_KEYS], "lr": self.head_lr}])
        return self

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Phase 1: SGD with Nesterov momentum and weight decay on the body and the pre-training classifier."""
        params = [self.meta[k] for k in body_keys(self.meta)] + [self.meta["pre.weight"], self.meta["pre.bias"]]
        return torch.optim.SGD(params, lr=self.pretrain_lr, momentum=self.pretrain_momentum, nesterov=True,
                               weight_decay=self.pretrain_weight_decay)

    # --- the two networks ---------------------------------------------------------------
    def pretrain_forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Phase 1: logits [N, n_classes] of the plain body and the pre-training classifier."""
        return F.linear(self.net.features(p, x), p["pre.weight"], p["pre.bias"])

    def features(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, ops: Ops = PLAIN) -> torch.Tensor:
        """Features [N, feat] of the scaled-and-shifted body."""
        return self.net.features(scale_shift(p, self.net.conv_layers()), x, ops)

    def forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, way: int | None = None) -> torch.Tensor:
        """Logits [N, way] of the scaled-and-shifted body and the head."""
        return head_forward(p, self.features(p, x), way)

    # --- training -----------------------------------------------------------------------
    def pretraining(self) -> bool:
        """True while the next outer step belongs to phase 1."""
        return self.fit_steps < self.pretrain_steps

    def episodes_per_step(self) -> int:
        return self.pretrain_batch if self.pretraining() else self.meta_batch

    def inner(self, x: torch.Tensor, y: torch.Tensor, steps: int, first_order: bool) -> Params:
        """The body frozen (detached), SS and the head init from the meta-parameters; `steps` SGD
        steps on the head over the support features (computed once: only the head adapts)."""
        start = {k: (v.detach() if k in body_keys(self.meta) else v) for k, v in self.meta.items()}
        feats = self.features(start, x)
        return inner_loop(episode_loss(head_forward), start, list(HEAD_KEYS), (feats, y), steps, self.inner_lr,
                          first_order)

    def task_loss(self, ep: Episode) -> torch.Tensor:
        if self.pretraining():
            return pretraining_loss(self.pretrain_forward, self.meta, ep)
        return super().task_loss(ep)

    def outer_step(self, batch: list[Episode]) -> None:
        """A phase-1 SGD step or a phase-2 Adam step, each with its step-decayed learning rates."""
        if self.pretraining():
            opt = self.optimizer
            lrs = [step_decay(self.pretrain_lr, self.pretrain_lr_decay, self.pretrain_lr_decay_every, self.fit_steps)]
        else:
            opt, step = self.meta_optimizer, self.fit_steps - self.pretrain_steps
            lrs = [step_decay(lr, self.meta_lr_decay, self.meta_lr_decay_every, step)
                   for lr in (self.outer_lr, self.head_lr)]
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        self.backward_tasks(batch)
        opt.step()

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> "ScaleShift":
        super().load_state_dict(state)
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        return self

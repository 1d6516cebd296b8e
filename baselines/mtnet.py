"""`mt-net`: MT-nets (Lee & Choi, "Gradient-Based Meta-Learning with Learned Layerwise Metric and
Subspace", ICML 2018).

MAML on a network where every layer's weights W are followed by a meta-learned transformation
T, and the inner loop updates only the rows of W that a learned binary mask M selects:

- each conv block is conv(x; W, b) -> 1x1 conv with T [C, C] (identity init) -> batch norm ->
  ReLU -> 2x2 max-pool, and the head is logits = T_head (W_head h + b_head), T_head [way, way]
  (identity init; a variable-way episode uses its top-left block). T, like the batch-norm
  parameters, is meta-learned in the outer loop only: the inner loop never changes it, so T
  shapes the metric in which the inner gradient steps of W are taken (the paper's layerwise
  metric);
- M has one entry per output channel of each conv (and per output of the head), shared by that
  row's weights and its bias (the reference's share_M=True, the setting of all its experiments):
  the inner step is W <- W - inner_lr * M * grad, so rows with M = 0 stay at their meta-learned
  values (the paper's subspace). M is drawn once per task from Bernoulli(sigmoid(zeta)) with
  meta-learned logits zeta (init `logit_init`), through a Gumbel-softmax over the two outcomes
  at `temperature` with the straight-through estimator: the forward pass uses the hard 0/1
  sample, the meta-gradient of zeta flows through the relaxed one (make_shared_mask in the
  reference's maml.py);
- second order (the reference's default, stop_grad=False); outer Adam; the reference clips
  miniImageNet meta-gradients to [-10, 10] (`grad_clip`).

What follows yoonholee/MT-net (maml.py, main.py, experiments/omniglot.sh, miniimagenet.sh):
the structure above, inner lr 0.4 / 0.1 and one inner step on Omniglot 5- / 20-way with
meta-batch 32 / 16, lr 0.01 and 5 steps with meta-batch 4 and 32 filters on miniImageNet, 10
steps at test, Adam 1e-3, 40000 / 60000 outer steps, temperature 1, logit init 0. The adapted
weights are the convs' and the head's weights and biases (batch norm lives outside the
reference's adapted weight dict, so it is meta-learned only, like T).

Our choices, stated: the shared Conv-4 (2x2 max-pool after every block and a flattened head:
the reference's miniImageNet network, also for Omniglot, where the reference uses strided
convs and a spatial mean), with the shared Conv-4 initialisation and its batch norm (scale and
shift; the reference's tf.contrib batch norm learns a shift only); the mask of a meta-training
task is drawn from a generator seeded by (seed, outer step, episode index), so tasks can run
side by side and a run resumes exactly; at test the reference samples masks as well, and here
each adaptation draws them from a generator seeded by (seed, the support set's content), so
adapting to the same support set is repeatable and different test episodes get independent
masks.

Backbones: any; T and M on every convolution of the backbone (ResNets: the shortcut convolutions
too; their convolutions have no bias, so only weights adapt) and on the head. No ResNet settings in
the paper.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F

from bench.api import Episode, Preset, TaskInfo, new_generator, with_meta_dataset
from baselines.core import Ops, Params, episode_loss, head_forward, inner_loop
from baselines.maml import MAML

REGISTER = {"mt-net": "MTNet"}

LAYERS = ("conv0", "conv1", "conv2", "conv3", "head")
"""Conv-4's layers with a transformation T.<layer> and mask logits M.<layer> (one per output row);
on another backbone, every conv of the body and the head (MTNet.layers)."""
ADAPTED = tuple(f"{layer}.{part}" for layer in LAYERS for part in ("weight", "bias"))
"""Conv-4's inner-loop parameters: the layers' W and b (never T, M or batch norm)."""
MASK_SALT = 4


class TransformOps(Ops):
    """The plain layer operations with each conv followed by its 1x1 transformation T.<conv> [C, C]."""

    def conv(self, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, stride: int = 1,
             padding: int = 1) -> torch.Tensor:
        return F.conv2d(super().conv(p, name, x, stride, padding), p[f"T.{name}"][:, :, None, None])


TRANSFORM = TransformOps()

_LEE = "Lee, Choi. Gradient-Based Meta-Learning with Learned Layerwise Metric and Subspace. ICML 2018"


def straight_through_mask(logits: torch.Tensor, gen: torch.Generator, temperature: float) -> torch.Tensor:
    """A binary mask [r] ~ Bernoulli(sigmoid(logits [r])): the Gumbel-max sample of the two outcomes
    (update: logit, keep: 0) in the forward pass, the gradient of their Gumbel-softmax at `temperature`
    (straight-through); gumbel noise -log(-log(U + 1e-20) + 1e-20), U [r, 2] from `gen`."""
    u = torch.rand((*logits.shape, 2), generator=gen, dtype=logits.dtype).to(logits.device)
    gumbel = -torch.log(-torch.log(u + 1e-20) + 1e-20)
    soft = torch.softmax((torch.stack([logits, torch.zeros_like(logits)], dim=-1) + gumbel) / temperature, dim=-1)
    hard = (soft == soft.max(dim=-1, keepdim=True).values).to(soft.dtype)
    return ((hard - soft).detach() + soft)[..., 0]


def support_seed(support_x: torch.Tensor, support_y: torch.Tensor) -> int:
    """A 32-bit digest of a support set's content (its images' bytes and labels)."""
    data = support_x.detach().cpu().contiguous().numpy().tobytes()
    return zlib.crc32(support_y.cpu().numpy().tobytes(), zlib.crc32(data))


@dataclass
class MTNet(MAML):
    """MAML with meta-learned layerwise transformations T and sampled masks M over the rows updated.

    inner_lr, inner_steps, inner_steps_test, first_order: MAML's; temperature: the Gumbel-softmax
    temperature of the masks; logit_init: the initial mask logit (0: each row updates with
    probability 1/2); grad_clip: element-wise meta-gradient clamp (0: none).
    """

    temperature: float = 1.0
    logit_init: float = 0.0
    grad_clip: float = 0.0

    STEP_TRACE: ClassVar[bool] = True  # adaptation ends in one inner_loop call (test-time steps axis)
    PARALLEL_TASKS: ClassVar[bool] = True  # task_loss only reads self (per-task generators)
    TASK_BATCHED: ClassVar[bool] = False  # its per-task computation is not MAML's (T, masks)
    PRESETS: ClassVar[Mapping[str, Preset]] = with_meta_dataset({
        "omniglot-5w": Preset(dict(inner_lr=0.4, inner_steps=1, inner_steps_test=10, meta_batch=32, outer_lr=1e-3,
                                   hidden=64, temperature=1.0, logit_init=0.0, grad_clip=0.0), 40000, _LEE,
                              "yoonholee/MT-net", "experiments/omniglot.sh; main.py (defaults)",
                              "share_M, use_T, use_M; 10 test steps, Adam 1e-3, temperature 1, logit init 0 (main.py "
                              "defaults); Conv-4 with max-pool (the reference's Omniglot net is strided), our choice"),
        "omniglot-20w": Preset(dict(inner_lr=0.1, inner_steps=1, inner_steps_test=10, meta_batch=16, outer_lr=1e-3,
                                    hidden=64, temperature=1.0, logit_init=0.0, grad_clip=0.0), 40000, _LEE,
                               "yoonholee/MT-net", "experiments/omniglot.sh; main.py (defaults)",
                               "share_M, use_T, use_M; one inner step (MAML's 20-way uses 5); 10 test steps, Adam "
                               "1e-3, temperature 1, logit init 0; Conv-4 with max-pool, our choice"),
        "miniimagenet": Preset(dict(inner_lr=0.01, inner_steps=5, inner_steps_test=10, meta_batch=4, outer_lr=1e-3,
                                    hidden=32, temperature=1.0, logit_init=0.0, grad_clip=10.0), 60000, _LEE,
                               "yoonholee/MT-net", "experiments/miniimagenet.sh; main.py; maml.py",
                               "share_M, use_T, use_M, max_pool, 32 filters; meta-gradient clipped to [-10, 10] "
                               "(maml.py); 10 test steps, Adam 1e-3, temperature 1, logit init 0"),
    })

    # --- parameters ---------------------------------------------------------------------
    def layers(self) -> list[str]:
        """The layers with a transformation and a mask: every conv of the backbone's body, then the head."""
        return [*self.net.conv_layers(), "head"]

    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """The backbone (MAML's init) plus T.<layer> = I [r, r] and M.<layer> = logit_init [r], r = the
        layer's output rows (its filters for convs, max_way for the head)."""
        p = super().init_meta(info, gen)
        for layer in self.layers():
            rows = p[f"{layer}.weight"].shape[0]
            p[f"T.{layer}"] = torch.eye(rows)
            p[f"M.{layer}"] = torch.full((rows,), self.logit_init)
        return p

    def forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, way: int | None = None) -> torch.Tensor:
        """Logits [N, way]: the backbone with every conv followed by T (1x1), then T_head (W h + b)."""
        t = p["T.head"] if way is None else p["T.head"][:way, :way]
        return F.linear(head_forward(p, self.features(p, x, TRANSFORM), way), t)

    def adapted_keys(self) -> list[str]:
        return [f"{layer}.{part}" for layer in self.layers() for part in ("weight", "bias")
                if f"{layer}.{part}" in self.meta]

    # --- masks and the inner loop ------------------------------------------------------------
    def masked_lrs(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-key inner learning rates inner_lr * M: one mask per layer drawn from `gen` (in LAYERS order),
        broadcast over each row's weights ([r, 1, 1, 1] conv, [r, 1] head) and bias [r]."""
        lrs = {}
        for layer in self.layers():
            m = self.inner_lr * straight_through_mask(self.meta[f"M.{layer}"], gen, self.temperature)
            w = self.meta[f"{layer}.weight"]
            lrs[f"{layer}.weight"] = m.view(-1, *([1] * (w.dim() - 1)))
            if f"{layer}.bias" in self.meta:  # (the ResNets' convs have none)
                lrs[f"{layer}.bias"] = m
        return lrs

    def masked_inner(self, support: tuple[torch.Tensor, torch.Tensor], steps: int, first_order: bool,
                     gen: torch.Generator) -> Params:
        """`steps` masked inner steps on support (x [n, C, H, W], y [n]) from the meta-parameters."""
        return inner_loop(episode_loss(self.forward), self.meta, self.adapted_keys(), support, steps,
                          self.masked_lrs(gen), first_order)

    def task_generator(self, ep: Episode) -> torch.Generator:
        """The generator of one meta-training task's masks: seeded by (seed, outer step, episode index)."""
        return new_generator(self.seed, MASK_SALT, self.fit_steps, ep.index)

    def task_loss(self, ep: Episode) -> torch.Tensor:
        fast = self.masked_inner((ep.support_x, ep.support_y), self.inner_steps, self.first_order,
                                 self.task_generator(ep))
        return F.cross_entropy(self.forward(fast, ep.query_x, ep.way), ep.query_y)

    def adapt_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        gen = new_generator(self.seed, MASK_SALT, support_seed(support_x, support_y))
        return self.masked_inner((support_x, support_y), self.inner_steps_test, True, gen)

    def meta_grad_clamp(self) -> float:
        """The reference's element-wise meta-gradient clamp (miniImageNet)."""
        return self.grad_clip

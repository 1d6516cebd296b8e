"""Backbones as pure functions of a parameter dict: Conv-4, ResNet-12 and ResNet-18.

Every gradient method takes its network from here (GradientLearner's `backbone` and `widths`
hyperparameters, `--set backbone=resnet12 --set widths=32-64-128-256`). A backbone is an
initialiser `init(gen, in_channels, n_out, image_size) -> params` (every random draw from the
given torch.Generator) and a forward pass `features(params, x, ops) -> [N, feat]`, followed by
the shared linear head (core.head_forward). The forward passes are written in `core.Ops`, the
three layer operations a method or a fast path may substitute (task-batched grouped convolutions,
MAML++'s per-step batch norm, CAVIA's FiLM, MT-nets' transformations): so the inner loop,
second-order meta-gradients and every method's own change of the network work on each backbone.

Naming (what methods rely on): a parameter key is "<layer>.<weight|bias>"; a layer whose last
name component starts with "conv" is a convolution, with "bn" a batch norm; the head is
"head.weight" [n_out, feat], "head.bias" [n_out].

- `conv4`: conv 3x3 (with bias) -> batch norm -> ReLU -> 2x2 max-pool, four times, flattened
  (core.conv4_init / conv4_features; `hidden` filters in every block; feat = hidden * (size // 16)^2).
- `resnet12`: ResNet-12 as in MetaOptNet (Lee, Maji, Ravichandran, Soatto 2019, "Meta-Learning
  with Differentiable Convex Optimization", CVPR 2019; kjunelee/MetaOptNet models/ResNet12_embedding.py):
  four residual blocks, each three 3x3 convs (no bias) with batch norm, leaky ReLU (slope 0.1)
  after the first two and after the residual sum, a 1x1 conv + batch-norm shortcut, then 2x2
  max-pool; widths 64-160-320-640; convs Kaiming-normal (fan_out), batch norm 1 / 0. Optional
  DropBlock (`dropblock` = the drop rate; 0, off, by default): as MetaOptNet, dropout at that
  rate after blocks 1-2 and DropBlock (block size 5, clipped to the feature map) after blocks 3-4,
  only in meta-training forward passes, with every random draw from the method's own generator
  of the task (GradientLearner.training_loss). Differences, stated: global average pooling before
  the head (MetaOptNet's miniImageNet embedding flattens 640x5x5); a constant drop rate (MetaOptNet
  ramps DropBlock's keep rate linearly over its first 40,000 forward passes).
  Needs images of at least 16 px (four 2x2 pools).
- `resnet18`: ResNet-18 as in Meta-Dataset's learners (Triantafillou et al. 2020;
  google-research/meta-dataset learn/backbones.py `resnet`): 7x7 stride-2 conv (64) with batch
  norm and ReLU, 3x3 stride-2 max-pool, four stages of two basic blocks (3x3 conv, batch norm,
  ReLU, 3x3 conv, batch norm, plus the identity or a 1x1 conv + batch-norm shortcut where the
  shape changes, then ReLU) of widths 64-128-256-512 with stride 2 in the first block of stages
  2-4, global average pooling; convs without bias, Kaiming-normal (fan_out). The paper feeds it
  126 px images. Difference, stated: symmetric padding (TF's "SAME" pads stride-2 layers unevenly).

Where an activation is followed by max-pooling (all three), the pooling runs first: max and a
monotone activation commute, and the gradients route through the same maxima, so values and
gradients of every order are bitwise those of the order written above (tests/test_core.py).

Batch norm everywhere uses the statistics of the batch being predicted (no running statistics:
Tags bn_mode "transductive", as the shared Conv-4), through core.batch_norm; Reptile's inductive
prediction (support plus one query) works on each backbone unchanged.
"""

from __future__ import annotations

import contextvars
import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F

from bench.errors import MetabenchError
from baselines.core import PLAIN, Ops, Params, conv4_features, conv4_init, head_init, max_pool2

STANDARD_WIDTHS = {"resnet12": (64, 160, 320, 640), "resnet18": (64, 128, 256, 512)}
"""The published widths of each ResNet (`widths=""` selects them)."""
BACKBONES = ("conv4", *STANDARD_WIDTHS)
DROP_BLOCK_SIZE = 5  # MetaOptNet's miniImageNet dropblock_size
LEAKY_SLOPE = 0.1

_DROP: contextvars.ContextVar = contextvars.ContextVar("metabench_drop", default=None)


@contextmanager
def dropping(rate: float, gen: torch.Generator) -> Iterator[None]:
    """Forward passes inside draw ResNet-12's dropout/DropBlock masks at `rate` from `gen` (training).

    Outside, the backbone is deterministic (adaptation and prediction). A context variable, so
    tasks on worker threads each use their own generator."""
    token = _DROP.set((rate, gen))
    try:
        yield
    finally:
        _DROP.reset(token)


def dropout(x: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Inverted dropout of x with its keep mask drawn from `gen`."""
    keep = (torch.rand(x.shape, generator=gen, dtype=x.dtype) >= rate).to(x.dtype).to(x.device)
    return x * keep / (1 - rate)


def drop_block(x: torch.Tensor, rate: float, size: int, gen: torch.Generator) -> torch.Tensor:
    """DropBlock (Ghiasi, Lin, Le 2018) of x [N, C, H, W] as MetaOptNet's: block seeds
    ~ Bernoulli(gamma) on the (H - s + 1) x (W - s + 1) grid, gamma = rate / s^2 * H W / ((H - s + 1)(W - s + 1)),
    each seed zeroes an s x s block; the kept values are rescaled by (number of values / number kept)."""
    n, c, h, w = x.shape
    s = min(size, h, w)
    gamma = rate / s**2 * h * w / ((h - s + 1) * (w - s + 1))
    seeds = (torch.rand(n, c, h - s + 1, w - s + 1, generator=gen, dtype=x.dtype) < gamma).to(x.dtype).to(x.device)
    mask = 1 - F.max_pool2d(F.pad(seeds, (s - 1,) * 4), s, stride=1)
    return x * mask * (mask.numel() / mask.sum().clamp(min=1.0))


def kaiming_normal(gen: torch.Generator, c_out: int, c_in: int, k: int) -> torch.Tensor:
    """A conv weight [c_out, c_in, k, k] ~ N(0, 2 / (c_out k^2)) (torch's kaiming_normal_, mode fan_out)."""
    return torch.randn(c_out, c_in, k, k, generator=gen) * math.sqrt(2.0 / (c_out * k * k))


@dataclass(frozen=True)
class Backbone:
    """A backbone of given widths (one per block or stage); `get_backbone` builds them from hyperparameters."""

    name: str
    widths: tuple[int, ...]

    @property
    def label(self) -> str:
        """The name protocol cards show: "conv4-64", "resnet12-64-160-320-640"."""
        if self.name == "conv4":
            return f"conv4-{self.widths[0]}"
        return "-".join([self.name, *map(str, self.widths)])

    @property
    def pool_tasks(self) -> bool:
        """Whether the tasks of a meta-batch should run side by side on the task pool (baselines/parallel.py).

        Conv-4 tasks are too small to keep torch's intra-op threads busy, so whole tasks side by side win.
        A ResNet task is not: on miniImageNet 5-way 1-shot (ResNet-12 64-160-320-640, first-order MAML,
        meta-batch 4, 2 cores) one task at a time on both threads took 41.0 s per meta-iteration and 3.5 GB
        against 44.9 s and 7.0 GB for two single-threaded tasks at once (`metabench perf`). ResNets
        therefore run their tasks one after another (the same sums in the same order)."""
        return self.name == "conv4"

    def layers(self) -> list[tuple[str, int, int, int]]:
        """(conv layer, c_in, c_out, kernel) of the body in init order (c_in 0: the image's channels);
        each conv is followed by the batch norm of the same prefix with "conv" -> "bn"."""
        if self.name == "conv4":
            return [(f"conv{i}", self.widths[i - 1] if i else 0, self.widths[i], 3) for i in range(4)]
        out = []
        if self.name == "resnet12":
            c_in = 0
            for b, width in enumerate(self.widths):
                out += [(f"block{b}.conv1", c_in, width, 3), (f"block{b}.conv2", width, width, 3),
                        (f"block{b}.conv3", width, width, 3), (f"block{b}.conv_s", c_in, width, 1)]
                c_in = width
            return out
        out.append(("stem.conv", 0, self.widths[0], 7))
        c_in = self.widths[0]
        for s, width in enumerate(self.widths):
            for k in range(2):
                pre = f"stage{s}.{k}."
                out += [(pre + "conv1", c_in, width, 3), (pre + "conv2", width, width, 3)]
                if k == 0 and (s > 0 or c_in != width):
                    out.append((pre + "conv_s", c_in, width, 1))
                c_in = width
        return out

    def conv_layers(self) -> list[str]:
        """The body's convolutions, in init order."""
        return [name for name, *_ in self.layers()]

    def bn_layers(self) -> list[str]:
        """The body's batch norms, in init order."""
        return [bn_of(name) for name in self.conv_layers()]

    def film_layer(self, block: int) -> tuple[str, int]:
        """(batch norm, channels) whose output FiLM modulates for `block` (CAVIA's film_block): the
        block's last batch norm before its activation (Conv-4), before the residual sum (ResNets)."""
        if not 0 <= block < len(self.widths):
            raise MetabenchError(f"{self.name} has blocks 0..{len(self.widths) - 1}, not {block}")
        name = {"conv4": f"bn{block}", "resnet12": f"block{block}.bn3", "resnet18": f"stage{block}.1.bn2"}[self.name]
        return name, self.widths[block]

    def check(self, image_shape: tuple[int, int, int] | None = None, dropblock: float = 0.0) -> None:
        """A MetabenchError when images of `image_shape` (C, H, W; None: not known yet) or `dropblock`
        do not fit this backbone."""
        size = min(image_shape[1:]) if image_shape else 16
        if self.name in ("conv4", "resnet12") and size < 16:
            raise MetabenchError(f"{self.label} pools four times by 2: it needs images of at least 16 px, got {size}")
        if dropblock and self.name != "resnet12":
            raise MetabenchError(f"dropblock={dropblock} applies to resnet12 only (MetaOptNet's DropBlock), not {self.name}")
        if not 0 <= dropblock < 1:
            raise MetabenchError(f"dropblock is a drop rate in [0, 1), got {dropblock}")

    def init(self, gen: torch.Generator, in_channels: int, n_out: int, image_size: int) -> Params:
        """Parameters of the body and a linear head of `n_out` outputs, every draw from `gen`."""
        if self.name == "conv4":
            return conv4_init(gen, in_channels, self.widths[0], n_out, image_size)
        p: Params = {}
        for name, c_in, c_out, k in self.layers():
            p[name + ".weight"] = kaiming_normal(gen, c_out, c_in or in_channels, k)
            p[bn_of(name) + ".weight"] = torch.ones(c_out)
            p[bn_of(name) + ".bias"] = torch.zeros(c_out)
        return head_init(gen, p, self.widths[-1], n_out)

    def features(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, ops: Ops = PLAIN) -> torch.Tensor:
        """The body: x [N, C, H, W] -> features [N, feat], in the layer operations `ops`."""
        if self.name == "conv4":
            return conv4_features(p, x, ops)
        return (resnet12_features if self.name == "resnet12" else resnet18_features)(p, x, ops)


def bn_of(conv: str) -> str:
    """The batch norm that follows a conv layer: "block0.conv_s" -> "block0.bn_s"."""
    head, _, last = conv.rpartition(".")
    return (head + "." if head else "") + "bn" + last[len("conv"):]


def layer_kind(key: str) -> str:
    """"conv", "bn" or "" for a parameter key, by its layer's last name component ("block0.bn2.weight" -> "bn")."""
    last = key.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return "conv" if last.startswith("conv") else "bn" if last.startswith("bn") else ""


def conv_bn(p: Mapping[str, torch.Tensor], ops: Ops, conv: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Batch norm of a conv (3x3 with padding 1, 1x1 without; 7x7 with padding 3) of x."""
    k = p[conv + ".weight"].shape[-1]
    return ops.bn(p, bn_of(conv), ops.conv(p, conv, x, stride, k // 2))


def resnet12_features(p: Mapping[str, torch.Tensor], x: torch.Tensor, ops: Ops = PLAIN) -> torch.Tensor:
    """ResNet-12 body: x [N, C, H, W] -> globally average-pooled features [N, widths[-1]]."""
    drop = _DROP.get()
    x = ops.layout(x)
    for b in range(4):
        pre = f"block{b}."
        out = F.leaky_relu(conv_bn(p, ops, pre + "conv1", x), LEAKY_SLOPE)
        out = F.leaky_relu(conv_bn(p, ops, pre + "conv2", out), LEAKY_SLOPE)
        out = conv_bn(p, ops, pre + "conv3", out) + conv_bn(p, ops, pre + "conv_s", x)
        x = F.leaky_relu(max_pool2(out), LEAKY_SLOPE)
        if drop is not None:
            rate, gen = drop
            x = dropout(x, rate, gen) if b < 2 else drop_block(x, rate, DROP_BLOCK_SIZE, gen)
    return x.mean(dim=(2, 3))


def resnet18_features(p: Mapping[str, torch.Tensor], x: torch.Tensor, ops: Ops = PLAIN) -> torch.Tensor:
    """ResNet-18 body: x [N, C, H, W] -> globally average-pooled features [N, widths[-1]]."""
    x = F.relu(F.max_pool2d(conv_bn(p, ops, "stem.conv", ops.layout(x), stride=2), 3, 2, padding=1))
    for s in range(4):
        for k in range(2):
            pre, stride = f"stage{s}.{k}.", 2 if s > 0 and k == 0 else 1
            out = conv_bn(p, ops, pre + "conv2", F.relu(conv_bn(p, ops, pre + "conv1", x, stride)))
            short = conv_bn(p, ops, pre + "conv_s", x, stride) if pre + "conv_s.weight" in p else x
            x = F.relu(out + short)
    return x.mean(dim=(2, 3))


@functools.lru_cache(maxsize=64)
def get_backbone(name: str, widths: str = "", hidden: int = 64) -> Backbone:
    """The backbone of hyperparameters `backbone`, `widths` ("64-160-320-640"; "" = the standard
    ones) and, for Conv-4, `hidden`; a MetabenchError naming the choices otherwise."""
    if name not in BACKBONES:
        raise MetabenchError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    if name == "conv4":
        if widths:
            raise MetabenchError(f"conv4 takes its width from `hidden` (every block alike), not widths={widths!r}")
        return Backbone(name, (hidden,) * 4)
    if not widths:
        return Backbone(name, STANDARD_WIDTHS[name])
    try:
        parsed = tuple(int(w) for w in widths.split("-"))
    except ValueError:
        parsed = ()
    if len(parsed) != 4 or min(parsed) < 1:
        raise MetabenchError(f"{name} widths must be four positive whole numbers joined by '-' (e.g. "
                             f"{'-'.join(map(str, STANDARD_WIDTHS[name]))}), got {widths!r}")
    return Backbone(name, parsed)

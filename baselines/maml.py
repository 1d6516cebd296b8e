"""MAML (Finn et al. 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks").

Learns the initial weights of Conv-4 so that a few gradient steps on a task's support set
solve it. Second order by default; `first_order=True` is first-order MAML (FOMAML), which
drops the second derivatives (the `--stop_grad` flag of the reference code): one class, a flag.

Paper settings are the presets below (from the paper and cbfinn/maml: Omniglot 5-way inner lr
0.4, 1 step at train, 10 at test, meta-batch 32, Adam 1e-3; 20-way 0.1, 5 steps, meta-batch 16;
miniImageNet 0.01, 5 steps, 10 at test, meta-batch 4, Conv-4 32).
One difference from the reference code, stated: Conv-4 here uses 2x2 max-pooling after every
block (the reference code's miniImageNet variant) for Omniglot too, instead of strided convs.

Speed: when the class declares TASK_BATCHED (its per-task computation is MAML's own:
subclasses that only change which keys adapt or their learning rates: FOMAML, ANIL, BOIL,
Meta-SGD; a subclass that does not declare it never takes the fast path) and the tasks have
equal shapes, evaluation adapts EVAL_CHUNK tasks at once as task-batched networks
(baselines/taskbatch.py, `adapt_many`: slices of ADAPT_TASKS_PER_WORKER tasks side by side on the task
pool, each on one thread, so the numbers do not depend on the number of workers or threads; with the
pool off, the whole chunk in one pass), and training does so for `task_batch` tasks at a time
when asked (it trades memory for speed). Both paths compute the same function
(tests/test_taskbatch.py compares them in float64 and over several float32 steps).

Backbones (baselines/backbones.py): any, with the task-batched fast path on each
(taskbatch.TaskOps). Finn et al. used Conv-4 only; the `miniimagenet-resnet12` preset (selected by
--set backbone=resnet12 on miniImageNet) is Ye & Chao 2022's MAML with ResNet-12, with what it does
not take over stated in its note.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F

from bench.api import Episode, Predictor, Preset, Tags
from baselines import cudagraph
from baselines.core import GradientLearner, Params, episode_loss, inner_loop, on_cuda, tasks_on_pool
from baselines.taskbatch import forward_tasks, same_shapes, stack_episodes, stack_params, tasks_loss


REGISTER = {"maml": "MAML", "fomaml": "FOMAML"}

ADAPT_TASKS_PER_WORKER = 4
"""Tasks per task-pool worker call when `adapt_many` adapts on the pool: 4 was at or near the fastest of 1-16 for
Omniglot 5w1s and 20w1s and miniImageNet 5w1s on 2 cores (bench.perf, docs/performance.md)."""

_FINN = "Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks. ICML 2017"
_TRIANTAFILLOU = ("Triantafillou, Zhu, Dumoulin, Lamblin, Evci, Xu, Goroshin, Gelada, Swersky, Manzagol, Larochelle. "
                  "Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few Examples. ICLR 2020")
YE_CHAO = "Ye, Chao. How to Train Your MAML to Excel in Few-Shot Classification. ICLR 2022"
FINN_KEYS = ("omniglot-5w", "omniglot-20w", "miniimagenet")
"""MAML's Conv-4 preset keys (Finn et al. 2017), the ones methods that follow "MAML's setup" take over."""


@dataclass
class MAML(GradientLearner):
    """MAML / FOMAML on Conv-4.

    inner_lr, inner_steps: the inner SGD loop at meta-training; inner_steps_test: at test.
    first_order: drop second-order terms of the meta-gradient.
    task_batch: an implementation setting, not part of the method: how many tasks of a
        meta-batch train together as one task-batched network. 1 (default) trains task by task
        on the CPU, with the peak memory of one task's graph, and the whole meta-batch at once on
        a GPU (kernel launches, not memory, bound a GPU step; there the step is replayed as a CUDA
        graph, baselines/cudagraph.py); k > 1 holds k tasks' graphs at once (memory grows k-fold)
        and can be faster where small support sets leave cores idle (see `python -m bench.perf`).
        Evaluation always adapts EVAL_CHUNK tasks together (its graphs are small).
    """

    inner_lr: float = 0.4
    inner_steps: int = 1
    inner_steps_test: int = 10
    first_order: bool = False
    task_batch: int = 1

    STEP_TRACE: ClassVar[bool] = True  # adaptation ends in one inner_loop call (test-time steps axis)
    PARALLEL_TASKS: ClassVar[bool] = True  # task_loss only reads self
    TASK_BATCHED: ClassVar[bool] = True
    LIMITS: ClassVar[dict[str, str]] = {"inner_steps": ">=1", "task_batch": ">=1"}
    PRESETS: ClassVar[Mapping[str, Preset]] = {
        "omniglot-5w": Preset(dict(inner_lr=0.4, inner_steps=1, inner_steps_test=10, meta_batch=32, outer_lr=1e-3,
                                   hidden=64), 40000, _FINN, "cbfinn/maml", "main.py (usage)"),
        "omniglot-20w": Preset(dict(inner_lr=0.1, inner_steps=5, inner_steps_test=10, meta_batch=16, outer_lr=1e-3,
                                    hidden=64), 40000, _FINN, "cbfinn/maml", "main.py (usage)"),
        "miniimagenet": Preset(dict(inner_lr=0.01, inner_steps=5, inner_steps_test=10, meta_batch=4, outer_lr=1e-3,
                                    hidden=32), 60000, _FINN, "cbfinn/maml", "main.py (usage)"),
        # fo-MAML's best config (shared published_hyperparameters.csv)
        "meta-dataset": Preset(dict(inner_lr=0.09915, inner_steps=10, inner_steps_test=15, meta_batch=1,
                                    outer_lr=3.601e-4, hidden=64), 75000, _TRIANTAFILLOU, "google-research/meta-dataset",
                               "learn/gin/best/maml_imagenet.gin, maml_all.gin",
                               "inner lr 0.09915, 10 steps (+5 at evaluation), one episode per update, Adam 3.601e-4 "
                               "(ImageNet-only; 2.370e-4 for all datasets), 75000 updates; not taken over: their "
                               "pretrained ResNet-18 and 126 px (Conv-4 64 at 84 px here) and the lr decay x0.835 / "
                               "10000; second-order maml uses the same settings (the paper ran first order only; our "
                               "choice)"),
        "miniimagenet-resnet12": Preset(dict(inner_lr=0.05, inner_steps=15, inner_steps_test=15, meta_batch=1,
                                             outer_lr=1e-3, first_order=True, backbone="resnet12"), 10000, YE_CHAO,
                                        "Han-Jia/UNICORN-MAML",
                                        "README.md (MAML, MiniImageNet 1-shot command); model/models/maml.py",
                                        "MAML with ResNet-12 (MetaOptNet's, 64-160-320-640, average-pooled): inner lr "
                                        "(gd_lr) 0.05 and 15 inner steps at train and test (the 5-shot command: 0.1 and "
                                        "20; one preset key cannot tell the shots apart), first order "
                                        "(update_params(first_order=True)), one task per update, 100 epochs x 100 tasks "
                                        "= 10000 updates; not taken over: the FEAT pre-trained initialisation and its SGD "
                                        "(momentum 0.9, weight decay 5e-4, lr 1e-3, x10 for the head, x0.1 every 20 "
                                        "epochs): Adam 1e-3 from scratch here; the logit temperature 0.5 (our MAML has "
                                        "none); the query predicted with running batch-norm statistics at test (batch "
                                        "statistics here). --set backbone=resnet12 on a miniimagenet benchmark selects it"),
    }

    @property
    def tags(self) -> Tags:
        return Tags(bn_mode="transductive", order="first" if self.first_order else "second",
                    transductive=True, variable_way=True, deterministic=True)

    def adapted_keys(self) -> list[str]:
        """Which meta-parameters the inner loop updates (all of them for MAML)."""
        return list(self.meta)

    def inner_lrs(self) -> float | Mapping[str, torch.Tensor]:
        """Inner learning rate: one float, or a tensor per adapted key (Meta-SGD)."""
        return self.inner_lr

    def inner(self, x: torch.Tensor, y: torch.Tensor, steps: int, first_order: bool) -> Params:
        """Run the inner loop from the meta-parameters on (x [n, C, H, W], y [n])."""
        return inner_loop(episode_loss(self.forward), self.meta, self.adapted_keys(), (x, y),
                          steps, self.inner_lrs(), first_order)

    # --- the task-batched fast path -----------------------------------------------------
    def forward_tasks(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, way: int | None = None) -> torch.Tensor:
        """Logits [T, N, way] of T tasks' parameters p[k] [T, *shape] on x [T, N, C, H, W] (the backbone task-batched)."""
        return forward_tasks(self.features, p, x, way)

    def inner_tasks(self, start: Params, data: tuple[torch.Tensor, torch.Tensor], steps: int,
                    first_order: bool, way: int | None = None) -> Params:
        """The inner loop of T tasks at once from `start`: data x [T, n, C, H, W], y [T, n] ->
        parameters [T, ...] (each task's own adapted copy); way: the classes (read from y when None)."""
        x, y = data
        return inner_loop(tasks_loss(self.forward_tasks, way), stack_params(start, x.shape[0]), self.adapted_keys(),
                          (x, y), steps, self.inner_lrs(), first_order)

    def outer_step(self, batch: list[Episode]) -> None:
        tasks = len(batch) if self.task_batch == 1 and on_cuda(self.device) else self.task_batch
        if tasks < 2 or len(batch) < 2 or self.dropblock or not (self.TASK_BATCHED and same_shapes(batch)):
            return super().outer_step(batch)  # (DropBlock draws masks per task: the per-task loop)
        inputs = [t for first in range(0, len(batch), tasks) for t in stack_episodes(batch[first:first + tasks])]
        step = functools.partial(self.batched_step, batch[0].way, len(batch))
        if not (inputs[0].is_cuda and cudagraph.enabled()):
            return step(*inputs)
        key = (self.optimizer, batch[0].way, len(batch))  # (a new optimizer after setup or a load: a new capture)
        captured = getattr(self, "_captured", None)
        if captured is None or not captured.matches(key, inputs):
            captured = self._captured = cudagraph.CapturedStep(step, key)
        captured(inputs)

    def batched_step(self, way: int, n_tasks: int, *chunks: torch.Tensor) -> None:
        """The task-batched outer step on chunks of stacked tasks, four tensors per chunk (support x [T, n_s, C, H, W],
        y [T, n_s], query x [T, n_q, C, H, W], y [T, n_q]) of `way` classes, `n_tasks` tasks in all: zero the
        gradients, the inner loops and query losses chunk by chunk, one optimizer step. No value is read back to
        the host, so a CUDA graph can capture it (baselines/cudagraph.py)."""
        self.optimizer.zero_grad(set_to_none=True)
        for first in range(0, len(chunks), 4):
            sx, sy, qx, qy = chunks[first:first + 4]
            fast = self.inner_tasks(self.meta, (sx, sy), self.inner_steps, self.first_order, way)
            (tasks_loss(self.forward_tasks, way)(fast, qx, qy) / n_tasks).backward()
        self.optimizer.step()

    def adapt_many(self, supports: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[Predictor]:
        shapes_equal = len({(tuple(x.shape), int(y.max())) for x, y in supports}) == 1
        if len(supports) < 2 or not (self.TASK_BATCHED and shapes_equal):
            return super().adapt_many(supports)
        x, y = torch.stack([s[0] for s in supports]), torch.stack([s[1] for s in supports])
        start = {k: v.detach() for k, v in self.meta.items()}

        def adapt(tasks: slice) -> Params:
            with torch.enable_grad():
                return self.inner_tasks(start, (x[tasks], y[tasks]), self.inner_steps_test, True)

        if self.adapts_side_by_side:  # single-threaded slices side by side (as training's tasks)
            fast = tasks_on_pool(adapt, len(supports), ADAPT_TASKS_PER_WORKER)
        else:
            fast = adapt(slice(None))
        way = int(y.max()) + 1
        return [self.predictor({k: v[t].detach() for k, v in fast.items()}, way) for t in range(len(supports))]

    def task_loss(self, ep: Episode) -> torch.Tensor:
        fast = self.inner(ep.support_x, ep.support_y, self.inner_steps, self.first_order)
        return F.cross_entropy(self.forward(fast, ep.query_x, ep.way), ep.query_y)

    def adapt_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        return self.inner(support_x, support_y, self.inner_steps_test, True)


@dataclass
class FOMAML(MAML):
    """First-order MAML: MAML with `first_order=True` (Finn et al. 2017, Sec. 5.2)."""

    first_order: bool = True

    STEP_TRACE: ClassVar[bool] = True  # adaptation ends in one inner_loop call (test-time steps axis)
    PARALLEL_TASKS: ClassVar[bool] = True
    TASK_BATCHED: ClassVar[bool] = True
    PRESETS: ClassVar[Mapping[str, Preset]] = {
        key: replace(p, values={**p.values, "first_order": True},
                     note="; ".join(filter(None, ["first-order approximation (Sec. 5.2; --stop_grad=True in cbfinn/maml)",
                                                  p.note])))
        for key, p in MAML.PRESETS.items()}

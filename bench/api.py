"""The contract between the harness and a method: `Episode`, `TaskInfo`, `Tags`, `Preset`, `MetaLearner`.

A method implements `setup`, `fit`, `adapt`, `state_dict` and `load_state_dict` (abstract: a
class missing one cannot be constructed); the harness calls `evaluate`, which is defined once
here: adapt on the support set, predict the query set, score. Query labels never reach the
method. Hyperparameters are dataclass fields; the constructor only stores them. A method's paper
settings sit next to its class as `PRESETS` (preset key -> `Preset`).
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch

from bench.errors import MetabenchError, MethodError

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""query_x [n_query, C, H, W] -> logits [n_query, way]."""
StepCurves = list[dict[int, Predictor]]
"""Per task: test-time inner step -> the predictor after that many steps (`MetaLearner.adapt_steps`)."""


@dataclass(frozen=True)
class Episode:
    """One few-shot task.

    support_x: [n_support, C, H, W] float32 in [0, 1]; support_y: [n_support] int64 in 0..way-1.
    query_x: [n_query, C, H, W]; query_y: [n_query] int64 (never shown to a method).
    classes: absolute class ids of the source, position = relative label.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: tuple[int, ...]
    split: str
    index: int
    spec_hash: str

    @property
    def way(self) -> int:
        """Number of classes in this episode."""
        return len(self.classes)

    def to(self, device: torch.device | str) -> "Episode":
        """The same episode with its tensors on `device`."""
        return dataclasses.replace(self, support_x=self.support_x.to(device), support_y=self.support_y.to(device),
                                   query_x=self.query_x.to(device), query_y=self.query_y.to(device))


@dataclass(frozen=True)
class TaskInfo:
    """What a method may know about a benchmark before training: shapes, not data.

    image_shape: (C, H, W); max_way: largest way of any episode; n_classes: classes of the
    source (absolute ids in `Episode.classes` are below it); variable_way: way changes per episode.
    """

    image_shape: tuple[int, int, int]
    max_way: int
    n_classes: int
    variable_way: bool = False


@dataclass(frozen=True)
class Tags:
    """What the harness must know about a method.

    bn_mode: "transductive" (batch statistics of the batch being predicted), "inductive"
        (statistics fixed after adaptation), or "none" (no batch norm).
    order: "second", "first" or "none" (meta-gradient order; "none" for non-gradient methods).
    transductive: predictions of one query depend on the other queries.
    variable_way: handles a different way in every episode, up to the TaskInfo.max_way it was
        set up with (a wider episode is an error that names max_way).
    deterministic: same seed, same stream -> identical state on CPU.
    """

    bn_mode: str = "none"
    order: str = "none"
    transductive: bool = False
    variable_way: bool = True
    deterministic: bool = True


@dataclass(frozen=True)
class Preset:
    """A method's published settings for one kind of benchmark (`MetaLearner.PRESETS[key]`).

    values: hyperparameters (dataclass field -> value); steps: outer updates of the full run;
    paper: the citation; repository / file: where in released code the values are ("" when
    they come from the paper's text); note: what is our choice, or was not taken over.
    Keys: "omniglot-5w", "omniglot-20w", "miniimagenet", "meta-dataset" (a benchmark names its
    key, `Benchmark.preset`), or "*" for every benchmark without a preset of its own.
    """

    values: Mapping[str, Any]
    steps: int
    paper: str
    repository: str = ""
    file: str = ""
    note: str = ""

    def source(self) -> str:
        """The citation with repository, file and note, in one line."""
        where = f"{self.repository} {self.file}".strip()
        return "; ".join(part for part in (self.paper, where, self.note) if part)


MD_STEPS = 75000
"""Outer updates of a Meta-Dataset run: the official trainer's setup default (published fo-MAML and
fo-Proto-MAML settings, one episode per update)."""


def with_meta_dataset(presets: Mapping[str, Preset]) -> dict[str, Preset]:
    """`presets` plus a "meta-dataset" preset when it has none: for a method without published
    Meta-Dataset settings, the values of its "miniimagenet" preset (its paper's 84 px setting, the
    image size of the Meta-Dataset benchmarks here) and MD_STEPS outer updates, with a note saying
    so. Presets without a "miniimagenet" entry are returned unchanged."""
    out = dict(presets)
    mini = out.get("miniimagenet")
    if "meta-dataset" not in out and mini is not None:
        out["meta-dataset"] = Preset(dict(mini.values), MD_STEPS, mini.paper, mini.repository, mini.file,
                                     "no published Meta-Dataset value: the method's miniImageNet (84 px) settings, "
                                     f"{MD_STEPS} updates as the official Meta-Dataset trainer's default"
                                     + (f"; miniImageNet note: {mini.note}" if mini.note else ""))
    return out


@dataclass
class MetaLearner(abc.ABC):
    """Base class of every method. Subclasses are dataclasses of hyperparameters.

    Subclasses implement (abstract, checked at construction):
      setup(info) -> self: build parameters from `self.seed` (no data seen).
      fit(episodes, steps) -> self: `steps` outer updates consuming the iterator; fit(a) then
          fit(b) on the continuation of the stream equals fit(a + b).
      adapt(support_x, support_y) -> Predictor: never changes meta-parameters, never sees
          query labels.
      state_dict() / load_state_dict(state): tensors and primitives only (loadable with
          torch.load(weights_only=True)), optimizer and RNG state included.
    and declare PRESETS: their paper settings per preset key.
    """

    TAGS: ClassVar[Tags] = Tags()
    PRESETS: ClassVar[Mapping[str, Preset]] = {}
    LABEL_PERMUTATION_INVARIANT: ClassVar[bool] = False
    """Permuting which class gets which label of the support set permutes the logits' columns the same way
    and changes nothing else (ProtoNet's prototypes, a head initialised the same for every class). Declared
    per class, not inherited (a subclass that does not declare it gets False); the conformance suite checks
    it (bench.checks.check_label_permutation_invariance)."""
    OMIT_AT_DEFAULT: ClassVar[tuple[str, ...]] = ()
    """Fields params() leaves out while they hold their default: hyperparameters added after results were
    recorded (e.g. GradientLearner's backbone), so that the params_hash of those runs does not change."""
    seed: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "LABEL_PERMUTATION_INVARIANT" not in cls.__dict__:
            cls.LABEL_PERMUTATION_INVARIANT = False

    # --- state set by setup / fit (class attributes, not hyperparameter fields) -----------
    device = torch.device("cpu")  # where setup puts the meta-parameters (the runner's --device)
    info = None  # TaskInfo | None
    fit_episodes = 0  # episodes consumed by fit so far (the stream position)
    fit_steps = 0  # outer updates done so far

    @property
    def tags(self) -> Tags:
        """The method's tags (a subclass may derive them from its hyperparameters)."""
        return self.TAGS

    @property
    def backbone(self) -> str:
        """A short backbone name for protocol cards (e.g. "conv4-64")."""
        return "none"

    @property
    def backbone_label(self) -> str:
        """The backbone as the run card names it (default: `backbone`; a method whose `backbone` is a
        hyperparameter, e.g. "resnet12", overrides this to add its widths: "resnet12-64-160-320-640")."""
        return str(self.backbone)

    def params(self) -> dict[str, Any]:
        """The hyperparameters (dataclass fields) as a plain dict, without OMIT_AT_DEFAULT fields at their default."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if not (f.name in self.OMIT_AT_DEFAULT and f.default is not dataclasses.MISSING and value == f.default):
                out[f.name] = value
        return out

    @abc.abstractmethod
    def setup(self, info: TaskInfo) -> "MetaLearner":
        """Build the meta-parameters for `info` from `self.seed`. Returns self."""

    @abc.abstractmethod
    def fit(self, episodes: Iterator[Episode], steps: int) -> "MetaLearner":
        """Continue meta-training for `steps` outer updates on `episodes`. Returns self."""

    @abc.abstractmethod
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Adapt to a support set [n_support, C, H, W], [n_support]; return query_x -> logits [n_query, way]."""

    def adapt_many(self, supports: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[Predictor]:
        """`adapt` on several support sets at once (one predictor each, in order).

        A method may override this to adapt many tasks in one pass (e.g. a task-batched inner
        loop); its predictors must equal those of `adapt` (checked by the conformance suite).
        """
        return [self.adapt(x, y) for x, y in supports]

    def map_predictions(self, calls: Sequence[tuple[Predictor, torch.Tensor]]) -> list[torch.Tensor]:
        """predict(query_x) for each (predict, query_x [n_query, C, H, W]), in order, without gradients: logits
        [n_query, way] each. Here one after another; a method whose predictors only read may compute them
        side by side (baselines.core.GradientLearner: on the task pool, where evaluation adapts on it)."""
        with torch.no_grad():
            return [predict(x) for predict, x in calls]

    @property
    def test_steps(self) -> int | None:
        """Test-time inner steps of adaptation (None: the method has no inner loop)."""
        return None

    def adapt_steps(self, supports: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    upto: int) -> tuple[list[Predictor], StepCurves, float | Callable[[], float]]:
        """`adapt_many`'s predictors; per task, {test-time inner step: predictor} after each step of
        adaptation up to at least `upto` steps, recorded from the same pass; and the seconds spent on steps
        beyond the method's own test steps (left out of adapt_seconds; a callable when the predictors spend
        them, e.g. a method that adapts inside its predictor: evaluate reads it after the main predictions).
        This default has no inner loop to record: a single point per task, at `test_steps` (0 without), and no extra time. A gradient method
        that declares STEP_TRACE records every step, and one with its own inner loop records it itself
        (baselines.core.GradientLearner.adapt_steps, adapt_recorded).
        """
        predictors = self.adapt_many(supports)
        return predictors, [{self.test_steps or 0: p} for p in predictors], 0.0

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: tensors and primitives only."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> "MetaLearner":
        """Restore a state from `state_dict`. Returns self."""

    def check_way(self, ep: Episode) -> None:
        """Raise a clear error when `ep` has more ways than this learner was set up for."""
        if self.info is not None and ep.way > self.info.max_way:
            raise MetabenchError(f"{type(self).__name__} was set up for max_way={self.info.max_way} (TaskInfo), but "
                                 f"{ep.split} episode {ep.index} has {ep.way} ways; set it up for the benchmark "
                                 "it is given")

    # --- defined once -------------------------------------------------------------------
    def evaluate(self, episodes: Iterable[Episode], steps_upto: int | None = None) -> list[dict[str, Any]]:
        """Adapt on each support set, predict its query set, and score it.

        Returns one dict per episode: accuracy, loss (cross-entropy of the logits), way, n_support,
        n_query, adapt_seconds and adapt_batch. A method with its own `adapt_many` adapts EVAL_CHUNK
        episodes per call (e.g. one task-batched inner loop): its adapt_seconds is that call's time
        plus prediction, divided by its episodes, and adapt_batch says how many shared it. Any other
        method is adapted and timed one episode at a time (adapt_batch 1), with the same results.

        steps_upto: also record the query accuracy and loss after each test-time inner step up to at least
        this many, in the same adaptation pass (`adapt_steps`): each dict then has "steps", a list of
        (step, accuracy, loss). The main numbers are those without it; adapt_seconds leaves out the steps
        beyond the method's own and the per-step predictions.
        """
        out: list[dict[str, Any]] = []
        it = iter(episodes)
        batched = type(self).adapt_many is not MetaLearner.adapt_many
        while chunk := list(itertools.islice(it, EVAL_CHUNK if batched else 1)):
            for ep in chunk:
                self.check_way(ep)
            supports = [(ep.support_x, ep.support_y) for ep in chunk]
            start = time.perf_counter()
            curves, extra = None, 0.0
            if steps_upto is not None:
                predictors, curves, extra = self.adapt_steps(supports, steps_upto)
            else:
                predictors = self.adapt_many(supports) if batched else [self.adapt(*supports[0])]
            logits = self.map_predictions([(predict, ep.query_x) for predict, ep in zip(predictors, chunk)])
            extra = extra() if callable(extra) else extra
            seconds = (time.perf_counter() - start - extra) / len(chunk)
            rows = [score(lg, ep) | {"adapt_seconds": seconds, "adapt_batch": len(chunk)} for lg, ep in zip(logits, chunk)]
            if curves is not None:  # each step's predictor on its query set (the main one's logits reused)
                calls = [(curve[s], ep.query_x) for curve, ep, predict in zip(curves, chunk, predictors)
                         for s in sorted(curve) if curve[s] is not predict]
                stepped = iter(self.map_predictions(calls))
                for row, curve, ep, lg, predict in zip(rows, curves, chunk, logits, predictors):
                    scores = [score(lg if curve[s] is predict else next(stepped), ep) for s in sorted(curve)]
                    row["steps"] = [(s, sc["accuracy"], sc["loss"]) for s, sc in zip(sorted(curve), scores)]
            out.extend(rows)
        return out


EVAL_CHUNK = 32
"""Episodes adapted together by `MetaLearner.evaluate` (one `adapt_many` call) for a method with its own adapt_many."""


def score(logits: torch.Tensor, ep: Episode) -> dict[str, float]:
    """Accuracy and cross-entropy of logits [n_query, way] on an episode's query labels."""
    if logits.shape != (len(ep.query_y), ep.way):
        raise MethodError(f"predictor returned logits of shape {list(logits.shape)}, "
                          f"expected [n_query, way] = {[len(ep.query_y), ep.way]}")
    logits = logits.detach().to(torch.float64)
    if not torch.isfinite(logits).all():
        raise MethodError("predictor returned non-finite logits (NaN or inf)")
    acc = (logits.argmax(dim=1) == ep.query_y).double().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, ep.query_y).item()
    return {"accuracy": acc, "loss": loss, "way": ep.way, "n_support": len(ep.support_y),
            "n_query": len(ep.query_y)}


def rng_state(gen: torch.Generator) -> torch.Tensor:
    """A generator's state as a uint8 tensor (for state_dict)."""
    return gen.get_state().clone()


def new_generator(seed: int, *salt: int) -> torch.Generator:
    """A torch CPU generator seeded from (seed, *salt) through numpy's SeedSequence."""
    import numpy as np

    words = np.random.SeedSequence([seed, *salt]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))

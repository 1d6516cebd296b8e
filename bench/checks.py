"""The conformance suite: does a method keep the MetaLearner contract? (`metabench check NAME`)

Modelled on scikit-learn's `check_estimator`: many small `check_*` functions, each of which
builds fresh instances of the method, runs it for a few seconds on the in-memory `synthetic`
source, and raises `CheckFailure` (an AssertionError) whose message says what the contract
requires and what the method did instead.

    results = run_checks("maml")                 # a registered name ...
    results = run_checks("mypkg.mod:MyMethod")   # ... or any importable MetaLearner subclass
    print(format_report(results))

Instances are built like the harness builds them (registry defaults of the synthetic
benchmark's family, "omniglot" 5-way, for a registered name; the class defaults otherwise),
then made small and fast with check-time hyperparameters: `CHECK_PARAMS_BY_CLASS` below for
in-tree base classes (e.g. every GradientLearner gets a 16-filter Conv-4, meta-batch 2 and a
10x outer learning rate, so that learning shows within a few dozen outer steps), then the
method's own class attribute `CHECK_PARAMS = {...}` (a plain class attribute, not a field;
merged along the class hierarchy, subclasses win), like scikit-learn's per-estimator check
parameters. They are hyperparameters only, so every check still runs the method's own code.

Known exceptions: a class attribute `CHECK_EXCEPTIONS: dict[str, str]` maps a check name to the
reason it is expected to fail (e.g. `{"check_learns": "predicts uniformly by design"}`). An
excepted check still runs; a failure is reported as "excepted: <reason>", never hidden, and a
pass is reported as a pass with a note that the exception is no longer needed. Checks that do
not apply to a method's tags (e.g. query independence of a transductive method) are reported
as "n/a" with the tag that makes them so.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import math
import random
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from bench.api import Episode, MetaLearner, Tags, TaskInfo
from bench.errors import MetabenchError
from bench.registry import Registry
from baselines.parallel import workers_set

if TYPE_CHECKING:
    from bench.protocols import EpisodeSet
    from bench.sources.base import ArraySource

PRESET_KEY, WAY = "omniglot-5w", 5  # the synthetic benchmark's preset key (whose method presets apply) and way
# Check-time hyperparameters of in-tree base classes (like scikit-learn's per-estimator check
# params): a narrow Conv-4, small meta-batches, and a 10x outer learning rate so that learning
# shows within a few dozen outer steps; MAML-style methods adapt with 3 steps at test.
# Applied along the class hierarchy (base classes first), then the classes' own CHECK_PARAMS.
CHECK_PARAMS_BY_CLASS: dict[str, dict[str, Any]] = {
    "baselines.core:GradientLearner": dict(hidden=16, meta_batch=2, outer_lr=0.01),
    "baselines.maml:MAML": dict(inner_steps_test=3),
}
BN_MODES = ("transductive", "inductive", "none")
ORDERS = ("second", "first", "none")
PRIMITIVES = (bool, int, float, str, type(None))


class CheckFailure(AssertionError):
    """A method broke the contract; the message says what the contract requires."""


class NotApplicable(Exception):
    """The check does not apply to this method (its tags say so); the message says why."""


@dataclass
class CheckResult:
    """The outcome of one check on one method.

    status: "passed", "failed", "excepted" (failed, with a declared reason) or "n/a".
    message: why it failed / was excepted / does not apply, or a short note on a pass.
    """

    method: str
    check: str
    status: str
    message: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True unless the check failed without a declared exception."""
        return self.status != "failed"


# --- the method under test --------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def synthetic_source() -> ArraySource:
    """The synthetic source at 28 px (built once per process; in memory, no files)."""
    from bench.sources.synthetic import make_synthetic

    return make_synthetic(image_size=28)


@functools.lru_cache(maxsize=16)
def episode_set(way: int, shot: int, query: int) -> EpisodeSet:
    """An EpisodeSet of way/shot/query on the synthetic source (synthetic-5w1s itself for 5/1/5)."""
    from bench.benchmarks import SYNTHETIC
    from bench.protocols import EpisodeSet
    from bench.sampling import FixedEpisodes

    bench = SYNTHETIC
    if FixedEpisodes(way, shot, query) != SYNTHETIC.protocol:
        bench = dataclasses.replace(SYNTHETIC, name=f"check-{way}w{shot}s{query}q", protocol=FixedEpisodes(way, shot, query))
    return EpisodeSet(bench, synthetic_source())


def check_params(cls: type) -> dict[str, Any]:
    """Check-time hyperparameters of `cls`: CHECK_PARAMS_BY_CLASS entries of its base classes, then
    the CHECK_PARAMS class attributes along its MRO (subclasses win)."""
    params: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        params.update(CHECK_PARAMS_BY_CLASS.get(f"{klass.__module__}:{klass.__qualname__}", {}))
    for klass in reversed(cls.__mro__):
        params.update(vars(klass).get("CHECK_PARAMS", {}) or {})
    return params


@dataclass
class Subject:
    """The method under test: how to build it, and helpers that give it data."""

    name: str
    cls: type
    params: dict[str, Any]
    quick: bool = True
    exceptions: dict[str, str] = field(default_factory=dict)

    def new(self, **overrides: Any) -> MetaLearner:
        """A fresh instance (not set up)."""
        return self.cls(**{**self.params, **overrides})

    @property
    def tags(self) -> Tags:
        return self.new().tags

    def info(self, max_way: int = WAY, variable_way: bool | None = None) -> TaskInfo:
        """TaskInfo of the synthetic source."""
        src = synthetic_source()
        vw = self.tags.variable_way if variable_way is None else variable_way
        return TaskInfo(src.image_shape, max_way, src.n_classes, vw)

    def ready(self, **overrides: Any) -> MetaLearner:
        """A fresh instance, set up for the synthetic source."""
        m = self.new(**overrides)
        out = m.setup(self.info())
        if out is not m:
            raise CheckFailure(f"setup(info) must return self (got {type(out).__name__})")
        return m

    def train_stream(self, start: int = 0) -> Iterator[Episode]:
        """The synthetic-5w1s training stream from episode `start`."""
        return episode_set(5, 1, 5).stream("train", start)

    def episode(self, way: int = 5, shot: int = 1, query: int = 5, split: str = "test", index: int = 0) -> Episode:
        return episode_set(way, shot, query).episode(split, index)

    def ways(self) -> tuple[int, ...]:
        return (2, 3, 5) if self.tags.variable_way else (5,)


def resolve(target: str | type) -> tuple[str, type, dict[str, Any]]:
    """(name, class, constructor params) of a registry name, "pkg.module:Class" or a class."""
    from baselines import registry

    if isinstance(target, type):
        if not issubclass(target, MetaLearner):
            raise MetabenchError(f"{target.__qualname__} is not a subclass of bench.api.MetaLearner")
        return f"{target.__module__}:{target.__qualname__}", target, check_params(target)
    cls = registry.method_class(target)
    preset = registry.preset(target, PRESET_KEY)
    params = {**(preset.values if preset else {}), **check_params(cls), "seed": 0}
    return target, cls, params


# --- helpers ------------------------------------------------------------------------------
def clone_state(obj: Any) -> Any:
    """A deep copy of a state_dict-like structure (tensors cloned)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return obj


def first_difference(a: Any, b: Any, path: str = "state") -> str | None:
    """Where two state structures differ (exactly), or None when they are identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if not torch.equal(a, b):
            if a.is_floating_point():
                diff = (a.double() - b.double()).abs().max().item()
                return f"{path}: values differ (max abs difference {diff:.3g})"
            return f"{path}: values differ"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            extra, missing = sorted(map(str, set(a) - set(b))), sorted(map(str, set(b) - set(a)))
            return f"{path}: keys differ (only in first: {extra[:5]}, only in second: {missing[:5]})"
        for k in a:
            d = first_difference(a[k], b[k], f"{path}[{k!r}]")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if type(a) is not type(b) or a != b:
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return None
        return f"{path}: {a!r} vs {b!r}"
    return None


def non_primitive(obj: Any, path: str = "state") -> str | None:
    """The path of the first entry that is not a tensor, primitive, or dict/list/tuple of them."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, PRIMITIVES):
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                return f"{path} has a key of type {type(k).__name__}"
            bad = non_primitive(v, f"{path}[{k!r}]")
            if bad:
                return bad
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = non_primitive(v, f"{path}[{i}]")
            if bad:
                return bad
        return None
    return f"{path} is a {type(obj).__module__}.{type(obj).__qualname__}"


def save_load(state: dict[str, Any]) -> dict[str, Any]:
    """torch.save to memory, then torch.load(weights_only=True), as the runner's checkpoints do."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def predict(m: MetaLearner, ep: Episode, query_x: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of `m` adapted to ep's support set, on `query_x` (default: ep's query set)."""
    predictor = m.adapt(ep.support_x, ep.support_y)
    with torch.no_grad():
        out = predictor(ep.query_x if query_x is None else query_x)
    if not isinstance(out, torch.Tensor):
        raise CheckFailure(f"the predictor returned a {type(out).__name__}, expected a tensor of logits [n_query, way]")
    return out.detach()


def accuracy(m: MetaLearner, episodes: list[Episode]) -> float:
    return float(np.mean([r["accuracy"] for r in m.evaluate(episodes)]))


class CountingStream:
    """An episode iterator that counts how many episodes were taken from it."""

    def __init__(self, it: Iterator[Episode]) -> None:
        self.it, self.taken = it, 0

    def __iter__(self) -> "CountingStream":
        return self

    def __next__(self) -> Episode:
        ep = next(self.it)
        self.taken += 1
        return ep


def global_rng_states() -> tuple:
    return (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())


def same_global_rng(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def require(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailure(message)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 round-off of batched vs unbatched kernels (or of a batch-norm sum taken
    in another order): 1e-4 relative, and 1e-5 of the logits' scale absolute, since a logit near
    0 among logits of size 40 is a difference of large numbers."""
    if a.shape != b.shape:
        return False
    scale = 1.0 + a.double().abs().max().item() if a.numel() else 1.0
    return torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5 * scale)


# --- the checks ---------------------------------------------------------------------------
CHECKS: Registry[Callable[[Subject], str | None]] = Registry("check")


def check(fn: Callable[[Subject], str | None]) -> Callable[[Subject], str | None]:
    """Register a check (in definition order) under its function name."""
    CHECKS.add(fn.__name__, fn, (fn.__doc__ or "").split("\n")[0])
    return fn


@check
def check_interface(s: Subject) -> str | None:
    """A dataclass subclass of MetaLearner implementing setup, fit, adapt, state_dict, load_state_dict;
    `evaluate` is the base class's (the harness, not the method, scores predictions)."""
    require(issubclass(s.cls, MetaLearner), f"{s.cls.__qualname__} must subclass bench.api.MetaLearner")
    require(dataclasses.is_dataclass(s.cls),
            f"{s.cls.__qualname__} must be a @dataclass (hyperparameters are dataclass fields)")
    missing = [n for n in ("setup", "fit", "adapt", "state_dict", "load_state_dict")
               if getattr(s.cls, n) is getattr(MetaLearner, n)]
    require(not missing, f"{s.cls.__qualname__} must implement {', '.join(missing)} (MetaLearner's raise NotImplementedError)")
    require(s.cls.evaluate is MetaLearner.evaluate,
            "evaluate() must not be overridden: it is defined once in MetaLearner (adapt on the support set, "
            "predict the query set, score), so every method is scored the same way")
    sig = inspect.signature(s.cls.adapt)
    require(len([p for p in sig.parameters.values() if p.default is p.empty]) == 3,
            f"adapt must take exactly (self, support_x, support_y) and never see query labels; got {sig}")
    return None


@check
def check_tags(s: Subject) -> str | None:
    """Tags are a bench.api.Tags with legal values, readable before setup, and self-consistent."""
    tags = s.new().tags
    require(isinstance(tags, Tags), f"tags must be a bench.api.Tags, got {type(tags).__name__}")
    require(tags.bn_mode in BN_MODES, f"Tags.bn_mode must be one of {BN_MODES}, got {tags.bn_mode!r}")
    require(tags.order in ORDERS, f"Tags.order must be one of {ORDERS}, got {tags.order!r}")
    for name in ("transductive", "variable_way", "deterministic"):
        require(isinstance(getattr(tags, name), bool), f"Tags.{name} must be a bool, got {getattr(tags, name)!r}")
    require(tags.bn_mode != "transductive" or tags.transductive,
            "Tags.bn_mode='transductive' (batch statistics of the predicted batch) makes predictions of one "
            "query depend on the others, so Tags.transductive must be True")
    return f"{tags}"


@check
def check_exception_declarations(s: Subject) -> str | None:
    """CHECK_EXCEPTIONS maps existing check names to non-empty reasons."""
    declared = getattr(s.cls, "CHECK_EXCEPTIONS", {}) or {}
    require(isinstance(declared, dict), f"CHECK_EXCEPTIONS must be a dict check name -> reason, got {type(declared).__name__}")
    unknown = [k for k in declared if k not in CHECKS]
    require(not unknown, f"CHECK_EXCEPTIONS names unknown checks {unknown}; known: {', '.join(CHECKS)}")
    empty = [k for k, v in declared.items() if not (isinstance(v, str) and v.strip())]
    require(not empty, f"CHECK_EXCEPTIONS must give a reason (a non-empty string) for {empty}")
    return f"{len(declared)} declared" if declared else None


@check
def check_hyperparameters(s: Subject) -> str | None:
    """Hyperparameters are dataclass fields with defaults and primitive values; params() lists
    exactly them, and cls(**params()) rebuilds an equal configuration."""
    fields = dataclasses.fields(s.cls)
    no_default = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    require(not no_default, f"every hyperparameter needs a default (constructible as {s.cls.__qualname__}()); "
                            f"missing: {no_default}")
    require(any(f.name == "seed" for f in fields), "the hyperparameters must include `seed` (from MetaLearner)")
    m = s.new()
    params = m.params()
    omitted = {f.name for f in fields if f.name in getattr(s.cls, "OMIT_AT_DEFAULT", ()) and getattr(m, f.name) == f.default}
    require(isinstance(params, dict) and set(params) == {f.name for f in fields} - omitted,
            f"params() must return exactly the dataclass fields (less OMIT_AT_DEFAULT fields at their default: "
            f"{sorted(omitted)}), got {sorted(params) if isinstance(params, dict) else params}")
    bad = {k: type(v).__name__ for k, v in params.items() if non_primitive(v) or isinstance(v, torch.Tensor)}
    require(not bad, f"hyperparameter values must be primitives (bool/int/float/str/None, or lists/dicts of them) "
                     f"so they go into result rows, params hashes and state_dicts; got {bad}")
    again = s.cls(**params).params()
    require(again == params, f"{s.cls.__qualname__}(**params()) must rebuild the same hyperparameters; "
                             f"{first_difference(params, again, 'params()')}")
    return None


@check
def check_init_stores_only(s: Subject) -> str | None:
    """The constructor only stores hyperparameters: no other attributes, no tensors, no RNG use."""
    names = {f.name for f in dataclasses.fields(s.cls)}
    before = global_rng_states()
    for m in (s.cls(), s.new()):
        extra = sorted(set(vars(m)) - names)
        require(not extra, f"the constructor must only store hyperparameters (dataclass fields); it also set "
                           f"{extra}: build parameters, optimizers and generators in setup(info)")
        built = [k for k, v in vars(m).items()
                 if isinstance(v, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer, torch.Generator))]
        require(not built, f"the constructor built {built}; tensors are built in setup(info), from `seed`")
        require(getattr(m, "info", None) is None, "info must be None before setup(info)")
    require(same_global_rng(before, global_rng_states()),
            "the constructor used the global random number generator; draw randomness in setup from `seed`")
    return None


@check
def check_setup_seeded(s: Subject) -> str | None:
    """setup(info) returns self and builds the same state from the same seed, without the global RNG."""
    saved = torch.random.get_rng_state()
    try:
        torch.manual_seed(1)  # different global seeds: a method drawing from them would differ
        before = global_rng_states()
        a = s.ready().state_dict()
        require(same_global_rng(before, global_rng_states()),
                "setup(info) used the global random number generator (torch, numpy or random); every random draw "
                "must come from a generator seeded by the method's `seed`")
        torch.manual_seed(2)
        b = s.ready().state_dict()
    finally:
        torch.random.set_rng_state(saved)
    d = first_difference(a, b)
    require(d is None, f"two instances with the same seed must start from identical state after setup; {d}")
    return None


@check
def check_global_rng_untouched(s: Subject) -> str | None:
    """fit and adapt neither consume nor depend on the global RNG (no module-level randomness)."""
    m = s.ready()
    ep = s.episode()
    before = global_rng_states()
    m.fit(s.train_stream(), 1)
    predict(m, ep)
    require(same_global_rng(before, global_rng_states()),
            "fit/adapt used the global random number generator (torch, numpy or random); use a generator "
            "seeded from `seed` and saved in state_dict, so runs are reproducible and resumable")
    return None


@check
def check_adapt_shapes(s: Subject) -> str | None:
    """adapt -> predictor returning finite float logits [n_query, way], for several ways and shots."""
    m = s.ready()
    m.fit(s.train_stream(), 1)
    shots = (1, 2) if s.quick else (1, 2, 5)
    seen = []
    for way in s.ways():
        for shot in shots:
            query = 3 if s.quick else 5
            ep = s.episode(way, shot, query, index=way * 10 + shot)
            out = predict(m, ep)
            want = (len(ep.query_y), way)
            require(tuple(out.shape) == want,
                    f"{way}-way {shot}-shot: logits must have shape [n_query, way] = {list(want)}, got {list(out.shape)}")
            require(out.is_floating_point(), f"logits must be floating point, got {out.dtype}")
            require(bool(torch.isfinite(out).all()), f"{way}-way {shot}-shot: logits must be finite (got nan/inf)")
            one = predict(m, ep, ep.query_x[:1])
            require(tuple(one.shape) == (1, way), f"{way}-way {shot}-shot: a single query must give logits [1, way], "
                                                  f"got {list(one.shape)}")
            seen.append(f"{way}w{shot}s")
    return "ways/shots " + " ".join(seen)


@check
def check_adapt_leaves_meta_untouched(s: Subject) -> str | None:
    """adapt (and predicting) never changes the meta-parameters, optimizer or RNG state."""
    m = s.ready()
    m.fit(s.train_stream(), 1)
    before = clone_state(m.state_dict())
    ep = s.episode()
    predict(m, ep)
    predict(m, s.episode(index=1))
    d = first_difference(before, m.state_dict())
    require(d is None, f"adapt() must never change the meta-parameters (learn2learn-style clone-then-adapt), but "
                       f"state_dict() changed: {d}")
    return None


@check
def check_adapt_repeatable(s: Subject) -> str | None:
    """Adapting twice to the same support set gives the same predictions (and a predictor is pure)."""
    m = s.ready()
    m.fit(s.train_stream(), 1)
    ep = s.episode()
    predictor = m.adapt(ep.support_x, ep.support_y)
    with torch.no_grad():
        p1, p2 = predictor(ep.query_x), predictor(ep.query_x)
    require(torch.equal(p1, p2), "calling the same predictor twice on the same queries must give the same logits")
    p3 = predict(m, ep)
    require(torch.equal(p1, p3), "adapt() twice on the same support set must give identical predictions "
                                 f"(max abs difference {(p1 - p3).abs().max().item():.3g}); test episodes must "
                                 "score the same whenever they are evaluated (seed any randomness per call)")
    return None


@check
def check_adapt_many(s: Subject) -> str | None:
    """adapt_many (what evaluate calls) gives the predictions of adapt, task by task and in order.

    Up to round-off: a batched inner loop sums in another order, and a few inner steps at a large
    learning rate amplify float32 round-off (measured up to 6e-3 on logits of scale ~3 for MAML's
    task-batched path, whose float64 meta-gradients match the per-task path to 1e-9), so the
    tolerance is 1% of the logits' scale, far below what a wrong task order or parameter gives."""
    m = s.ready()
    m.fit(s.train_stream(), 1)
    eps = [s.episode(index=i) for i in range(3)]
    predictors = m.adapt_many([(ep.support_x, ep.support_y) for ep in eps])
    require(len(predictors) == len(eps), f"adapt_many must return one predictor per support set: got "
                                         f"{len(predictors)} for {len(eps)}")
    for i, (predictor, ep) in enumerate(zip(predictors, eps)):
        with torch.no_grad():
            many = predictor(ep.query_x).detach()
        one = predict(m, ep)
        diff = (many.double() - one.double()).abs().max().item()
        scale = 1.0 + one.double().abs().max().item()
        require(many.shape == one.shape and diff <= 1e-2 * scale,
                f"support set {i}: adapt_many's predictions differ from adapt's (max abs difference {diff:.3g}, "
                f"more than 1% of the logits' scale {scale:.3g}); it must adapt each support set as adapt does")
    return None


@check
def check_query_independence(s: Subject) -> str | None:
    """Unless tagged transductive: a query's prediction does not depend on the other queries."""
    tags = s.tags
    if tags.transductive:
        raise NotApplicable(f"tagged transductive (bn_mode={tags.bn_mode!r}): predictions may use the query batch")
    m = s.ready()
    m.fit(s.train_stream(), 1)
    ep = s.episode(query=4)
    predictor = m.adapt(ep.support_x, ep.support_y)
    with torch.no_grad():
        full = predictor(ep.query_x)
        idx = torch.tensor([0, 5, 9, 14])
        part = predictor(ep.query_x[idx])
        alone = torch.cat([predictor(ep.query_x[i:i + 1]) for i in idx.tolist()])
    for what, got in (("a subset of the queries", part), ("each query alone", alone)):
        require(close(full[idx], got),
                f"predicting {what} changed their logits (max abs difference "
                f"{(full[idx] - got).abs().max().item():.3g}); a method not tagged transductive must predict each "
                "query independently of the others (e.g. no batch statistics over the query set), or declare "
                "Tags(transductive=True)")
    return None


@check
def check_query_permutation(s: Subject) -> str | None:
    """Shuffling the queries shuffles the logits the same way (also for transductive methods)."""
    m = s.ready()
    ep = s.episode()
    predictor = m.adapt(ep.support_x, ep.support_y)
    perm = torch.randperm(len(ep.query_y), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, shuffled = predictor(ep.query_x), predictor(ep.query_x[perm])
    require(close(full[perm], shuffled),
            "predicting the queries in another order must permute the logits the same way (max abs difference "
            f"{(full[perm] - shuffled).abs().max().item():.3g}): predictions may depend on the set of queries "
            "(when transductive), never on their order")
    return None


@check
def check_step_curve(s: Subject) -> str | None:
    """Recording the accuracy after each test-time inner step (evaluate's steps_upto) changes no main number,
    and its point at the method's test steps is the main accuracy."""
    m = s.ready()
    m.fit(s.train_stream(), 1)
    eps = [s.episode(index=i) for i in range(3)]
    upto = 2 * (m.test_steps or 0)
    plain, traced = m.evaluate(eps), m.evaluate(eps, steps_upto=upto)
    for i, (a, b) in enumerate(zip(plain, traced)):
        require((a["accuracy"], a["loss"]) == (b["accuracy"], b["loss"]),
                f"episode {i}: recording the per-step curve changed the main result (accuracy {a['accuracy']} -> "
                f"{b['accuracy']}, loss {a['loss']:.6g} -> {b['loss']:.6g}); steps beyond the test steps must not "
                "change the adapted parameters")
        points = {step: acc for step, acc, _ in b["steps"]}
        require((m.test_steps or 0) in points and points[m.test_steps or 0] == a["accuracy"],
                f"episode {i}: the curve's point at the test steps ({m.test_steps or 0}) is "
                f"{points.get(m.test_steps or 0)}, the main accuracy {a['accuracy']}")
        if getattr(m, "STEP_TRACE", False) or len(points) > 1:
            require(sorted(points) == list(range(max(upto, m.test_steps or 0) + 1)),
                    f"episode {i}: a method that records a curve (STEP_TRACE or its own) records steps "
                    f"0..{max(upto, m.test_steps or 0)}, got "
                    f"{sorted(points)}")
    return None


@check
def check_label_permutation_invariance(s: Subject) -> str | None:
    """A method declaring LABEL_PERMUTATION_INVARIANT: relabelling the classes permutes its logits' columns
    the same way and changes nothing else (up to round-off)."""
    from bench.axes import label_permutations, permuted

    if not getattr(s.cls, "LABEL_PERMUTATION_INVARIANT", False):
        raise NotApplicable("does not declare LABEL_PERMUTATION_INVARIANT")
    m = s.ready()
    m.fit(s.train_stream(), 1)
    for index in range(2):
        ep = s.episode(index=index)
        base = predict(m, ep)
        for perm in label_permutations(ep.spec_hash, ep.way, 4)[1:]:
            got = predict(m, permuted(ep, perm))[:, list(perm)]
            require(close(base, got),
                    f"episode {index}, labels permuted {list(perm)}: the logits are not the original ones with "
                    f"permuted columns (max abs difference {(base - got).abs().max().item():.3g}); a method that "
                    "declares LABEL_PERMUTATION_INVARIANT must not depend on which class gets which label")
    return None


@check
def check_adapt_uses_support(s: Subject) -> str | None:
    """Predictions follow the support labels: relabelling the support set changes the predictions."""
    m = s.ready()
    m.fit(s.train_stream(), 1)
    ep = s.episode()
    a = predict(m, ep)
    swapped = ep.support_y.clone()
    swapped[ep.support_y == 0], swapped[ep.support_y == 1] = 1, 0
    with torch.no_grad():
        b = m.adapt(ep.support_x, swapped)(ep.query_x)
    require(not torch.equal(a, b), "swapping the labels of two support classes did not change any prediction: "
                                   "adapt() must learn from the support set")
    return None


@check
def check_state_dict_weights_only(s: Subject) -> str | None:
    """state_dict holds tensors and primitives only: torch.load(weights_only=True) can read it."""
    m = s.ready()
    for when in ("after setup", "after fit"):
        if when == "after fit":
            m.fit(s.train_stream(), 2)
        state = m.state_dict()
        require(isinstance(state, dict), f"state_dict() must return a dict, got {type(state).__name__}")
        bad = non_primitive(state)
        require(bad is None, f"{when}: {bad}; state_dict must hold tensors and primitives only (including optimizer "
                             "and RNG state, e.g. a generator's get_state()), loadable with torch.load(weights_only=True)")
        try:
            save_load(state)
        except Exception as e:  # noqa: BLE001 - report any pickling problem
            raise CheckFailure(f"{when}: torch.save + torch.load(weights_only=True) failed: {e}") from e
    return None


@check
def check_state_dict_roundtrip(s: Subject) -> str | None:
    """A fresh instance loading a saved state_dict (through torch.save/load) predicts identically."""
    m = s.ready()
    m.fit(s.train_stream(), 2)
    state = m.state_dict()
    fresh = s.new()
    out = fresh.load_state_dict(save_load(state))
    require(out is fresh, "load_state_dict(state) must return self")
    d = first_difference(state, fresh.state_dict())
    require(d is None, f"a fresh instance (constructed, not set up) loading a state_dict must give back the same "
                       f"state_dict; {d}")
    ep = s.episode(index=3)
    a, b = predict(m, ep), predict(fresh, ep)
    require(torch.equal(a, b), "a fresh instance loading state_dict() must predict identically (max abs difference "
                               f"{(a - b).abs().max().item():.3g})")
    return None


@check
def check_fit_counts(s: Subject) -> str | None:
    """fit(stream, steps) returns self, adds `steps` to fit_steps and counts the episodes it consumed."""
    m = s.ready()
    stream = CountingStream(s.train_stream())
    out = m.fit(stream, 2)
    require(out is m, "fit() must return self")
    require(m.fit_steps == 2, f"fit(stream, 2) must leave fit_steps == 2, got {m.fit_steps}")
    require(m.fit_episodes == stream.taken,
            f"fit_episodes must count the episodes taken from the stream (the runner resumes the stream there): "
            f"took {stream.taken}, fit_episodes says {m.fit_episodes}")
    m.fit(stream, 1)
    require(m.fit_steps == 3 and m.fit_episodes == stream.taken,
            f"after fit(2) + fit(1): fit_steps {m.fit_steps} (want 3), fit_episodes {m.fit_episodes} (want {stream.taken})")
    return f"{stream.taken} episodes for 3 steps"


@check
def check_fit_deterministic(s: Subject) -> str | None:
    """Tagged deterministic: same seed and stream give identical state."""
    if not s.tags.deterministic:
        raise NotApplicable("tagged deterministic=False")
    a, b = s.ready(), s.ready()
    a.fit(s.train_stream(), 2)
    b.fit(s.train_stream(), 2)
    d = first_difference(a.state_dict(), b.state_dict())
    require(d is None, f"tagged deterministic: two instances with the same seed fit on the same stream must reach "
                       f"identical state_dicts; {d}")
    return None


@check
def check_fit_worker_independent(s: Subject) -> str | None:
    """PARALLEL_TASKS methods: fitting with 1 and with 3 task workers gives identical state.

    Catches a task_loss that writes shared state or draws from a shared generator: the tasks of a
    meta-batch then race on the thread pool (baselines/parallel.py); such a method must set
    PARALLEL_TASKS = False."""
    if not getattr(s.cls, "PARALLEL_TASKS", False):
        raise NotApplicable("tasks of a meta-batch run one after another (PARALLEL_TASKS is False)")
    if not s.tags.deterministic:
        raise NotApplicable("tagged deterministic=False")
    states = []
    for workers in ("1", "3"):
        with workers_set(workers):
            m = s.ready()
            m.fit(s.train_stream(), 2)
            states.append(m.state_dict())
    d = first_difference(states[0], states[1])
    require(d is None, f"PARALLEL_TASKS is True, so the tasks of a meta-batch run concurrently, but 1 and 3 workers "
                       f"reach different states: {d}; task_loss must only read shared state (set PARALLEL_TASKS = "
                       "False if it writes any)")
    return None


@check
def check_evaluate_worker_independent(s: Subject) -> str | None:
    """TASK_BATCHED methods: evaluating with 1 and with 3 task workers gives identical rows, test-time step
    curves included (MAML's adapt_many adapts slices of a chunk side by side on the task pool, each on one
    thread; an inner_tasks that writes shared state would race there)."""
    if not getattr(s.cls, "TASK_BATCHED", False):
        raise NotApplicable("adapt_many does not adapt on the task pool (TASK_BATCHED is False)")
    if not s.tags.deterministic:
        raise NotApplicable("tagged deterministic=False")
    m = s.ready()
    m.fit(s.train_stream(), 1)
    eps = [s.episode(index=i) for i in range(6)]
    rows = []
    for workers in ("1", "3"):
        with workers_set(workers):
            rows.append(m.evaluate(eps, steps_upto=2))
    keys = ("accuracy", "loss", "steps")
    d = first_difference([{k: r.get(k) for k in keys} for r in rows[0]], [{k: r.get(k) for k in keys} for r in rows[1]],
                         "rows")
    require(d is None, f"evaluating with 1 and 3 task workers gives different rows: {d}; adapt_many's inner loop "
                       "must only read shared state")
    return None


@check
def check_fit_resumable(s: Subject) -> str | None:
    """fit(a) then fit(b) on the continuation of the stream equals fit(a + b)."""
    if not s.tags.deterministic:
        raise NotApplicable("tagged deterministic=False (resumption cannot be compared exactly)")
    whole = s.ready()
    whole.fit(s.train_stream(), 3)
    parts = s.ready()
    stream = s.train_stream()
    parts.fit(stream, 2)
    parts.fit(stream, 1)
    d = first_difference(whole.state_dict(), parts.state_dict())
    require(d is None, f"fit(a) then fit(b) must equal fit(a + b) (what makes checkpoint/resume free), but after "
                       f"fit(2) + fit(1) vs fit(3): {d}; keep every piece of training state (optimizer moments, "
                       "schedules, RNG, counters) across fit calls")
    return None


@check
def check_resume_from_state_dict(s: Subject) -> str | None:
    """fit(a), state_dict through torch.save/load into a fresh instance, fit(b) from fit_episodes == fit(a + b)."""
    if not s.tags.deterministic:
        raise NotApplicable("tagged deterministic=False (resumption cannot be compared exactly)")
    whole = s.ready()
    whole.fit(s.train_stream(), 3)
    first = s.ready()
    first.fit(s.train_stream(), 2)
    resumed = s.new().load_state_dict(save_load(first.state_dict()))
    resumed.fit(s.train_stream(start=resumed.fit_episodes), 1)
    d = first_difference(whole.state_dict(), resumed.state_dict())
    require(d is None, "a run resumed from state_dict() (fresh instance, stream restarted at fit_episodes) must "
                       f"reach the same state as an uninterrupted run: {d}; state_dict must include optimizer "
                       "and RNG state")
    return None


@check
def check_variable_way_fit(s: Subject) -> str | None:
    """Tagged variable_way: meta-training on a stream whose way changes every episode works (max_way 5)."""
    if not s.tags.variable_way:
        raise NotApplicable("tagged variable_way=False")
    m = s.new()
    m.setup(s.info(max_way=5, variable_way=True))

    def mixed() -> Iterator[Episode]:
        i = 0
        while True:
            for way in (2, 3, 5):
                yield episode_set(way, 1, 3).episode("train", i)
                i += 1

    m.fit(mixed(), 2)
    for way in (2, 3, 5):
        ep = s.episode(way, 1, 3, index=7)
        out = predict(m, ep)
        require(tuple(out.shape) == (len(ep.query_y), way) and bool(torch.isfinite(out).all()),
                f"after fitting on mixed ways, a {way}-way episode gave logits {list(out.shape)} "
                f"(want [{len(ep.query_y)}, {way}], finite)")
    return None


LEARN_BUDGET = {True: dict(steps=60, episodes=25), False: dict(steps=200, episodes=100)}
LEARN_GAIN, LEARN_ABOVE_CHANCE = 0.05, 0.15


@check
def check_learns(s: Subject) -> str | None:
    """A short fit on synthetic-5w1s clearly raises test accuracy: by 5 points over the unfitted
    method, to at least 15 points above the 20% chance of 5-way (paired, same test episodes)."""
    budget = LEARN_BUDGET[s.quick]
    m = s.ready()
    test = [episode_set(5, 1, 5).episode("test", i) for i in range(budget["episodes"])]
    before = accuracy(m, test)
    m.fit(s.train_stream(), budget["steps"])
    after = accuracy(m, test)
    note = f"accuracy {before:.3f} -> {after:.3f} after {budget['steps']} steps ({budget['episodes']} test episodes)"
    floor = 1 / 5 + LEARN_ABOVE_CHANCE
    require(after >= before + LEARN_GAIN and after >= floor,
            f"a short fit must clearly improve test accuracy (by {100 * LEARN_GAIN:.0f} points, to at least "
            f"{100 * floor:.0f}% for 5-way): {note}")
    return note


# --- running ------------------------------------------------------------------------------
def _describe_error(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno} ({tb[-1].name})" if tb else ""
    return f"raised {type(e).__name__}: {e}{where}"


def run_check(subject: Subject, name: str) -> CheckResult:
    """Run one check on a subject; exceptions are turned into a failed or excepted result."""
    fn = CHECKS.get(name)
    start = time.perf_counter()
    status, message = "passed", ""
    try:
        message = fn(subject) or ""
    except NotApplicable as e:
        status, message = "n/a", str(e)
    except CheckFailure as e:
        status, message = "failed", str(e)
    except Exception as e:  # noqa: BLE001 - a crash is a failure of the check, with where it happened
        status, message = "failed", _describe_error(e)
    reason = subject.exceptions.get(name)
    if reason:
        if status == "failed":
            status, message = "excepted", f"excepted: {reason} (failure: {message})"
        elif status == "passed":
            message = f"{message}; declared exception no longer needed ({reason})".lstrip("; ")
    return CheckResult(subject.name, name, status, message, time.perf_counter() - start)


def make_subject(target: str | type, quick: bool = True, params: dict[str, Any] | None = None) -> Subject:
    """The Subject of a registry name, "pkg.module:Class" or MetaLearner subclass (`params`: hyperparameters
    over the check-time ones, e.g. another backbone: {"backbone": "resnet12", "widths": "8-8-8-8"})."""
    name, cls, defaults = resolve(target)
    declared = getattr(cls, "CHECK_EXCEPTIONS", {}) or {}
    exceptions = dict(declared) if isinstance(declared, dict) else {}
    return Subject(name, cls, {**defaults, **(params or {})}, quick, exceptions)


def run_checks(target: str | type, quick: bool = True, only: list[str] | None = None,
               params: dict[str, Any] | None = None) -> list[CheckResult]:
    """Run the conformance suite (or the checks named in `only`) on a method.

    target: a registered method name, an importable "pkg.module:Class", or the class itself.
    quick: the seconds-long budgets (False: more ways/shots and a longer learning check).
    params: hyperparameters set over the check-time ones (`metabench check NAME --set key=value`).
    """
    names = list(CHECKS) if only is None else list(only)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise MetabenchError(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    subject = make_subject(target, quick, params)
    return [run_check(subject, n) for n in names]


def parametrize_with_checks(targets: list[str | type], quick: bool = True) -> Any:
    """A pytest decorator: one test per (method, conformance check), for a method author's own CI.

    ```python
    from bench.checks import parametrize_with_checks

    @parametrize_with_checks(["mypkg.module:MyMethod"])
    def test_conformance(method, check):
        check()  # fails the test with the check's report
    ```
    targets: registered names, "pkg.module:Class" strings or MetaLearner subclasses.
    """
    import pytest

    def runner(target: str | type, name: str) -> Callable[[], None]:
        def run() -> None:
            (result,) = run_checks(target, quick=quick, only=[name])
            if not result.ok:
                raise AssertionError(format_report([result]))

        return run

    cases, ids = [], []
    for target in targets:
        label = target if isinstance(target, str) else target.__qualname__
        for name in CHECKS:
            cases.append((target, runner(target, name)))
            ids.append(f"{label}-{name}")
    return pytest.mark.parametrize("method,check", cases, ids=ids)


def format_report(results: list[CheckResult]) -> str:
    """A plain-text report: one line per check, failures with their messages, and a summary."""
    if not results:
        return "no checks run"
    lines = [f"conformance checks of {results[0].method}:"]
    for r in results:
        line = f"  {r.status:8s} {r.check:34s} {r.seconds:6.1f}s"
        if r.message:
            line += f"  {r.message}"
        lines.append(line)
    counts = {st: sum(r.status == st for r in results) for st in ("passed", "failed", "excepted", "n/a")}
    summary = ", ".join(f"{n} {st}" for st, n in counts.items() if n)
    verdict = "OK" if all(r.ok for r in results) else "FAILED"
    lines.append(f"{verdict}: {summary} ({sum(r.seconds for r in results):.1f}s)")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    """`metabench check NAME|pkg.module:Class`: print the report; exit 1 on any failure."""
    from bench.cli import parse_overrides

    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_checks(args.method, quick=not args.full, only=args.only or None, params=parse_overrides(args.set))
    print(format_report(results))
    return 0 if all(r.ok for r in results) else 1


def add_cli(subparsers: Any) -> None:
    """Register the `check` command on the metabench command line."""
    s = subparsers.add_parser("check", help="run the conformance suite on a method (seconds, synthetic data)",
                              description="Run the MetaLearner conformance checks on a registered method or an "
                                          "importable pkg.module:Class; exits 1 when a check fails.")
    s.add_argument("method", help="a registered method or pkg.module:Class")
    s.add_argument("--full", action="store_true", help="more ways/shots and a longer learning check")
    s.add_argument("--only", action="append", default=[], metavar="CHECK", help="run only this check (repeatable)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter over the check-time ones, e.g. --set backbone=resnet12 --set widths=8-8-8-8")
    s.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the checks' tensors are tiny; 0 leaves torch's setting)")
    s.set_defaults(func=cmd_check)

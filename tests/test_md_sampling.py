"""The Meta-Dataset episode sampler against the official protocol, on the reference dataset specs.

The sampler needs only class counts and the ontology, so the shipped reference specs of the ten
sources (../shared/data/splits/meta_dataset/dataset_specs) are enough: no images. Three kinds of
checks: (1) step for step equality with a transcription of the official sampling functions
(meta_dataset/data/sampling.py) on the same random stream; (2) statistics of thousands of
episodes against the protocol's numbers (ranges and means of ways, query 10, support bounds, the
share of ILSVRC episodes that hit the 50-way cap, 6 ways at least in ILSVRC test); (3) the
foundation's guarantees (pure function of the index, multi-source streams, the fixed shape).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from bench import benchmarks
from bench.benchmarks import Benchmark
from bench.errors import MetabenchError
from bench.md_sampling import MDConfig, MDEpisodes, SplitSampler, describe_md
from bench.sampling import EpisodeSpec
from bench.sources.base import ArraySource
from bench.sources.meta_dataset import OFFICIAL, TRAIN_ALL, load_spec, parse_spec, source_key, spanning_leaves

N_EPISODES = 3000


@pytest.fixture(scope="module")
def specs(shared_data):
    folder = shared_data / "splits" / "meta_dataset" / "dataset_specs"
    return {name: load_spec(folder / f"{name}_dataset_spec.json") for name in OFFICIAL}


def bench(source="md-aircraft", seed=11, cfg=MDConfig(), train=()) -> Benchmark:
    return Benchmark("md-test", source, MDEpisodes(cfg, train), 84, "meta-dataset", 1, seed, 600, 600)


def sampler_table(specs, cfg=MDConfig()):
    cache = {}

    def get(source: str, split: str) -> SplitSampler:
        key = (source, split)
        if key not in cache:
            name = next(n for n in OFFICIAL if source_key(n) == source)
            cache[key] = SplitSampler.from_spec(specs[name], split, cfg, source)
        return cache[key]

    return get


def episodes(specs, source, split, n=N_EPISODES, **kw) -> list[EpisodeSpec]:
    b = bench(source, **kw)
    get = sampler_table(specs, b.protocol.config)
    return [describe_md(b, b.protocol, get, split, i) for i in range(n)]


# --- (1) the official functions, transcribed (RandomState calls -> the same Generator calls) -----

def official_sample(s: SplitSampler, rng: np.random.Generator):
    """meta_dataset/data/sampling.py EpisodeDescriptionSampler.sample_episode_description, defaults."""
    cfg = s.cfg
    if s.kind == "hierarchical":  # sample_class_ids, use_dag_hierarchy
        episode_classes = s.groups[rng.integers(len(s.groups))]
        if len(episode_classes) > cfg.max_ways_upper_bound:
            episode_classes = rng.choice(episode_classes, size=[cfg.max_ways_upper_bound], replace=False)
    elif s.kind == "bilevel":  # use_bilevel_hierarchy
        sup = s.groups[rng.integers(len(s.groups))]
        num_ways = rng.integers(low=cfg.min_ways, high=min(cfg.max_ways_upper_bound, len(sup)) + 1)
        episode_classes = rng.choice(sup, num_ways, replace=False)
    else:
        num_ways = rng.integers(low=cfg.min_ways, high=min(cfg.max_ways_upper_bound, len(s.classes)) + 1)
        episode_classes = rng.choice(s.classes, num_ways, replace=False)
    images_per_class = s.counts[episode_classes]
    num_query = np.minimum(cfg.max_num_query, (images_per_class // 2).min())  # compute_num_query
    num_remaining_per_class = images_per_class - num_query
    beta = rng.uniform()  # sample_support_set_size
    support_size_contributions = np.minimum(cfg.max_support_size_contrib_per_class, num_remaining_per_class)
    support_set_size = np.minimum(np.floor(beta * support_size_contributions + 1).sum(), cfg.max_support_set_size)
    remaining_support_set_size = support_set_size - len(num_remaining_per_class)  # sample_num_support_per_class
    unnormalized_proportions = images_per_class * np.exp(
        rng.uniform(cfg.min_log_weight, cfg.max_log_weight, size=images_per_class.shape))
    support_set_proportions = unnormalized_proportions / unnormalized_proportions.sum()
    num_desired_per_class = np.floor(support_set_proportions * remaining_support_set_size).astype("int32") + 1
    return episode_classes, np.minimum(num_desired_per_class, num_remaining_per_class), int(num_query)


@pytest.mark.parametrize("name,split", [("aircraft", "test"), ("fungi", "train"), ("omniglot", "test"),
                                        ("omniglot", "train"), ("ilsvrc_2012", "train"), ("ilsvrc_2012", "test"),
                                        ("quickdraw", "val"), ("mscoco", "test")])
def test_sampler_equals_official_transcription(specs, name, split):
    s = SplitSampler.from_spec(specs[name], split)
    for seed in range(300):
        ours = s.sample(np.random.default_rng(seed))
        ref = official_sample(s, np.random.default_rng(seed))
        assert np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1]) and ours[2] == ref[2]


def test_default_constants():
    c = MDConfig()
    assert (c.min_ways, c.max_ways_upper_bound, c.max_num_query, c.max_support_set_size,
            c.max_support_size_contrib_per_class) == (5, 50, 10, 500, 100)
    assert math.isclose(c.min_log_weight, math.log(0.5)) and math.isclose(c.max_log_weight, math.log(2))
    assert bench().protocol.config == c and bench().max_way == 50


def test_reference_specs_match_the_protocol(specs):
    for name, off in OFFICIAL.items():
        spec = specs[name]
        assert spec.kind == off.kind
        assert tuple(len(spec.splits[s]) for s in ("train", "val", "test")) == off.classes
        assert int(spec.images_per_class.sum()) == off.images
    assert [len(specs["omniglot"].superclass_splits[s]) for s in ("train", "val", "test")] == [25, 5, 20]
    assert specs["omniglot"].superclass_names[-1] and set(specs["omniglot"].images_per_class) == {20}


def test_spanning_leaves_of_a_small_dag():
    # a -> b, c ; b -> x, y ; c -> y, z (a DAG: y has two parents)
    graph = {"a": ["b", "c"], "b": ["x", "y"], "c": ["y", "z"], "x": [], "y": [], "z": []}
    assert spanning_leaves(graph) == [("a", ["x", "y", "z"]), ("b", ["x", "y"]), ("c", ["y", "z"])]


# --- (2) statistics against the protocol ----------------------------------------------------------

def ways_of(eps):
    return np.array([len(e.classes) for e in eps])


def check_common(eps, counts, max_contrib=100):
    for e in eps:
        n = len(e.classes)
        q = {len(x) for x in e.query}
        assert len(q) == 1
        q = q.pop()
        ipc = counts[list(e.classes)]
        assert q == min(10, int((ipc // 2).min()))
        shots = np.array([len(s) for s in e.support])
        assert (shots >= 1).all() and (shots <= ipc - q).all()
        assert n <= shots.sum() <= 500
        assert len(set(e.classes)) == n
        for s, qq in zip(e.support, e.query):
            assert not set(s) & set(qq) and len(set(s)) == len(s)


def within(sample, mean, var, n, k=5.0):
    """|sample - mean| below k standard errors."""
    return abs(sample - mean) <= k * math.sqrt(var / n)


def test_aircraft_test_episodes(specs):
    eps = episodes(specs, "md-aircraft", "test")
    check_common(eps, specs["aircraft"].images_per_class)
    w = ways_of(eps)
    assert w.min() == 5 and w.max() == 15  # U{5..min(50, 15 test classes)}
    assert within(w.mean(), 10.0, (11 ** 2 - 1) / 12, len(w))
    assert {len(e.query[0]) for e in eps} == {10}  # 100 images per class
    # support set size |S| = min(500, sum_c floor(beta * 90 + 1)): with equal class sizes
    # floor(beta*90)+1 = j+1, j uniform on 0..89; the shots add up to |S| minus rounding losses
    expect = np.mean([min(500, n * (j + 1)) for n in range(5, 16) for j in range(90)])
    total = np.array([sum(len(s) for s in e.support) for e in eps])
    assert total.mean() <= expect + 5 * total.std() / math.sqrt(len(total))
    assert total.mean() >= expect - w.mean()  # each class loses less than one example to the floor
    assert total.max() <= 500


def test_omniglot_episodes_use_one_alphabet(specs):
    spec = specs["omniglot"]
    alphabet = np.empty(spec.n_classes, dtype=np.int64)
    for k, ids in enumerate(spec.superclass_classes):
        alphabet[ids] = k
    for split in ("train", "val", "test"):
        eps = episodes(specs, "md-omniglot", split, n=1000 if split != "test" else N_EPISODES)
        check_common(eps, spec.images_per_class)
        sizes = {k: len(spec.superclass_classes[k]) for k in spec.superclass_splits[split]}
        for e in eps:
            (k,) = set(alphabet[list(e.classes)])  # one alphabet only
            assert k in sizes and 5 <= len(e.classes) <= min(50, sizes[k])
            assert len(e.query[0]) == 10 and all(len(s) <= 10 for s in e.support)
        if split == "test":
            w = ways_of(eps)
            ms = [min(50, m) for m in sizes.values()]
            mean = np.mean([(5 + m) / 2 for m in ms])
            second = np.mean([np.mean(np.arange(5, m + 1) ** 2) for m in ms])
            assert within(w.mean(), mean, second - mean ** 2, len(w))
            assert abs(mean - 18.975) < 1e-9  # the 20 evaluation alphabets


def test_ilsvrc_hierarchy(specs):
    spec = specs["ilsvrc_2012"]
    nodes = {s: SplitSampler.from_spec(spec, s).groups for s in ("train", "val", "test")}
    assert [len(nodes[s]) for s in ("train", "val", "test")] == [113, 18, 15]  # eligible: 5..392 leaves
    assert min(len(g) for g in nodes["test"]) == 6
    train = episodes(specs, "md-ilsvrc-2012", "train")
    check_common(train, spec.images_per_class)
    w = ways_of(train)
    assert w.min() >= 5 and w.max() == 50
    # a node of 50 or more leaves gives a 50-way episode: 16 nodes span more, one exactly 50
    assert sum(len(g) > 50 for g in nodes["train"]) == 16 and sum(len(g) == 50 for g in nodes["train"]) == 1
    share = np.mean([len(g) >= 50 for g in nodes["train"]])
    assert abs(share - 17 / 113) < 1e-12
    assert within((w == 50).mean(), share, share * (1 - share), len(w), k=3.0)
    mean = np.mean([min(50, len(g)) for g in nodes["train"]])
    assert within(w.mean(), mean, np.mean([min(50, len(g)) ** 2 for g in nodes["train"]]) - mean ** 2, len(w))
    # every episode's classes are the leaves (or 50 of them) of one eligible node
    leaf_sets = [set(g.tolist()) for g in nodes["train"]]
    assert all(any(set(e.classes) <= s and (len(s) > 50 or len(s) == len(e.classes)) for s in leaf_sets)
               for e in train[:300])
    test = episodes(specs, "md-ilsvrc-2012", "test")
    wt = ways_of(test)
    assert wt.min() == 6 and wt.max() == 50
    assert {len(e.query[0]) for e in test} == {10}


def test_all_datasets_regime_picks_sources_uniformly(specs):
    train = tuple(source_key(n) for n in TRAIN_ALL)
    eps = episodes(specs, "md-aircraft", "train", n=4000, train=train)
    got = {s: sum(e.source == s for e in eps) / len(eps) for s in train}
    assert set(got) == set(train) and all(within(p, 1 / 8, (1 / 8) * (7 / 8), len(eps)) for p in got.values())
    assert "md-traffic-sign" not in {e.source for e in eps}


def test_fixed_shape_option(specs):
    fixed = MDConfig(num_ways=5, num_support=5, num_query=15, use_hierarchy=False)
    eps = episodes(specs, "md-omniglot", "test", n=300, cfg=fixed)
    spec = specs["omniglot"]
    alphabet = {int(c): k for k, ids in enumerate(spec.superclass_classes) for c in ids}
    assert {len(e.classes) for e in eps} == {5}
    assert all(len(s) == 5 for e in eps for s in e.support) and all(len(q) == 15 for e in eps for q in e.query)
    assert any(len({alphabet[c] for c in e.classes}) > 1 for e in eps)  # ontology ignored


def test_splits_without_episodes_are_clear_errors(specs):
    with pytest.raises(MetabenchError, match="fewer than min_ways"):
        SplitSampler.from_spec(specs["traffic_sign"], "train")
    with pytest.raises(MetabenchError, match="fewer than min_ways"):
        SplitSampler.from_spec(specs["mscoco"], "train")


# --- (3) the foundation's guarantees ----------------------------------------------------------------

def test_pure_function_of_index_and_source_in_hash(specs):
    b = bench("md-aircraft", train=tuple(source_key(n) for n in TRAIN_ALL))
    get = sampler_table(specs)
    a = [describe_md(b, b.protocol, get, "train", i).hash for i in range(20)]
    assert a == [describe_md(b, b.protocol, get, "train", i).hash for i in reversed(range(20))][::-1]
    e = describe_md(b, b.protocol, get, "train", 3)
    assert '"source"' in e.to_json()
    assert EpisodeSpec("x", 1, "test", 0, (1,), ((0,),), ((1,),)).to_json() == (
        '{"benchmark":"x","classes":[1],"index":0,"query":[[1]],"split":"test","support":[[0]],"version":1}')


def _toy_source(name: str, spec_dict: dict, size: int = 8, channels: int = 1) -> ArraySource:
    spec = parse_spec(spec_dict)
    n = int(spec.images_per_class.sum())
    shape = (n, size, size) if channels == 1 else (n, size, size, 3)
    images = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    starts = np.concatenate([[0], np.cumsum(spec.images_per_class)[:-1]])
    return ArraySource(name, images, starts, spec.images_per_class.copy(), spec.class_names,
                       dict(spec.splits), meta={"spec": spec_dict})


def _plain(name, per_split, n_images):
    total = sum(per_split)
    return {"__class__": "DatasetSpecification", "name": name, "file_pattern": "{}.tfrecords",
            "classes_per_split": dict(zip(("TRAIN", "VALID", "TEST"), per_split)),
            "images_per_class": {str(i): n_images for i in range(total)},
            "class_names": {str(i): f"c{i}" for i in range(total)}}


def test_multi_source_episode_set_offsets_and_channels():
    toys = {"md-a": _toy_source("a", _plain("a", (6, 6, 6), 12)),
            "md-b": _toy_source("b", _plain("b", (7, 5, 5), 30), channels=3),
            "md-c": _toy_source("c", _plain("c", (0, 6, 8), 25))}
    b = Benchmark("md-toy", "md-c", MDEpisodes(MDConfig(), ("md-a", "md-b"), "md-b"), 8, "meta-dataset", 1, 5, 10, 10)
    es = benchmarks.load(b, Path("/nonexistent"), loader=lambda name, root, size: toys[name])
    info = es.task_info()
    assert info.image_shape == (3, 8, 8) and info.max_way == 50 and info.variable_way
    assert info.n_classes == 18 + 17 + 14 and es.sampler.offsets == {"md-a": 0, "md-b": 18, "md-c": 35}
    seen = set()
    for i in range(40):
        ep = es.episode("train", i)
        spec = es.describe("train", i)
        seen.add(spec.source)
        assert ep.support_x.shape[1:] == (3, 8, 8) and ep.support_x.dtype.is_floating_point
        assert ep.classes == tuple(es.sampler.offsets[spec.source] + c for c in spec.classes)
        assert ep.query_y.bincount().tolist() == [len(spec.query[0])] * ep.way
    assert seen == {"md-a", "md-b"}
    assert {es.describe("val", i).source for i in range(5)} == {"md-b"}
    assert {es.describe("test", i).source for i in range(5)} == {"md-c"}
    assert max(c for i in range(20) for c in es.episode("test", i).classes) < info.n_classes
    grey = es.episode("train", next(i for i in range(40) if es.describe("train", i).source == "md-a"))
    assert grey.support_x[:, 0].equal(grey.support_x[:, 1])  # a 1-channel source expanded to 3


# --- partial shapes, small classes, ignore_hierarchy_probability (official EpisodeDescriptionConfig) ---------

def test_fixed_shapes_exclude_classes_too_small_for_them(specs):
    """Deliberate: a class with fewer than shot + query images is never drawn (the official sampler keeps
    it and fails when an episode draws it); on Fungi 221/42/42 of 994/200/200 classes have < 20 images."""
    fungi = specs["fungi"]
    cfg = MDConfig(num_ways=5, num_support=10, num_query=10)
    for split, total, small in (("train", 994, 221), ("val", 200, 42), ("test", 200, 42)):
        ids = fungi.splits[split]
        assert len(ids) == total and int((fungi.images_per_class[ids] < 20).sum()) == small
        s = SplitSampler.from_spec(fungi, split, cfg)
        assert len(s.classes) == total - small and (fungi.images_per_class[s.classes] >= 20).all()
    eps = episodes(specs, "md-fungi", "test", n=500, cfg=cfg)
    assert all(fungi.images_per_class[list(e.classes)].min() >= 20 for e in eps)
    assert {len(x) for e in eps for x in e.support} == {10} and {len(x) for e in eps for x in e.query} == {10}
    # the same episodes as the official sampler with min_examples_in_class = shot + query
    same = episodes(specs, "md-fungi", "test", n=50, cfg=dataclasses.replace(cfg, min_examples_in_class=20))
    assert [e.hash for e in same] == [e.hash for e in eps[:50]]
    with pytest.raises(MetabenchError, match="have at least 110 images; cannot sample 5-way"):
        SplitSampler.from_spec(specs["aircraft"], "test", MDConfig(num_ways=5, num_support=100, num_query=10))


def test_fixed_ways_with_variable_shots(specs):
    cfg = MDConfig(num_ways=10)
    eps = episodes(specs, "md-aircraft", "test", n=500, cfg=cfg)
    check_common(eps, specs["aircraft"].images_per_class)
    assert set(ways_of(eps)) == {10}
    assert len({tuple(len(s) for s in e.support) for e in eps}) > 100  # shots vary per class and episode
    assert MDEpisodes(cfg).variable_way is False and MDEpisodes(cfg).max_way == 10


def test_support_range_and_fixed_support_with_derived_query(specs):
    fungi = specs["fungi"]
    cfg = MDConfig(num_support=(2, 6))
    eps = episodes(specs, "md-fungi", "train", n=500, cfg=cfg)
    shots = np.array([len(s) for e in eps for s in e.support])
    assert shots.min() == 2 and shots.max() == 6 and within(shots.mean(), 4.0, 2.0, len(shots))
    assert any(len({len(s) for s in e.support}) > 1 for e in eps)  # drawn per class
    for e in eps:  # compute_num_query: q = min(10, min_c |Im(c)| - 6); every class has at least 7 images
        ipc = fungi.images_per_class[list(e.classes)]
        assert ipc.min() >= 7 and {len(q) for q in e.query} == {min(10, int(ipc.min()) - 6)}
    # fixed support, derived query, Omniglot's alphabets kept (the ontology is ignored only with num_ways)
    spec = specs["omniglot"]
    alphabet = {int(c): k for k, ids in enumerate(spec.superclass_classes) for c in ids}
    eps = episodes(specs, "md-omniglot", "test", n=300, cfg=MDConfig(num_support=5))
    assert all(len({alphabet[c] for c in e.classes}) == 1 for e in eps)
    assert {len(s) for e in eps for s in e.support} == {5} and {len(q) for e in eps for q in e.query} == {10}
    assert len(set(ways_of(eps))) > 10


def test_partial_shapes_rows_and_config_errors():
    p = MDEpisodes(MDConfig(num_ways=5, num_support=(1, 3)))
    assert p.shape() == "partly fixed: 5-way, query <=10, 1-3 shots"
    assert p.row_problem(5, 10, 50) is None and p.row_problem(5, 16, 50) == "n_support 16 is outside 5..15 for way 5"
    assert "has 5" in p.row_problem(6, 10, 60)
    assert MDEpisodes(MDConfig(num_query=4)).row_problem(7, 30, 21) == \
        "n_query 21, but the protocol (partly fixed: ways 5-50, 4 query, support <=500) has 28"
    for bad in (dict(num_support=(5, 2)), dict(num_support=0), dict(num_ways=0), dict(num_query=True),
                dict(ignore_hierarchy_probability=1.5), dict(min_examples_in_class=-1)):
        with pytest.raises(MetabenchError, match="MDConfig"):
            MDConfig(**bad)
    assert MDConfig(num_support=[2, 4]).num_support == (2, 4)  # a TOML list


def test_ignore_hierarchy_probability(specs):
    spec = specs["ilsvrc_2012"]
    nodes = [set(g.tolist()) for g in SplitSampler.from_spec(spec, "train").groups]
    n = 1500
    eps = episodes(specs, "md-ilsvrc-2012", "train", n=n, cfg=MDConfig(ignore_hierarchy_probability=0.5))
    in_node = np.array([any(set(e.classes) <= g for g in nodes) for e in eps])
    # a uniform draw of >= 5 of the 712 classes lies under one node with negligible probability
    assert within(1 - in_node.mean(), 0.5, 0.25, n, k=4.0)
    assert ways_of([e for e, inside in zip(eps, in_node) if not inside]).max() > 40
    default = episodes(specs, "md-ilsvrc-2012", "train", n=20)
    zero = episodes(specs, "md-ilsvrc-2012", "train", n=20, cfg=MDConfig(ignore_hierarchy_probability=0.0))
    assert [e.hash for e in zero] == [e.hash for e in default]  # p = 0 draws nothing extra
    # only the DAG: Omniglot's alphabets are kept
    spec = specs["omniglot"]
    alphabet = {int(c): k for k, ids in enumerate(spec.superclass_classes) for c in ids}
    om = episodes(specs, "md-omniglot", "train", n=200, cfg=MDConfig(ignore_hierarchy_probability=1.0))
    assert all(len({alphabet[c] for c in e.classes}) == 1 for e in om)


def test_min_examples_in_class(specs):
    fungi = specs["fungi"]
    eps = episodes(specs, "md-fungi", "train", n=300, cfg=MDConfig(min_examples_in_class=100))
    assert all(fungi.images_per_class[list(e.classes)].min() >= 100 for e in eps)
    check_common(eps, fungi.images_per_class)

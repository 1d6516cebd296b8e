"""Parts from elsewhere: an installed package adds a method and a benchmark through entry points,
and the CLI lists, checks and runs them; a benchmark of one's own from a TOML file or an object."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import benchmarks
from bench.errors import MetabenchError, UnknownNameError
from bench.runner import RunConfig, RunDirs, run
from bench.sampling import FixedEpisodes

REPO = Path(__file__).resolve().parent.parent

PLUGIN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "metabench-plugin-demo"
        version = "0.1"

        [project.entry-points."metabench.methods"]
        head-maml = "plugin_demo.methods:HeadMAML"

        [project.entry-points."metabench.benchmarks"]
        plugin-3w1s = "plugin_demo.methods:BENCH"

        [tool.setuptools]
        packages = ["plugin_demo"]
    """,
    "plugin_demo/__init__.py": "",
    "plugin_demo/methods.py": """
        from dataclasses import dataclass
        from typing import ClassVar, Mapping

        from bench.api import Preset
        from bench.benchmarks import Benchmark
        from bench.sampling import FixedEpisodes
        from baselines.maml import MAML


        @dataclass
        class HeadMAML(MAML):
            \"\"\"MAML adapting only the head.\"\"\"

            PARALLEL_TASKS: ClassVar[bool] = True
            PRESETS: ClassVar[Mapping[str, Preset]] = {
                "plugin": Preset(dict(hidden=8, meta_batch=2, inner_steps_test=2), 2, "A plugin paper. 2026")}

            def adapted_keys(self):
                return ["head.weight", "head.bias"]


        BENCH = Benchmark("plugin-3w1s", "synthetic", FixedEpisodes(3, 1, 2), 28, "plugin", seed=5,
                          test_episodes=6, val_episodes=3)
    """,
}


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The plugin package really installed (pip) into a temporary folder."""
    src, site = tmp_path_factory.mktemp("plugin-src"), tmp_path_factory.mktemp("plugin-site")
    for rel, text in PLUGIN.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(textwrap.dedent(text))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(src)], check=True, capture_output=True)
    return site


def metabench(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "OMP_NUM_THREADS": "1",
           "METABENCH_ALLOCATOR": "glibc"}
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=env,
                          cwd=site, timeout=600)


@pytest.mark.slow
def test_installed_package_adds_a_method_and_a_benchmark(plugin_site, tmp_path):
    ls = metabench(plugin_site, "ls")
    assert ls.returncode == 0, ls.stderr
    assert "head-maml" in ls.stdout and "plugin_demo.methods:HeadMAML" in ls.stdout
    assert "plugin-3w1s" in ls.stdout and "3-way 1-shot 2 query" in ls.stdout

    check = metabench(plugin_site, "check", "head-maml", "--only", "check_interface", "--only", "check_adapt_shapes",
                      "--only", "check_adapt_many")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "OK: 3 passed" in check.stdout

    # no --steps: the plugin benchmark names the preset key "plugin", whose preset says 2 steps
    out = metabench(plugin_site, "run", "head-maml", "plugin-3w1s", "--results", str(tmp_path / "results"),
                    "--runs", str(tmp_path / "runs"), "--root", str(tmp_path / "root"), "--chunk", "1")
    assert out.returncode == 0, out.stderr
    card = json.loads((tmp_path / "results" / "plugin-3w1s" / "head-maml" / "seed0.json").read_text())
    assert card["fit_steps"] == 2 and card["params"]["hidden"] == 8 and card["test_episodes"] == 6


BENCH_TOML = """
name = "synthetic-toml-3w2s"
source = "synthetic"
image_size = 28
seed = 99
test_episodes = 8
val_episodes = 4
[protocol]
kind = "fixed"
way = 3
shot = 2
query = 4
train_query = 1
"""


def test_benchmark_from_a_toml_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(BENCH_TOML)
    b = benchmarks.get_benchmark(str(path))
    assert b.protocol == FixedEpisodes(3, 2, 4, train_query=1) and b.preset == "" and b.test_episodes == 8
    es = benchmarks.load(b, tmp_path)
    train, test = es.episode("train", 0), es.episode("test", 0)
    assert len(train.query_y) == 3 * 1 and len(test.query_y) == 3 * 4  # train and test query counts differ
    assert len(test.support_y) == 6


@pytest.mark.parametrize("text, message", [
    ("name = 'x'\nsource = 'synthetic'\nimage_size = 28\n", "missing 'protocol'"),
    ("colour = 'red'\n" + BENCH_TOML, "unknown key"),
    (BENCH_TOML.replace('kind = "fixed"', 'kind = "weird"'), "unknown protocol kind 'weird'"),
    (BENCH_TOML.replace("way = 3", "way = 'three'"), "way must be a positive whole number"),
    (BENCH_TOML.replace("way = 3", "ways = 3"), "bad \\[protocol\\] fields"),
    (BENCH_TOML.replace('"synthetic-toml-3w2s"', '"glyphs-5w1s"'), "is a registered benchmark"),
    (BENCH_TOML.replace('source = "synthetic"', 'source = "synthetik"'), "Did you mean 'synthetic'"),
    ("name = [", "cannot read the benchmark file"),
], ids=["no-protocol", "unknown-key", "unknown-kind", "bad-way", "bad-field", "taken-name", "unknown-source",
        "not-toml"])
def test_bad_benchmark_files_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(MetabenchError, match=message) as e:
        benchmarks.get_benchmark(str(path))
    assert str(path) in str(e.value) or isinstance(e.value, UnknownNameError)


def test_runner_takes_a_benchmark_object_and_requires_steps_without_a_preset(tmp_path):
    mine = dataclasses.replace(benchmarks.SYNTHETIC, name="synthetic-20w-mine", protocol=FixedEpisodes(3, 1, 2),
                               preset="", test_episodes=4, val_episodes=2)
    dirs = RunDirs(tmp_path / "root", tmp_path / "results", tmp_path / "runs")
    with pytest.raises(MetabenchError, match="pass --steps"):
        run(RunConfig("maml", mine, overrides=dict(hidden=4, meta_batch=1)), dirs, progress=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
    csv = run(RunConfig("maml", mine, steps=2, chunk=1, overrides=dict(hidden=4, meta_batch=1, inner_steps_test=1)),
              dirs, progress=False)
    assert csv.parent.parent == tmp_path / "results" / "synthetic-20w-mine" and csv.name == "seed0.csv"
    assert csv.parent.name.startswith("maml+")  # overrides give the run a variant label
    assert (tmp_path / "runs" / "synthetic-20w-mine" / "maml").is_dir()


def test_unknown_benchmark_target_is_a_clear_error():
    with pytest.raises(MetabenchError, match="cannot import benchmark"):
        benchmarks.get_benchmark("nowhere.at_all:BENCH")
    with pytest.raises(MetabenchError, match="not a bench.benchmarks.Benchmark"):
        benchmarks.get_benchmark("math:pi")

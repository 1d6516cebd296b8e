"""The public surface of `bench` from Python, as README.md's "From Python" section shows it (run here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import bench

REPO = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_from_python_snippet_runs(tmp_path):
    env = {"PYTHONPATH": str(REPO), "METABENCH_ROOT": str(tmp_path / "root"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", readme_snippet()], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"0\.\d{3} over 50 episodes\n", out.stdout)


def test_public_surface(tmp_path):
    assert set(bench.__all__) >= {"load_benchmark", "episodes", "make_method", "evaluate", "read_results", "summarize"}
    es = bench.load_benchmark("synthetic-5w1s")
    assert bench.load_benchmark(es) is es
    eps = list(bench.episodes(es, "val"))
    assert len(eps) == es.bench.val_episodes and [e.index for e in eps[:3]] == [0, 1, 2]
    learner = bench.make_method("chance", es)
    scores = bench.evaluate(learner, es, n=5)
    assert list(scores.columns[:4]) == ["benchmark", "split", "episode", "episode_hash"]
    assert scores["accuracy"].tolist() == [0.2] * 5 and (scores["adapt_batch"] == 1).all()
    zoo = bench.read_results(REPO / "results" / "zoo")
    table = bench.summarize(zoo)
    assert {"mean", "ci95", "n_seeds"} <= set(table.columns) and len(table) == zoo["method"].nunique()


def test_import_bench_is_light():
    out = subprocess.run([sys.executable, "-c", "import sys, bench; print('torch' in sys.modules, 'pandas' in sys.modules)"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}, timeout=60)
    assert out.stdout.split() == ["False", "False"]

"""Benchmarks: the registry, and the golden file of spec hashes that guards against silent drift.

To regenerate after an intended change (which must also bump the benchmark's version):
    METABENCH_UPDATE_GOLDEN=1 pytest tests/test_benchmarks.py -m ""
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import benchmarks
from bench.errors import DataError, UnknownNameError

GOLDEN = Path(__file__).parent / "golden" / "spec_hashes.json"
N_GOLDEN = 5


def test_registry_names_and_fields():
    for name in benchmarks.BENCHMARKS:
        b = benchmarks.get_benchmark(name)
        assert name == b.name
        assert b.test_episodes == 600 or b.source == "synthetic"
        assert b.version >= 1 and b.max_way >= 2 and b.protocol.shape()
    for name in ("glyphs-5w1s", "glyphs-5w5s", "glyphs-20w1s", "glyphs-20w5s"):
        b = benchmarks.get_benchmark(name)
        assert b.protocol.query == 15 and b.test_episodes == 600


def test_unknown_benchmark():
    with pytest.raises(UnknownNameError, match="glyphs-5w1s"):
        benchmarks.get_benchmark("glyph-5w1s")


def current_hashes(name: str, root: Path) -> dict:
    es = benchmarks.load(name, root)
    return {"version": es.bench.version,
            **{split: [es.describe(split, i).hash for i in range(N_GOLDEN)] for split in ("train", "val", "test")}}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(benchmarks.BENCHMARKS))
def test_golden_spec_hashes(name, data_root):
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    try:
        got = current_hashes(name, data_root)
    except DataError as e:
        pytest.skip(f"source of {name} not available here: {e}")
    if os.environ.get("METABENCH_UPDATE_GOLDEN"):
        golden[name] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert name in golden, f"{name} has no golden spec hashes; regenerate (see module docstring)"
    want = golden[name]
    assert got["version"] == want["version"], f"{name} is now v{got['version']}: regenerate the golden file"
    assert got == want, f"episodes of {name} v{got['version']} changed without a version bump"

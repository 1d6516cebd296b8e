"""Tests of the static leaderboard: site builds, escaping, determinism, tables, cards, references,
what may be ranked, what is verified, re-validation of bundles."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import json

import numpy as np
import pytest

from bench.cli import main
from bench.errors import ResultsError
from bench.results import write_run
from bundlefixtures import BENCH, chance_bundles, edit_csv, edit_json, snapshot
from leaderboard import build_site
from leaderboard.build import environment, page_name, read_reference

OMNI, MINI = "toy-5w1s", "toy-5w5s"  # unregistered benchmarks: a ranked row needs the most episodes any method has

EVIL = "<script>alert(1)</script>"
EVIL_CARD = '"><img src=x onerror=alert(2)>'
EVIL_CITATION = "<b onmouseover=alert(3)>Doe et al.</b>"


def make_rows(benchmark: str, method: str, seed: int, accs, fit_seconds: float = 10.0) -> list[dict]:
    return [{
        "benchmark": benchmark, "benchmark_version": 1, "split": "test", "episode": i,
        "episode_hash": f"{benchmark}-h{i:04d}", "method": method, "params_hash": "p0", "seed": seed,
        "code_rev": "rev-from-csv", "device": "cpu", "way": 5, "n_support": 1, "n_query": 15,
        "accuracy": float(a), "loss": 1.0, "adapt_seconds": 0.01, "fit_episodes": 100,
        "fit_seconds": fit_seconds,
    } for i, a in enumerate(accs)]


def full_card(method: str, benchmark: str, seed: int, verified: bool | None = None) -> dict:
    card = {
        "method": method, "benchmark": benchmark, "benchmark_version": 1, "seed": seed,
        "params": {"inner_lr": 0.4, "meta_lr": 0.001, "first_order": False}, "params_hash": "p0",
        "tags": {"bn_mode": "transductive", "order": "second", "variable_way": False, "deterministic": True},
        "backbone": "conv4-64", "inner_steps_train": 5, "inner_steps_test": 10, "code_rev": "deadbeef",
        "device": "cpu", "torch_version": "2.3.0", "fit_steps": 200, "fit_episodes": 800, "fit_seconds": 12.5,
        "selected_step": 150,
        "curve": [{"step": s, "fit_episodes": 4 * s, "fit_seconds": 0.1 * s,
                   "val_accuracy": 0.3 + 0.002 * s + 0.01 * seed} for s in range(0, 201, 50)],
    }
    if verified is not None:
        card["verified"] = verified
    return card


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Two benchmarks; maml (3 seeds, its cards claim "verified": true), twin (partial card, ties with
    maml on toy-5w1s), EVIL (no card, clearly worse), anil (only on toy-5w1s), each with 3 seeds;
    unranked: lonely (1 seed) and short (30 of the 40 test episodes)."""
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    n = 40
    for bench, shift in ((OMNI, 0.1), (MINI, -0.1)):
        base = np.clip(rng.uniform(0.4, 0.8, n) + shift, 0, 1)
        for seed in (0, 1, 2):
            write_run(root, make_rows(bench, "maml", seed, base + 0.005 * (seed - 1)),
                      full_card("maml", bench, seed, verified=True))
            noise = np.tile([0.02, -0.02], n // 2)
            noise[0] = 0.04
            twin_shift = 0.0 if bench == OMNI else -0.1
            write_run(root, make_rows(bench, "twin", seed, np.clip(base - noise + twin_shift, 0, 1)),
                      {"method": "twin", "backbone": EVIL_CARD, "tags": {"order": "first"}, "verified": False})
            write_run(root, make_rows(bench, EVIL, seed, np.clip(base - 0.3, 0, 1)), {})
        write_run(root, make_rows(bench, "lonely", 0, np.clip(base + 0.2, 0, 1)), {})
        write_run(root, make_rows(bench, "short", 0, np.clip(base[:30], 0, 1)), {})
    base = rng.uniform(0.4, 0.8, n)
    for seed in (0, 1, 2):
        write_run(root, make_rows(OMNI, "anil", seed, np.clip(base - 0.05, 0, 1)),
                  full_card("anil", OMNI, seed) | {"verified": "yes"})
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "reference.csv"
    path.write_text("method,benchmark,accuracy,ci95,citation\n"
                    f"MAML (paper),{OMNI},98.7,0.4,Finn et al. 2017\n"
                    f"MAML (paper),{MINI},63.11,0.92,Finn et al. 2017\n"
                    f"Evil (paper),{OMNI},50.0,,\"{EVIL_CITATION}\"\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def site(results, reference, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    index = build_site([results], out, reference_csv=reference, n_boot=300)
    assert index == out / "index.html"
    return out


class Table(HTMLParser):
    """Collects rows (data-method, [(data-value, text) per cell]) of the table with a given id."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id = table_id
        self.depth = 0
        self.headers: list[dict] = []
        self.rows: list[dict] = []
        self._cell: dict | None = None
        self._in_head = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and (self.depth or attrs.get("id") == self.table_id):
            self.depth += 1
            return
        if not self.depth:
            return
        if tag == "thead":
            self._in_head = True
        elif tag == "th" and self._in_head:
            self.headers.append(attrs)
        elif tag == "tr" and not self._in_head:
            self.rows.append({"attrs": attrs, "cells": []})
        elif tag == "td" and self.rows and self._cell is None:
            self._cell = {"attrs": attrs, "text": ""}
            self.rows[-1]["cells"].append(self._cell)
        elif tag == "strong" and self._cell is not None:
            self._cell["strong"] = True

    def handle_endtag(self, tag):
        if not self.depth:
            return
        if tag == "table":
            self.depth -= 1
        elif tag == "thead":
            self._in_head = False
        elif tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def parse_table(html: str, table_id: str) -> Table:
    t = Table(table_id)
    t.feed(html)
    assert t.headers, f"no table#{table_id}"
    return t


def test_site_files(site):
    names = sorted(p.name for p in site.iterdir())
    assert names == ["index.html", "miniimagenet-5w5s.html", "omniglot-5w1s.html"]
    for path in site.iterdir():
        assert path.stat().st_mode & 0o444 == 0o444  # world-readable, ready to publish
        html = path.read_text(encoding="utf-8")
        assert html.startswith("<!DOCTYPE html>")
        # self-contained: no external scripts, styles or images
        assert "<link" not in html
        assert not re.search(r'\s(src|href)="(https?:)?//', html)
        assert not re.search(r"<script[^>]+src=", html)


def test_main_table(site):
    html = (site / "index.html").read_text(encoding="utf-8")
    t = parse_table(html, "leaderboard")
    keys = [h.get("data-key") for h in t.headers]
    assert keys == ["method", "bench:miniimagenet-5w5s", "bench:omniglot-5w1s", "avg-rank"]
    methods = [r["attrs"]["data-method"] for r in t.rows]
    assert set(methods) == {"maml", "twin", "anil", EVIL}
    assert methods[0] == "maml"  # ordered by average rank
    rows = {r["attrs"]["data-method"]: r for r in t.rows}
    omni = 2
    # maml and twin tie on omniglot: both bold; the others not
    assert rows["maml"]["cells"][omni].get("strong") and rows["twin"]["cells"][omni].get("strong")
    assert not rows["anil"]["cells"][omni].get("strong")
    assert rows["maml"]["cells"][omni]["attrs"]["data-rank"] == "1"
    assert rows[EVIL]["cells"][omni]["attrs"]["data-rank"] == "4"
    # cell text: mean ± ci95 in percent
    assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", rows["maml"]["cells"][omni]["text"])
    assert 0 < float(rows["maml"]["cells"][omni]["attrs"]["data-value"]) < 1
    # anil misses a benchmark: a dash, and its average rank says over how many benchmarks
    assert rows["anil"]["cells"][1]["text"] == "—" and rows["anil"]["cells"][1]["attrs"]["data-value"] == ""
    assert rows["anil"]["cells"][3]["text"].endswith("(1/2)")
    assert rows["maml"]["cells"][3]["text"] == "1.00"
    assert "accuracy-figure" in html and "data:image/svg+xml;base64," in html


def test_sorting_script_and_hooks(site):
    html = (site / "index.html").read_text(encoding="utf-8")
    assert 'id="leaderboard"' in html and 'class="sortable"' in html
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    assert "table.sortable" in script and "addEventListener" in script and "aria-sort" in script
    t = parse_table(html, "leaderboard")
    for h in t.headers:
        assert h.get("data-type") in ("number", "text")
        assert h.get("data-default-order") in ("asc", "desc")
    node = shutil.which("node")
    if node:  # syntax check of the inline script
        js = Path(site.parent / "sort-check.js")
        js.write_text(script, encoding="utf-8")
        subprocess.run([node, "--check", str(js)], check=True)


def test_verified_and_self_reported_badges(site):
    html = (site / "index.html").read_text(encoding="utf-8")
    rows = {r["attrs"]["data-method"]: r["attrs"] for r in parse_table(html, "leaderboard").rows}
    assert rows["maml"]["data-verified"] == "true"
    assert rows["twin"]["data-verified"] == "false"
    assert rows["anil"]["data-verified"] == "false"  # "verified": "yes" is not true
    assert rows[EVIL]["data-verified"] == "false"
    assert html.count("&#10003; verified") == 1
    assert html.count("badge self-reported") == 3


def test_protocol_cards(site):
    html = (site / "omniglot-5w1s.html").read_text(encoding="utf-8")
    maml = re.search(r'<tr data-method="maml".*?</tr>', html, re.S).group(0)
    for text in ("<dt>batch norm</dt><dd>transductive</dd>", "<dt>order</dt><dd>second</dd>",
                 "<dt>inner steps (train)</dt><dd>5</dd>", "<dt>inner steps (test)</dt><dd>10</dd>",
                 "<dt>backbone</dt><dd>conv4-64</dd>", "<dt>seeds</dt><dd>2</dd>",
                 "<dt>test episodes</dt><dd>40</dd>", "<dt>code revision</dt><dd>deadbeef</dd>",
                 "<dt>hyperparameters</dt><dd>first_order=no, inner_lr=0.4, meta_lr=0.001</dd>"):
        assert text in maml, text
    twin = re.search(r'<tr data-method="twin".*?</tr>', html, re.S).group(0)
    assert "<dt>order</dt><dd>first</dd>" in twin
    assert "<dt>batch norm</dt><dd>?</dd>" in twin and "<dt>hyperparameters</dt><dd>?</dd>" in twin
    # without a card: '?' except what the CSV says
    evil = html[html.index('<tr data-method="&lt;script&gt;'):]
    evil = evil[:evil.index("</tr>")]
    assert "<dt>backbone</dt><dd>?</dd>" in evil and "<dt>code revision</dt><dd>rev-from-csv</dd>" in evil


def test_escaping(site):
    for path in site.iterdir():
        html = path.read_text(encoding="utf-8")
        assert EVIL not in html
        assert "alert(1)" not in html or "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<img src=x" not in html
        assert "<b onmouseover" not in html
        assert html.count("<script>") == 1  # only the sorting script
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index
    bench = (site / "omniglot-5w1s.html").read_text(encoding="utf-8")
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in bench
    assert "&lt;b onmouseover=alert(3)&gt;Doe et al.&lt;/b&gt;" in index


def test_reference_rows_are_separate(site):
    html = (site / "index.html").read_text(encoding="utf-8")
    main = parse_table(html, "leaderboard")
    assert not any("paper" in r["attrs"]["data-method"] for r in main.rows)
    ref = parse_table(html, "reference")
    assert [r["attrs"]["data-method"] for r in ref.rows] == ["Evil (paper)", "MAML (paper)"]
    assert all(r["attrs"]["data-reference"] == "true" for r in ref.rows)
    assert html.index('id="published"') > html.index('id="leaderboard"')
    maml = ref.rows[1]["cells"]
    assert maml[1]["text"] == "63.11 ± 0.92" and maml[2]["text"] == "98.70 ± 0.40"
    assert maml[3]["text"] == "Finn et al. 2017"
    assert ref.rows[0]["cells"][2]["text"] == "50.00"  # no CI given
    assert "Published numbers" in html
    bench = (site / "miniimagenet-5w5s.html").read_text(encoding="utf-8")
    assert [r["attrs"]["data-method"] for r in parse_table(bench, "reference").rows] == ["MAML (paper)"]


def test_benchmark_page(site):
    html = (site / "omniglot-5w1s.html").read_text(encoding="utf-8")
    t = parse_table(html, "benchmark-table")
    ranks = {r["attrs"]["data-method"]: r["cells"][1]["text"] for r in t.rows}
    assert ranks == {"maml": "1", "twin": "1", "anil": "3", EVIL: "4"}
    maml = next(r for r in t.rows if r["attrs"]["data-method"] == "maml")
    assert "±" in maml["cells"][3]["text"]  # seed spread for two seeds
    pairs = parse_table(html, "pairs")
    assert len(pairs.rows) == 6  # every pair of 4 methods
    assert all(re.fullmatch(r"\[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", r["cells"][3]["text"]) for r in pairs.rows)
    for key in ("figure-accuracy", "figure-paired", "figure-curves", "figure-compute"):
        assert f'id="{key}"' in html
    assert 'href="index.html"' in html
    index = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="omniglot-5w1s.html"' in index and 'href="miniimagenet-5w5s.html"' in index


def test_single_method_benchmark(tmp_path):
    write_run(tmp_path / "r", make_rows("b1", "solo", 0, np.linspace(0.2, 0.8, 20)), {})
    index = build_site([tmp_path / "r"], tmp_path / "site", n_boot=50)
    page = (tmp_path / "site" / "b1.html").read_text(encoding="utf-8")
    assert "Only one method on this benchmark." in page and 'id="figure-paired"' not in page
    rows = parse_table(index.read_text(encoding="utf-8"), "leaderboard").rows
    assert [r["attrs"]["data-method"] for r in rows] == ["solo"]
    assert rows[0]["cells"][1].get("strong")


def test_reference_file_checks(tmp_path):
    frac = tmp_path / "frac.csv"
    frac.write_text("method,benchmark,accuracy,ci95,citation\nX,b1,0.55,0.01,Y 2020\n", encoding="utf-8")
    ref = read_reference(frac)
    assert ref["accuracy"].tolist() == [0.55] and ref["ci95"].tolist() == [0.01]
    bad = tmp_path / "bad.csv"
    bad.write_text("method,benchmark,accuracy\nX,b1,0.5\n", encoding="utf-8")
    with pytest.raises(ResultsError, match="citation"):
        read_reference(bad)
    nan = tmp_path / "nan.csv"
    nan.write_text("method,benchmark,accuracy,ci95,citation\nX,b1,abc,,Y\n", encoding="utf-8")
    with pytest.raises(ResultsError, match="row 2"):
        read_reference(nan)


def test_build_is_deterministic(results, reference, site, tmp_path):
    out = tmp_path / "again"
    build_site([results], out, reference_csv=reference, n_boot=300)
    first = {p.name: p.read_bytes() for p in site.iterdir()}
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_several_result_dirs_and_duplicates(results, tmp_path):
    extra = tmp_path / "extra"
    write_run(extra, make_rows("omniglot-5w1s", "protonet", 0, np.full(40, 0.5)), {})
    out = build_site([results, extra], tmp_path / "site", n_boot=100)
    assert 'data-method="protonet"' in out.read_text(encoding="utf-8")
    dup = tmp_path / "dup"
    write_run(dup, make_rows("omniglot-5w1s", "maml", 0, np.full(40, 0.5)), {})
    with pytest.raises(ResultsError, match="also in"):
        build_site([results, dup], tmp_path / "site2")


def test_templates_are_package_resources():
    env = environment()
    assert env.autoescape is True
    for name in ("base.html", "index.html", "benchmark.html", "_macros.html"):
        assert env.get_template(name) is not None


def test_page_names_are_safe():
    assert page_name("omniglot-5w1s") == "omniglot-5w1s.html"
    for weird in ("../etc/passwd", "index", "a b", EVIL):
        name = page_name(weird)
        assert re.fullmatch(r"[A-Za-z0-9._-]+\.html", name) and name != "index.html" and "/" not in name

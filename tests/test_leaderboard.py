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
        elif tag == "span" and self._cell is not None and attrs.get("class") == "cell-meta":
            self._cell["in_meta"] = True

    def handle_endtag(self, tag):
        if not self.depth:
            return
        if tag == "table":
            self.depth -= 1
        elif tag == "thead":
            self._in_head = False
        elif tag == "td":
            self._cell = None
        elif tag == "span":
            self.handle_endtag_span()

    def handle_endtag_span(self):
        if self._cell is not None:
            self._cell["in_meta"] = False

    def handle_data(self, data):
        if self._cell is not None:
            key = "meta" if self._cell.get("in_meta") else "text"
            self._cell[key] = self._cell.get(key, "") + data


def parse_table(html: str, table_id: str) -> Table:
    t = Table(table_id)
    t.feed(html)
    assert t.headers, f"no table#{table_id}"
    return t


def test_site_files(site):
    names = sorted(p.name for p in site.iterdir())
    assert names == ["figures", "index.html", f"{OMNI}.html", f"{MINI}.html"]
    figures = sorted(p.name for p in (site / "figures").iterdir())
    stems = ["accuracy"] + [f"{b}-{k}" for b in (OMNI, MINI) for k in ("accuracy", "compute", "curves", "paired")]
    assert figures == sorted(f"{stem}.{ext}" for stem in stems for ext in ("png", "svg"))
    assert (site / "figures" / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    for path in [*site.glob("*.html"), *(site / "figures").iterdir()]:
        assert path.stat().st_mode & 0o444 == 0o444  # world-readable, ready to publish
    for path in site.glob("*.html"):
        html = path.read_text(encoding="utf-8")
        assert html.startswith("<!DOCTYPE html>")
        # self-contained: no external scripts, styles or images
        assert "<link" not in html
        assert not re.search(r'\s(src|href)="(https?:)?//', html)
        assert not re.search(r"<script[^>]+src=", html)
        for href in re.findall(r'href="(figures/[^"]+)"', html):  # the figure files it links exist
            assert (site / href).is_file(), href
    index = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="figures/accuracy.svg"' in index and 'href="figures/accuracy.png"' in index


def test_main_table(site):
    html = (site / "index.html").read_text(encoding="utf-8")
    t = parse_table(html, "leaderboard")
    keys = [h.get("data-key") for h in t.headers]
    assert keys == ["method", f"bench:{OMNI}", f"bench:{MINI}", "avg-rank"]
    methods = [r["attrs"]["data-method"] for r in t.rows]
    assert set(methods) == {"maml", "twin", "anil", EVIL}  # lonely and short are unranked
    assert methods[0] == "maml"  # ordered by average rank
    rows = {r["attrs"]["data-method"]: r for r in t.rows}
    omni = 1
    # maml and twin tie on toy-5w1s: both bold; the others not
    assert rows["maml"]["cells"][omni].get("strong") and rows["twin"]["cells"][omni].get("strong")
    assert not rows["anil"]["cells"][omni].get("strong")
    assert rows["maml"]["cells"][omni]["attrs"]["data-rank"] == "1"
    assert rows[EVIL]["cells"][omni]["attrs"]["data-rank"] == "4"
    # cell text: mean ± ci95 in percent, with the seeds and the fit time per seed beside it
    assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", rows["maml"]["cells"][omni]["text"])
    assert rows["maml"]["cells"][omni]["meta"] == "3 seeds · fit 10 s"
    assert 0 < float(rows["maml"]["cells"][omni]["attrs"]["data-value"]) < 1
    # anil misses a benchmark: a dash, and its average rank says over how many benchmarks
    assert rows["anil"]["cells"][2]["text"] == "—" and rows["anil"]["cells"][2]["attrs"]["data-value"] == ""
    assert rows["anil"]["cells"][3]["text"].endswith("(1/2)")
    assert rows["maml"]["cells"][3]["text"] == "1.00"
    assert "accuracy-figure" in html and "data:image/svg+xml;base64," in html


def test_unranked_rows_are_apart_without_rank_or_bold(site):
    html = (site / "index.html").read_text(encoding="utf-8")
    t = parse_table(html, "unranked")
    assert [h.get("data-key") for h in t.headers] == ["method", f"bench:{OMNI}", f"bench:{MINI}", "reason"]
    rows = {r["attrs"]["data-method"]: r for r in t.rows}
    assert set(rows) == {"lonely", "short"} and all(r["attrs"]["data-unranked"] == "true" for r in t.rows)
    for r in t.rows:
        for cell in r["cells"]:
            assert "data-rank" not in cell["attrs"] and not cell.get("strong") and "best" not in cell["attrs"].get("class", "")
    assert rows["lonely"]["cells"][-1]["text"] == (f"{OMNI}: 1 seed(s); a ranked row needs 3; "
                                                   f"{MINI}: 1 seed(s); a ranked row needs 3")
    assert "1 seed(s); a ranked row needs 3" in rows["short"]["cells"][-1]["text"]
    assert "30 of 40 test episodes" in rows["short"]["cells"][-1]["text"]
    assert rows["lonely"]["cells"][1]["meta"] == "1 seed · fit 10 s"
    assert html.index('id="unranked"') > html.index('id="leaderboard"')
    page = (site / f"{OMNI}.html").read_text(encoding="utf-8")
    ranked = [r["attrs"]["data-method"] for r in parse_table(page, "benchmark-table").rows]
    unranked = parse_table(page, "benchmark-unranked").rows
    assert "lonely" not in ranked and {r["attrs"]["data-method"] for r in unranked} == {"lonely", "short"}
    assert all(not c.get("strong") for r in unranked for c in r["cells"])


def test_sorting_script_and_hooks(site):
    html = (site / "index.html").read_text(encoding="utf-8")
    assert 'id="leaderboard"' in html and 'class="sortable"' in html
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    assert "table.sortable" in script and "addEventListener" in script and "aria-sort" in script
    for table in ("leaderboard", "unranked"):
        for h in parse_table(html, table).headers:
            assert h.get("data-type") in ("number", "text")
            assert h.get("data-default-order") in ("asc", "desc")
    node = shutil.which("node")
    if node:  # syntax check of the inline script
        js = Path(site.parent / "sort-check.js")
        js.write_text(script, encoding="utf-8")
        subprocess.run([node, "--check", str(js)], check=True)


def test_a_card_that_claims_verification_shows_no_badge(site):
    """Results folders carry no verification record: whatever the cards say, nothing is verified."""
    html = (site / "index.html").read_text(encoding="utf-8")
    rows = {r["attrs"]["data-method"]: r["attrs"] for r in parse_table(html, "leaderboard").rows}
    assert rows["maml"]["data-verified"] == "false"  # its cards say "verified": true
    assert rows["anil"]["data-verified"] == "false" and rows[EVIL]["data-verified"] == "false"
    assert "&#10003; verified" not in html
    assert html.count("badge self-reported") == 6


def test_protocol_cards(site):
    html = (site / f"{OMNI}.html").read_text(encoding="utf-8")
    maml = re.search(r'<tr data-method="maml".*?</tr>', html, re.S).group(0)
    for text in ("<dt>batch norm</dt><dd>transductive</dd>", "<dt>order</dt><dd>second</dd>",
                 "<dt>inner steps (train)</dt><dd>5</dd>", "<dt>inner steps (test)</dt><dd>10</dd>",
                 "<dt>backbone</dt><dd>conv4-64</dd>", "<dt>seeds</dt><dd>3</dd>",
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
    for path in site.glob("*.html"):
        html = path.read_text(encoding="utf-8")
        assert EVIL not in html
        assert "alert(1)" not in html or "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<img src=x" not in html
        assert "<b onmouseover" not in html
        assert html.count("<script>") == 1  # only the sorting script
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index
    bench = (site / f"{OMNI}.html").read_text(encoding="utf-8")
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in bench
    assert "&lt;b onmouseover=alert(3)&gt;Doe et al.&lt;/b&gt;" in index


def test_reference_rows_are_separate(site):
    html = (site / "index.html").read_text(encoding="utf-8")
    main_table = parse_table(html, "leaderboard")
    assert not any("paper" in r["attrs"]["data-method"] for r in main_table.rows)
    ref = parse_table(html, "reference")
    assert [r["attrs"]["data-method"] for r in ref.rows] == ["Evil (paper)", "MAML (paper)"]
    assert all(r["attrs"]["data-reference"] == "true" for r in ref.rows)
    assert html.index('id="published"') > html.index('id="leaderboard"')
    maml = ref.rows[1]["cells"]
    assert maml[1]["text"] == "98.70 ± 0.40" and maml[2]["text"] == "63.11 ± 0.92"
    assert maml[3]["text"] == "Finn et al. 2017"
    assert ref.rows[0]["cells"][1]["text"] == "50.00"  # no CI given
    assert "Published numbers" in html
    bench = (site / f"{MINI}.html").read_text(encoding="utf-8")
    assert [r["attrs"]["data-method"] for r in parse_table(bench, "reference").rows] == ["MAML (paper)"]


def test_benchmark_page(site):
    html = (site / f"{OMNI}.html").read_text(encoding="utf-8")
    t = parse_table(html, "benchmark-table")
    ranks = {r["attrs"]["data-method"]: r["cells"][1]["text"] for r in t.rows}
    assert ranks == {"maml": "1", "twin": "1", "anil": "3", EVIL: "4"}
    maml = next(r for r in t.rows if r["attrs"]["data-method"] == "maml")
    assert "±" in maml["cells"][3]["text"]  # seed spread for three seeds
    pairs = parse_table(html, "pairs")
    assert len(pairs.rows) == 15  # every pair of 6 methods, ranked or not
    assert all(re.fullmatch(r"\[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", r["cells"][3]["text"]) for r in pairs.rows)
    for key in ("figure-accuracy", "figure-paired", "figure-curves", "figure-compute"):
        assert f'id="{key}"' in html
    assert "Paired difference to the best ranked method (maml)" in html
    assert 'href="index.html"' in html
    index = (site / "index.html").read_text(encoding="utf-8")
    assert f'href="{OMNI}.html"' in index and f'href="{MINI}.html"' in index


def test_single_method_benchmark(tmp_path):
    for seed in (0, 1, 2):
        write_run(tmp_path / "r", make_rows("b1", "solo", seed, np.linspace(0.2, 0.8, 20)), {})
    index = build_site([tmp_path / "r"], tmp_path / "site", n_boot=50)
    page = (tmp_path / "site" / "b1.html").read_text(encoding="utf-8")
    assert "Only one method on this benchmark." in page and 'id="figure-paired"' not in page
    rows = parse_table(index.read_text(encoding="utf-8"), "leaderboard").rows
    assert [r["attrs"]["data-method"] for r in rows] == ["solo"]
    assert rows[0]["cells"][1].get("strong")


def test_a_long_budget_is_shown_apart_and_never_ranked(tmp_path):
    base = np.linspace(0.3, 0.7, 20)
    for seed in (0, 1, 2):
        for method, shift in (("maml", 0.0), ("fomaml", -0.1)):
            write_run(tmp_path / "r", make_rows("b1", method, seed, base + shift),
                      {**full_card(method, "b1", seed), "steps": 200})
    for seed in (0, 1, 2):  # three seeds and every episode: only its budget keeps it off the board
        write_run(tmp_path / "r", make_rows("b1", "maml-long", seed, base + 0.2),
                  {**full_card("maml-long", "b1", seed), "steps": 3000})
    build_site([tmp_path / "r"], tmp_path / "site", n_boot=50)
    page = (tmp_path / "site" / "b1.html").read_text(encoding="utf-8")
    ranked = parse_table(page, "benchmark-table").rows
    assert [r["attrs"]["data-method"] for r in ranked] == ["maml", "fomaml"]
    assert "Budget: 200 outer steps of meta-training per run" in page
    other = parse_table(page, "benchmark-other-budgets").rows
    assert [r["attrs"]["data-method"] for r in other] == ["maml-long"]
    assert other[0]["cells"][1]["text"] == "3000" and other[0]["cells"][1]["attrs"]["data-value"] == "3000"
    assert "another budget: 3000 outer steps (the board&#39;s on b1: 200)" in page
    assert 'id="benchmark-unranked"' not in page


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
    first = {p.relative_to(site): p.read_bytes() for p in site.rglob("*") if p.is_file()}
    second = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_several_result_dirs_and_duplicates(results, tmp_path):
    extra = tmp_path / "extra"
    write_run(extra, make_rows(OMNI, "protonet", 0, np.full(40, 0.5)), {})
    out = build_site([results, extra], tmp_path / "site", n_boot=100)
    assert 'data-method="protonet"' in out.read_text(encoding="utf-8")
    dup = tmp_path / "dup"
    write_run(dup, make_rows(OMNI, "maml", 0, np.full(40, 0.5)), {})
    with pytest.raises(ResultsError, match="also in"):
        build_site([results, dup], tmp_path / "site2")


def test_registered_benchmarks_need_all_their_test_episodes(tmp_path):
    for seed in (0, 1, 2):  # omniglot-5w1s has 600 test episodes; 40 are not enough to rank
        write_run(tmp_path / "r", make_rows("omniglot-5w1s", "maml", seed, np.full(40, 0.5)), {})
    index = build_site([tmp_path / "r"], tmp_path / "site", n_boot=50).read_text(encoding="utf-8")
    assert parse_table(index, "leaderboard").rows == []
    (row,) = parse_table(index, "unranked").rows
    assert row["cells"][-1]["text"] == "40 of 600 test episodes"


def test_cli_output_name_reference_and_errors(results, reference, tmp_path, capsys):
    page = tmp_path / "site" / "board.html"
    assert main(["leaderboard", str(results), "-o", str(page), "--reference", str(reference)]) == 0
    assert page.is_file() and not (page.parent / "index.html").exists()  # -o honours the file name
    assert 'href="board.html"' in (page.parent / f"{OMNI}.html").read_text(encoding="utf-8")
    assert 'id="published"' in page.read_text(encoding="utf-8")
    assert main(["leaderboard", str(results), "-o", str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "index.html").is_file()
    capsys.readouterr()
    assert main(["leaderboard", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "not found" in err


# ---------------------------------------------------------------------------------------------
# bundles: re-validated before publishing; verified only by a maintainer's record; conformance


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    return chance_bundles(tmp_path_factory)


def _rows(html: str, table: str) -> dict[str, dict]:
    return {r["attrs"]["data-method"]: r for r in parse_table(html, table).rows}


def test_bundle_site_ranks_verifies_and_marks_failing_methods(bundles, tmp_path):
    dirs = [bundles[k] for k in ("chance", "lonely", "partial", "broken")]
    before = snapshot(bundles["chance"].parent)
    index = build_site(dirs, tmp_path / "site", verified_dir=bundles["records"], root=tmp_path / "no-root",
                       trust_code=True, n_boot=50).read_text(encoding="utf-8")
    assert not (tmp_path / "no-root").exists()  # re-validation writes no data cache
    assert snapshot(bundles["chance"].parent) == before
    ranked, unranked = _rows(index, "leaderboard"), _rows(index, "unranked")
    assert set(ranked) == {"chance"} and set(unranked) == {"lonely", "partial", "broken"}
    assert ranked["chance"]["attrs"]["data-verified"] == "true"
    assert all(r["attrs"]["data-verified"] == "false" for r in unranked.values())
    assert unranked["broken"]["cells"][-1]["text"] == "fails the conformance suite: check_global_rng_untouched"
    assert unranked["lonely"]["cells"][-1]["text"] == "1 seed(s); a ranked row needs 3"
    assert unranked["partial"]["cells"][-1]["text"] == "20 of 50 test episodes"
    broken = re.search(r'<tr data-method="broken".*?</tr>', index, re.S).group(0)
    assert "badge failing" in broken and "check_global_rng_untouched" in broken
    chance = re.search(r'<tr data-method="chance".*?</tr>', index, re.S).group(0)
    assert "&#10003; verified" in chance and "episode(s) compared" in chance
    # without the records folder nothing is verified
    plain = build_site(dirs[:1], tmp_path / "plain", n_boot=50).read_text(encoding="utf-8")
    assert _rows(plain, "leaderboard")["chance"]["attrs"]["data-verified"] == "false"


def test_untrusted_code_is_not_imported_and_not_ranked(bundles, tmp_path):
    index = build_site([bundles["broken"]], tmp_path / "site", n_boot=50).read_text(encoding="utf-8")
    (row,) = parse_table(index, "unranked").rows
    assert row["cells"][-1]["text"].startswith("conformance suite not re-run")


def test_a_changed_bundle_loses_its_badge(bundles, tmp_path):
    """A card edited to claim verification changes the manifest hash: the record no longer matches."""
    copy = Path(shutil.copytree(bundles["chance"], tmp_path / "chance"))
    edit_json(copy, f"results/{BENCH}/chance/seed0.json", lambda c: c.update(verified=True))
    index = build_site([copy], tmp_path / "site", verified_dir=bundles["records"], n_boot=50).read_text(encoding="utf-8")
    assert _rows(index, "leaderboard")["chance"]["attrs"]["data-verified"] == "false"
    assert "&#10003; verified" not in index


def test_bundles_are_revalidated_before_publishing(bundles, tmp_path, capsys):
    copy = Path(shutil.copytree(bundles["chance"], tmp_path / "chance"))
    edit_csv(copy, lambda f: f.assign(accuracy="1"), rel=f"results/{BENCH}/chance/seed1.csv", seal=False)
    with pytest.raises(ResultsError, match="the bundle does not validate .*does not match MANIFEST.json"):
        build_site([copy], tmp_path / "site")
    assert not (tmp_path / "site").exists()
    assert main(["leaderboard", str(copy), "-o", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not validate" in err and "Traceback" not in err


def test_verification_records_folder_is_checked(bundles, tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "note.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ResultsError, match="not a metabench verification record"):
        build_site([bundles["chance"]], tmp_path / "site", verified_dir=tmp_path / "records")


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

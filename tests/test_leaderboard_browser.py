"""The leaderboard in a real headless browser: no console errors, sorting, figures (inline and as files),
escaping, the unranked section, the protocol card over the table, and the verified-badge rules.

Drives Debian's chromium over the Chrome DevTools Protocol through `--remote-debugging-pipe`
(file descriptors 3 and 4, NUL-separated JSON messages), so no websocket or selenium package is
needed. Skipped when chromium is not installed (CI's .ci/run installs chromium).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from bench.results import write_run
from bundlefixtures import chance_bundles
from leaderboard import build_site

pytestmark = pytest.mark.browser
fcntl = pytest.importorskip("fcntl", reason="the DevTools pipe needs POSIX file descriptors")

EVIL = "<script>alert(1)</script>"
EVIL_IMG = '<img src=x onerror="alert(2)">'
BENCHES = ("toy-5w1s", "toy-5w5s")  # unregistered: every method has all of their (30) test episodes
# distinct means so every sort order is unambiguous
MEANS = {"maml": (0.80, 0.55), "anil": (0.70, 0.65), "protonet-ish": (0.75, 0.45),
         EVIL: (0.40, 0.30), EVIL_IMG: (0.30, 0.35)}
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
                "--disable-dev-shm-usage", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    """$CHROMIUM (passed through by tox), else the first chromium or chrome on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe."""

    def __init__(self, binary: str, profile: Path, log: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # move the child's ends above 10 first, so that dup2 onto 3 and 4 cannot clobber one another
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds():
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self._log = open(log, "wb")
        self.proc = subprocess.Popen([binary, *CHROME_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     pass_fds=(3, 4), preexec_fn=child_fds, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log)
        os.close(hi_r)
        os.close(hi_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from chromium")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed the DevTools pipe")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, *, browser: bool = False, timeout: float = 30) -> dict:
        """Send a command (to the attached page unless `browser`) and return its result."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._event(reply)

    def _event(self, event: dict) -> None:
        self.events.append(event)
        if event["method"] == "Page.javascriptDialogOpening":  # never leave the page blocked
            self._id += 1
            os.write(self._w, json.dumps({"id": self._id, "method": "Page.handleJavaScriptDialog",
                                          "params": {"accept": True},
                                          "sessionId": event.get("sessionId")}).encode() + b"\0")

    def wait_event(self, name: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            event = self._read(deadline)
            if "method" in event:
                self._event(event)
                if event["method"] == name:
                    return event

    def open_page(self) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 browser=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str):
        """Evaluate an expression in the page and return its JSON value."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed + released) at the centre of the element."""
        box = self.js(f"(function () {{ var e = document.querySelector({json.dumps(selector)});"
                      f" e.scrollIntoView({{block: 'center'}}); var r = e.getBoundingClientRect();"
                      f" return [r.left + r.width / 2, r.top + r.height / 2]; }})()")
        assert box is not None, f"no element {selector}"
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, error log entries and dialogs seen so far."""
        out = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} ({p['entry'].get('url', '')})")
            elif m == "Page.javascriptDialogOpening":
                out.append(f"dialog: {p.get('type')} {p.get('message')!r}")
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", browser=True, timeout=5)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        self._log.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Every MEANS method with 3 seeds (ranked; maml's cards claim "verified": true), and "lonely" with one
    seed (unranked)."""
    results = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(1)
    n = 30
    for b, bench in enumerate(BENCHES):
        for method, means in [*MEANS.items(), ("lonely", (0.9, 0.9))]:
            accs = np.clip(means[b] + rng.normal(0, 0.02, n), 0, 1)
            for seed in ((0,) if method == "lonely" else (0, 1, 2)):
                rows = [{"benchmark": bench, "benchmark_version": 1, "split": "test", "episode": i,
                         "episode_hash": f"{bench}-{i:04d}", "method": method, "params_hash": "p0", "seed": seed,
                         "code_rev": "rev", "device": "cpu", "way": 5, "n_support": 5, "n_query": 75,
                         "accuracy": float(a), "loss": 1.0, "adapt_seconds": 0.01, "fit_episodes": 100,
                         "fit_seconds": 5.0} for i, a in enumerate(accs)]
                card = {"method": method, "benchmark": bench, "seed": seed, "backbone": EVIL_IMG,
                        "verified": method == "maml",
                        "curve": [{"step": s, "fit_episodes": s, "fit_seconds": s / 10,
                                   "val_accuracy": means[b] - 0.1 + s / 1000} for s in (0, 50, 100)]}
                write_run(results, rows, card)
    out = tmp_path_factory.mktemp("site")
    build_site([results], out, n_boot=100)
    return out


@pytest.fixture(scope="module")
def bundle_site(tmp_path_factory) -> Path:
    """Chance bundles: "chance" ranked with a verification record, the others unranked ("broken" fails
    the conformance suite)."""
    b = chance_bundles(tmp_path_factory)
    out = tmp_path_factory.mktemp("bundle-site")
    build_site([b["chance"], b["lonely"], b["partial"], b["broken"]], out, verified_dir=b["records"],
               trust_code=True, n_boot=50)
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    tmp = tmp_path_factory.mktemp("chromium")
    b = Browser(binary, tmp / "profile", tmp / "chromium.log")
    try:
        b.call("Browser.getVersion", browser=True, timeout=60)
        b.open_page()
    except (OSError, EOFError, TimeoutError, RuntimeError) as e:
        b.close()
        pytest.skip(f"chromium did not start: {e}: {(tmp / 'chromium.log').read_text(errors='replace')[-2000:]}")
    yield b
    b.close()


def order(b: Browser, table: str = "table#leaderboard") -> list[str]:
    return b.js(f"Array.from(document.querySelectorAll({json.dumps(table + ' tbody tr')}))"
                ".map(function (r) { return r.getAttribute('data-method'); })")


def values(b: Browser, column: str, table: str = "table#leaderboard") -> list[float]:
    """data-value of a header's column per row, in the displayed order."""
    return b.js(f"""(function () {{
        var t = document.querySelector({json.dumps(table)});
        var col = Array.from(t.tHead.rows[0].cells).findIndex(function (h) {{
            return h.getAttribute('data-key') === {json.dumps(column)}; }});
        return Array.from(t.tBodies[0].rows).map(function (r) {{ return Number(r.cells[col].getAttribute('data-value')); }});
    }})()""")


def images(b: Browser) -> list[list]:
    return b.js("Array.from(document.images).map(function (i) {"
                " return [i.closest('figure') ? i.closest('figure').id : '', i.complete, i.naturalWidth, i.naturalHeight]; })")


def figure_files(b: Browser) -> list[list]:
    """[href, natural width, natural height] of every figure file a page links (SVG and PNG), loaded by the browser."""
    return b.js("""Promise.all(Array.from(document.querySelectorAll('figure a')).map(function (a) {
        return new Promise(function (resolve) {
            var img = new Image();
            img.onload = function () { resolve([a.getAttribute('href'), img.naturalWidth, img.naturalHeight]); };
            img.onerror = function () { resolve([a.getAttribute('href'), 0, 0]); };
            img.src = a.href;
        });
    }))""")


def rect(b: Browser, selector: str) -> list[float]:
    return b.js(f"(function () {{ var r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                f" return [r.left, r.top, r.width, r.height]; }})()")


def assert_escaped(b: Browser) -> None:
    """The hostile names are text: the right rows exist, no injected elements ran or exist."""
    assert b.js("document.querySelectorAll('img[src=\"x\"], img[onerror]').length") == 0
    assert b.js("document.scripts.length") == 1  # only the page's own sorting script
    names = b.js("Array.from(document.querySelectorAll('tr[data-method] .method')).map(function (e) { return e.textContent; })")
    assert EVIL in names and EVIL_IMG in names
    attrs = b.js("Array.from(document.querySelectorAll('tr[data-method]')).map(function (r) { return r.getAttribute('data-method'); })")
    assert EVIL in attrs and EVIL_IMG in attrs
    assert b.js("document.body.textContent.indexOf(" + json.dumps(EVIL_IMG) + ") >= 0")  # the card's backbone, as text


def test_index_page(browser, site):
    browser.events.clear()
    browser.navigate((site / "index.html").as_uri())
    assert browser.js("document.readyState") == "complete"
    assert browser.js("document.title") == "metabench leaderboard"

    # initial order: average rank ascending; "lonely" (one seed) is not ranked
    initial = order(browser)
    assert sorted(initial) == sorted(MEANS)
    ranks = values(browser, "avg-rank")
    assert ranks == sorted(ranks)

    # a benchmark column: first click sorts descending, the second ascending
    key = f"bench:{BENCHES[0]}"
    th = f'table#leaderboard th[data-key="{key}"]'
    browser.click(th)
    desc = order(browser)
    assert desc == sorted(MEANS, key=lambda m: -MEANS[m][0])
    assert values(browser, key) == sorted(values(browser, key), reverse=True)
    assert browser.js(f"document.querySelector({json.dumps(th)}).getAttribute('aria-sort')") == "descending"
    browser.click(th)
    assert order(browser) == desc[::-1]
    assert browser.js(f"document.querySelector({json.dumps(th)}).getAttribute('aria-sort')") == "ascending"

    # the method column sorts by name (case-insensitive), and only one header carries aria-sort
    browser.click('table#leaderboard th[data-key="method"]')
    assert order(browser) == sorted(MEANS, key=str.lower)
    assert browser.js("document.querySelectorAll('table#leaderboard th[aria-sort]').length") == 1

    # the other benchmark, then back: the sort keys come from data-value, not the cell text
    key2 = f"bench:{BENCHES[1]}"
    browser.click(f'table#leaderboard th[data-key="{key2}"]')
    assert order(browser) == sorted(MEANS, key=lambda m: -MEANS[m][1])

    # badges: a card that claims verification by itself shows nothing (maml's cards say "verified": true)
    assert browser.js("document.querySelectorAll('tr[data-verified=\"true\"], .badge.verified').length") == 0
    assert browser.js("document.querySelector('tr[data-method=\"maml\"] .badge.self-reported') !== null")

    # the unranked section: its own table, no rank, no bold, the reason shown
    assert order(browser, "table#unranked") == ["lonely"]
    assert browser.js("document.querySelectorAll('table#unranked strong, table#unranked td.best, "
                      "table#unranked td[data-rank]').length") == 0
    reason = browser.js("document.querySelector('table#unranked tr[data-method=\"lonely\"] td.reason').textContent")
    assert "1 seed(s); a ranked row needs 3" in reason
    assert browser.js("document.querySelector('table#leaderboard tr[data-method=\"lonely\"]') === null")

    # seeds and fit time beside each score
    meta = browser.js("document.querySelector('tr[data-method=\"maml\"] .cell-meta').textContent")
    assert meta == "3 seeds · fit 5.0 s"

    # the protocol card opens over the table: the numbers stay where they were
    cell = 'table#leaderboard tr[data-method="anil"] td:nth-child(2)'
    browser.js("window.scrollTo(0, 0)")
    before = rect(browser, cell), rect(browser, "table#leaderboard")
    browser.click('tr[data-method="anil"] details.card summary')
    assert browser.js("document.querySelector('tr[data-method=\"anil\"] details.card').open") is True
    browser.js("window.scrollTo(0, 0)")
    assert (rect(browser, cell), rect(browser, "table#leaderboard")) == before
    card = rect(browser, 'tr[data-method="anil"] details.card dl')
    assert card[2] > 0 and card[3] > 0  # shown
    assert browser.js("getComputedStyle(document.querySelector('tr[data-method=\"anil\"] details.card dl'))"
                      ".position") == "absolute"

    # figures decoded, inline and as the SVG and PNG files beside the page
    imgs = images(browser)
    assert imgs and all(complete and w > 0 and h > 0 for _, complete, w, h in imgs), imgs
    files = figure_files(browser)
    assert [f for f, _, _ in files] == ["figures/accuracy.svg", "figures/accuracy.png"]
    assert all(w > 0 and h > 0 for _, w, h in files), files

    assert_escaped(browser)
    assert browser.problems() == []


def test_benchmark_page(browser, site):
    browser.events.clear()
    browser.navigate((site / "index.html").as_uri())
    link = f'#benchmark-links a[href="{BENCHES[1]}.html"]'
    browser.click(link)
    browser.wait_event("Page.loadEventFired")
    assert browser.js("location.pathname").endswith(f"/{BENCHES[1]}.html")
    assert browser.js("document.querySelector('h1').textContent") == BENCHES[1]

    assert order(browser, "table#benchmark-table") == sorted(MEANS, key=lambda m: -MEANS[m][1])
    browser.click('table#benchmark-table th[data-key="accuracy"]')  # descending first: unchanged
    assert order(browser, "table#benchmark-table") == sorted(MEANS, key=lambda m: -MEANS[m][1])
    browser.click('table#benchmark-table th[data-key="accuracy"]')
    assert order(browser, "table#benchmark-table") == sorted(MEANS, key=lambda m: MEANS[m][1])

    # the pairs table sorts too
    n_pairs = browser.js("document.querySelectorAll('table#pairs tbody tr').length")
    assert n_pairs == (len(MEANS) + 1) * len(MEANS) // 2  # every pair of methods, "lonely" included
    browser.click('table#pairs th[data-key="diff"]')
    diffs = values(browser, "diff", "table#pairs")
    assert diffs == sorted(diffs, reverse=True)

    # every figure is there and decoded: accuracy, paired difference, curves, compute; and as files
    imgs = images(browser)
    assert [f for f, *_ in imgs] == ["figure-accuracy", "figure-paired", "figure-curves", "figure-compute"]
    assert all(complete and w > 0 and h > 0 for _, complete, w, h in imgs), imgs
    files = figure_files(browser)
    assert len(files) == 8 and all(w > 0 and h > 0 for _, w, h in files), files
    assert order(browser, "table#benchmark-unranked") == ["lonely"]

    assert_escaped(browser)
    browser.click('a[href="index.html"]')
    browser.wait_event("Page.loadEventFired")
    assert browser.js("document.querySelector('table#leaderboard') !== null")
    assert browser.problems() == []


def test_badges_unranked_bundles_and_failing_methods(browser, bundle_site):
    browser.events.clear()
    browser.navigate((bundle_site / "index.html").as_uri())
    # verified only where the maintainer's record matches the bundle's manifest hash
    assert order(browser) == ["chance"]
    assert browser.js("Array.from(document.querySelectorAll('tr[data-verified=\"true\"]'))"
                      ".map(function (r) { return r.getAttribute('data-method'); })") == ["chance"]
    title = browser.js("document.querySelector('tr[data-method=\"chance\"] .badge.verified').title")
    assert "episode(s) compared" in title
    # unranked, each with its reason; the failing method is marked and its failed checks listed
    assert sorted(order(browser, "table#unranked")) == ["broken", "lonely", "partial"]
    reasons = browser.js("Object.fromEntries(Array.from(document.querySelectorAll('table#unranked tr[data-method]'))"
                         ".map(function (r) { return [r.getAttribute('data-method'), r.querySelector('td.reason').textContent]; }))")
    assert reasons == {"broken": "fails the conformance suite: check_global_rng_untouched",
                       "lonely": "1 seed(s); a ranked row needs 3", "partial": "20 of 50 test episodes"}
    failing = browser.js("Array.from(document.querySelectorAll('.badge.failing')).map(function (e) {"
                         " return [e.closest('tr').getAttribute('data-method'), e.title]; })")
    assert failing == [["broken", "fails the conformance suite (bench.checks): check_global_rng_untouched"]]
    browser.click('table#unranked th[data-key="method"]')
    assert order(browser, "table#unranked") == ["broken", "lonely", "partial"]
    assert browser.problems() == []


@pytest.fixture(scope="module")
def axes_site(tmp_path_factory) -> Path:
    """Two methods with every evaluation axis (bench.axes) and a third, older run without them."""
    results = tmp_path_factory.mktemp("axes-results")
    rng = np.random.default_rng(1)
    for method, base, flops in (("maml", 0.7, 4e9), ("protonet", 0.8, 1e9), ("old", 0.5, None)):
        for seed in (0, 1, 2):
            accs = np.clip(base + rng.normal(0, 0.1, 30), 0, 1).round(2)
            rows = [{"benchmark": "toy-5w1s", "benchmark_version": 1, "split": "test", "episode": i,
                     "episode_hash": f"{i:016x}", "method": method, "params_hash": "p", "seed": seed, "code_rev": "rev",
                     "device": "cpu", "way": 5, "n_support": 5, "n_query": 75, "accuracy": float(a), "loss": 1.0,
                     "adapt_seconds": 0.01, "fit_episodes": 100, "fit_seconds": 5.0} for i, a in enumerate(accs)]
            card = {"method": method, "benchmark": "toy-5w1s", "seed": seed, "fit_steps": 100,
                    "curve": [{"step": s, "fit_episodes": s, "fit_seconds": s / 10, "val_accuracy": base - 0.1 + s / 1000}
                              for s in (0, 50, 100)]}
            axes = None
            if flops is not None:
                card["flops"] = {"outer_step": flops, "adaptation": flops / 100, "path": "reference"}
                steps = (0,) if method == "protonet" else range(5)
                axes = {"steps": [{"episode": i, "episode_hash": f"{i:016x}", "step": s,
                                   "accuracy": float(min(1.0, a * (0.5 + s / 8))), "loss": 1.0}
                                  for i, a in enumerate(accs) for s in steps],
                        "perms": [{"episode": i, "episode_hash": f"{i:016x}", "perm": p, "labels": "0-1-2-3-4",
                                   "accuracy": float(a if method == "protonet" or p == 0 else max(0.0, a - 0.05 * p))}
                                  for i, a in enumerate(accs) for p in range(4)]}
            write_run(results, rows, card, axes)
    out = tmp_path_factory.mktemp("axes-site")
    build_site([results], out, n_boot=50)
    return out


def test_benchmark_page_shows_the_evaluation_axes(browser, axes_site):
    browser.events.clear()
    browser.navigate((axes_site / "toy-5w1s.html").as_uri())
    assert browser.js("document.readyState") == "complete"
    imgs = images(browser)
    ids = [f for f, *_ in imgs]
    assert "figure-steps" in ids and "figure-flops" in ids
    assert all(complete and w > 0 and h > 0 for _, complete, w, h in imgs), imgs
    files = figure_files(browser)
    assert {"figures/toy-5w1s-steps.svg", "figures/toy-5w1s-flops.png"} <= {f for f, _, _ in files}
    assert all(w > 0 and h > 0 for _, w, h in files), files
    # the permutation table: the older run without axis files is simply absent; protonet has zero spread
    assert sorted(order(browser, "table#permutations")) == ["maml", "protonet"]
    spread = browser.js("document.querySelector('table#permutations tr[data-method=\"protonet\"] td:nth-child(4)')"
                        ".textContent")
    assert spread == "0.00"
    assert sorted(order(browser, "table#equal-budget")) == ["maml", "protonet"]
    assert "without interpolation" in browser.js("document.querySelector('#budget-note').textContent")
    assert browser.problems() == []

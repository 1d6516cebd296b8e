"""`metabench data`: download (never over the network in tests), prepare, status, and the
`data` command line built with argparse through `add_cli`."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import urllib.error
from pathlib import Path

import pytest

from bench import data
from bench.errors import DataError, UnknownNameError
from bench.sources import get_source
from bench.sources import miniimagenet as mini
from bench.sources import omniglot as omni
from datafixtures import full_omniglot_zips, mini_jpeg, mini_npz, omniglot_members, write_zip


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------------------------

def test_fetch_file_url_with_md5(tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(b"x" * 100_000)
    dest = data.fetch(src.as_uri(), tmp_path / "out" / "payload.bin", md5(src), show_progress=False)
    assert dest.read_bytes() == src.read_bytes()


def test_fetch_wrong_checksum_keeps_nothing(tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(b"abc")
    with pytest.raises(DataError, match="wrong checksum"):
        data.fetch(src.as_uri(), tmp_path / "out" / "payload.bin", "0" * 32, show_progress=False)
    assert listing(tmp_path / "out") == []


class _Response:
    def __init__(self, body: bytes, length: int | None):
        self.body = io.BytesIO(body)
        self.headers = {} if length is None else {"Content-Length": str(length)}

    def read(self, n):
        return self.body.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_fetch_truncated_download_keeps_nothing(tmp_path):
    opener = lambda url: _Response(b"y" * 1000, 5000)  # noqa: E731 - the server promised more
    with pytest.raises(DataError, match=r"truncated download \(1000 of 5000 bytes\)"):
        data.fetch("https://example.org/a.zip", tmp_path / "a.zip", None, False, opener)
    assert listing(tmp_path) == []


def test_fetch_network_error(tmp_path):
    def opener(url):
        raise urllib.error.URLError("no route to host")

    with pytest.raises(DataError, match=r"https://example.org/a.zip: download failed .*no route"):
        data.fetch("https://example.org/a.zip", tmp_path / "a.zip", None, False, opener)
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# download omniglot (file:// URLs to fixture archives with every official character, 2 drawers)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    return full_omniglot_zips(folder, images_per_char=2)


@pytest.fixture
def official(monkeypatch, served):
    """Point the official archive table at the fixture archives (file:// URLs, their md5s)."""
    table = {p.name: (p.as_uri(), md5(p)) for p in served}
    monkeypatch.setattr(omni, "OMNIGLOT_ARCHIVES", table)
    return table


def test_download_omniglot_end_to_end_and_rerun_does_nothing(tmp_path, official, capsys):
    root = tmp_path / "root"
    cache = data.download("omniglot", root, show_progress=False, images_per_char=2)
    assert cache == omni.cache_dir(root, 28)
    assert sorted(p.name for p in omni.data_dir(root).iterdir()) == ["cache-28px", "images_background.zip",
                                                                     "images_evaluation.zip"]
    src = get_source("omniglot", root, 28)
    assert len(src.splits["test"]) == 1692
    before = (cache / "images.npy").stat().st_mtime_ns
    capsys.readouterr()
    data.download("omniglot", root, show_progress=False, images_per_char=2)
    assert "up to date" in capsys.readouterr().out
    assert (cache / "images.npy").stat().st_mtime_ns == before
    # --force rebuilds; the archives are not downloaded again
    data.download("omniglot", root, show_progress=False, images_per_char=2, force=True,
                  opener=lambda url: pytest.fail("downloaded again"))
    assert "md5 ok" in capsys.readouterr().out


def test_download_replaces_a_corrupt_archive(tmp_path, official):
    root = tmp_path / "root"
    bad = omni.data_dir(root) / "images_background.zip"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    data.download("omniglot", root, show_progress=False, images_per_char=2, quiet=True)
    assert md5(bad) == official["images_background.zip"][1]


def test_download_with_a_wrong_checksum_leaves_nothing(tmp_path, official, monkeypatch):
    table = dict(official)
    url, _ = table["images_evaluation.zip"]
    table["images_evaluation.zip"] = (url, "f" * 32)
    monkeypatch.setattr(omni, "OMNIGLOT_ARCHIVES", table)
    root = tmp_path / "root"
    with pytest.raises(DataError, match="wrong checksum"):
        data.download("omniglot", root, show_progress=False, images_per_char=2, quiet=True)
    assert listing(omni.data_dir(root)) == ["images_background.zip"]  # the verified one stays


def test_download_from_folder_and_torchvision_layout(tmp_path, served, official):
    # torchvision: omniglot-py/images_background/... extracted, and its zips beside them
    tv = tmp_path / "omniglot-py"
    for z in served:
        import zipfile

        with zipfile.ZipFile(z) as f:
            f.extractall(tv)
    root = tmp_path / "root"
    data.download("omniglot", root, [tmp_path / "omniglot-py"], show_progress=False, images_per_char=2, quiet=True,
                  opener=lambda url: pytest.fail("--from must not download"))
    a = get_source("omniglot", root, 28)
    root2 = tmp_path / "root2"
    data.download("omniglot", root2, list(served), show_progress=False, images_per_char=2, quiet=True)
    b = get_source("omniglot", root2, 28)
    assert (a.images[:] == b.images[:]).all() and a.class_names == b.class_names


def test_download_omniglot_small_from_paths(tmp_path):
    split = omni.SMALL_SPLIT
    z1 = write_zip(tmp_path / "one.zip", omniglot_members("one", {a: 2 for a in split["train"] + split["val"]}, 20))
    z2 = write_zip(tmp_path / "two.zip", omniglot_members("two", {a: 2 for a in split["test"]}, 20))
    root = tmp_path / "root"
    cache = data.download("omniglot-small", root, [z1, z2], show_progress=False, quiet=True)
    assert cache == omni.small_cache_dir(root, 28)
    src = get_source("omniglot-small", root, 28)
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 32, "val": 8, "test": 24}


def test_download_unknown_and_miniimagenet(tmp_path):
    with pytest.raises(UnknownNameError, match="omniglot"):
        data.download("omniglott", tmp_path)
    with pytest.raises(DataError, match="forbid redistribution"):
        data.download("miniimagenet", tmp_path)


# ---------------------------------------------------------------------------------------------
# prepare miniimagenet
# ---------------------------------------------------------------------------------------------

def test_prepare_miniimagenet_strict_and_relaxed(tmp_path, capsys):
    path, _ = mini_jpeg(tmp_path / "mini", per_class=2)
    root = tmp_path / "root"
    with pytest.raises(DataError, match="missing classes"):
        data.prepare("miniimagenet", root, [path], show_progress=False)
    with pytest.raises(DataError, match="exactly one --from"):
        data.prepare("miniimagenet", root, [], show_progress=False)
    cache = data.prepare("miniimagenet", root, [path], show_progress=False, expected_per_class=2,
                         require_all_classes=False)
    assert "reading the jpeg format" in capsys.readouterr().out
    assert cache == mini.cache_dir(root, 84)
    data.prepare("miniimagenet", root, [path], show_progress=False)  # complete cache: nothing to do
    assert "up to date" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------

def test_status_empty_root(tmp_path, monkeypatch):
    monkeypatch.setattr(omni, "find_small_archives", lambda root=None: None)
    rows = {r["dataset"]: r for r in data.status(tmp_path)}
    assert set(rows) == {"omniglot", "omniglot-small", "miniimagenet"}
    for r in rows.values():
        assert r["found"].startswith("no") and r["cached"] == "no"
    assert rows["omniglot"]["where"] == str(tmp_path / "omniglot")
    text = data.format_status(list(rows.values()))
    assert text.splitlines()[0].split() == ["dataset", "found", "verified", "cached", "disk", "where"]


def test_status_after_building(tmp_path, official):
    root = tmp_path / "root"
    data.download("omniglot", root, show_progress=False, images_per_char=2, quiet=True)
    path, _ = mini_jpeg(tmp_path / "mini", per_class=2)
    data.prepare("miniimagenet", root, [mini_npz(tmp_path / "npz", _)], show_progress=False, quiet=True,
                 expected_per_class=2, require_all_classes=False)
    rows = {r["dataset"]: r for r in data.status(root)}
    assert rows["omniglot"]["found"] == "images_background.zip, images_evaluation.zip"
    assert rows["omniglot"]["verified"] == "md5 ok" and rows["omniglot"]["cached"] == "28px"
    assert rows["miniimagenet"]["found"].startswith("npz at ")
    assert rows["miniimagenet"]["verified"].startswith("partial (7 classes")
    # a damaged archive and a cache from another version show up
    (omni.data_dir(root) / "images_evaluation.zip").write_bytes(b"zz")
    index = omni.cache_dir(root, 28) / "index.json"
    d = json.loads(index.read_text())
    d["meta"]["version"] = -1
    index.write_text(json.dumps(d))
    rows = {r["dataset"]: r for r in data.status(root)}
    assert rows["omniglot"]["verified"] == "md5 MISMATCH: images_evaluation.zip"
    assert rows["omniglot"]["cached"].startswith("28px (unusable: ")


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metabench")
    data.add_cli(p.add_subparsers(dest="command", required=True))
    return p


def run(*argv) -> int:
    args = parser().parse_args(list(argv))
    return args.func(args)


def test_cli_status(tmp_path, capsys):
    assert run("data", "status", "--root", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"data root: {tmp_path}" in out
    assert "omniglot-small" in out and "miniimagenet" in out


def test_cli_download_and_prepare(tmp_path, served, official, monkeypatch, capsys):
    import functools

    # the fixture archives have 2 drawers per character, not 20
    monkeypatch.setattr(data, "download", functools.partial(data.download, images_per_char=2))
    root = tmp_path / "root"
    assert run("data", "download", "omniglot", "--root", str(root), "--from", str(served[0]),
               "--from", str(served[1]), "--no-progress", "--image-size", "20") == 0
    assert (omni.cache_dir(root, 20) / "index.json").exists()
    assert "cache written" in capsys.readouterr().out
    path, _ = mini_jpeg(tmp_path / "mini", per_class=2)
    with pytest.raises(DataError, match="missing classes"):  # the CLI enforces the real Ravi counts
        run("data", "prepare", "miniimagenet", "--from", str(path), "--root", str(root), "--no-progress")
    with pytest.raises(DataError, match="forbid redistribution"):
        run("data", "download", "miniimagenet", "--root", str(root))
    with pytest.raises(SystemExit):
        parser().parse_args(["data", "explode"])


def test_module_main_reports_errors(tmp_path, capsys):
    assert data.main(["download", "miniimagenet", "--root", str(tmp_path)]) == 2
    assert "metabench: error: metabench cannot download miniImageNet" in capsys.readouterr().err


def test_constants_agree_and_the_cli_module_is_light():
    import subprocess
    import sys

    assert data.OMNIGLOT_DRAWERS == omni.IMAGES_PER_CHARACTER
    assert data.MINI_PER_CLASS == mini.PER_CLASS
    code = "import sys, bench.data; print('torch' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo).stdout
    assert out.strip() == "False"

"""The allocator switch: when the command line re-runs itself under tcmalloc, and when not."""

from __future__ import annotations

from bench import allocator


def test_tcmalloc_env_preloads_the_library(monkeypatch):
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: "/lib/libtcmalloc_minimal.so.4")
    env = allocator.tcmalloc_env({"PATH": "/bin", "LD_PRELOAD": "/lib/other.so"})
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4 /lib/other.so"
    assert env["PATH"] == "/bin" and env["METABENCH_ALLOCATOR"] == "tcmalloc"


def test_no_reexec_when_opted_out_missing_or_already_loaded(monkeypatch):
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: "/lib/libtcmalloc_minimal.so.4")
    assert allocator.tcmalloc_env({"METABENCH_ALLOCATOR": "glibc"}) is None
    assert allocator.tcmalloc_env({"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4"}) is None
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: None)
    assert allocator.tcmalloc_env({}) is None


def test_tcmalloc_path_finds_only_existing_files(monkeypatch, tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    monkeypatch.setattr(allocator, "TCMALLOC_PATHS", (str(tmp_path / "missing.so"), str(lib)))
    assert allocator.tcmalloc_path() is None
    lib.write_bytes(b"")
    assert allocator.tcmalloc_path() == str(lib)

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


def test_mmap_threshold_is_pinned_under_glibc_unless_asked_not_to():
    import pytest

    assert allocator.mmap_threshold({}) is None  # glibc's own rule unless asked (faster, more memory)
    assert allocator.mmap_threshold({"METABENCH_MMAP_THRESHOLD": "1048576"}) == 1048576
    assert allocator.mmap_threshold({"METABENCH_MMAP_THRESHOLD": "dynamic"}) is None
    assert allocator.mmap_threshold({"METABENCH_ALLOCATOR": "tcmalloc"}) is None
    assert allocator.mmap_threshold({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) is None
    with pytest.raises(ValueError, match="METABENCH_MMAP_THRESHOLD must be a number of bytes or 'dynamic'"):
        allocator.mmap_threshold({"METABENCH_MMAP_THRESHOLD": "lots"})


def test_the_task_pool_pins_the_threshold_once_per_process_when_asked():
    import os
    import platform
    import subprocess
    import sys

    code = ("import torch; from bench import allocator; from baselines.parallel import map_tasks; "
            "print(list(allocator._pinned), list(map_tasks(abs, [-1, -2])), allocator._pinned, allocator.pin_mmap_threshold())")
    env = {**os.environ, "METABENCH_TASK_WORKERS": "2", "METABENCH_MMAP_THRESHOLD": "131072"}
    env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    glibc = platform.libc_ver()[0] == "glibc"
    assert out.strip() == ("[] [1, 2] [131072] 131072" if glibc else "[] [1, 2] [0] None")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "METABENCH_MMAP_THRESHOLD": "dynamic"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] [1, 2] [0] None"

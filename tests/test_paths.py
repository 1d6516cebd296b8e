"""Root folder resolution and atomic writes."""

from __future__ import annotations

import pytest

from bench.paths import atomic_write_text, default_root, resolve_root


def test_default_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("METABENCH_ROOT", str(tmp_path / "r"))
    assert default_root() == tmp_path / "r"
    monkeypatch.delenv("METABENCH_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x" / "metabench"
    assert resolve_root(str(tmp_path)) == tmp_path


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    from bench.paths import atomic_path

    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise Boom()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]

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


def test_malloc_settings_keep_freed_memory_under_glibc_unless_asked_not_to():
    import pytest

    keep = {allocator.M_MMAP_THRESHOLD: 32 * 2**20, allocator.M_TRIM_THRESHOLD: 2**31 - 1,
            allocator.M_TOP_PAD: 64 * 2**20, allocator.M_MMAP_MAX: 0}
    assert allocator.malloc_settings({}) == keep == allocator.malloc_settings({"METABENCH_MMAP_THRESHOLD": "keep"})
    assert allocator.malloc_settings({"METABENCH_MMAP_THRESHOLD": "1048576"}) == {allocator.M_MMAP_THRESHOLD: 1048576}
    assert allocator.malloc_settings({"METABENCH_MMAP_THRESHOLD": "dynamic"}) == {}
    assert allocator.malloc_settings({"METABENCH_ALLOCATOR": "tcmalloc"}) == {}
    assert allocator.malloc_settings({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) == {}
    with pytest.raises(ValueError, match="METABENCH_MMAP_THRESHOLD must be 'keep', 'dynamic' or a number of bytes"):
        allocator.malloc_settings({"METABENCH_MMAP_THRESHOLD": "lots"})


def _child(code: str, **env: str) -> str:
    """The stripped stdout of `python -c code` in a fresh process under glibc's malloc (no LD_PRELOAD), with
    METABENCH_MMAP_THRESHOLD unset unless `env` sets it (and `env` added)."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "METABENCH_MMAP_THRESHOLD")}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


KEEP = "{-3: 33554432, -1: 2147483647, -2: 67108864, -4: 0}"  # the keep settings as a child prints them (mallopt keys)


def _pool_in_a_child(threshold: str | None, workers: str = "2") -> tuple[str, bool]:
    """What a fresh process reports about its malloc settings before and after its first map_tasks call (on
    the task pool, or with workers "0" in the calling thread), and whether it runs glibc."""
    import platform

    code = ("import torch; from bench import allocator; from baselines.parallel import map_tasks; "
            "print(list(allocator._tuned), list(map_tasks(abs, [-1, -2])), list(allocator._tuned), allocator.tune_malloc())")
    env = {"METABENCH_TASK_WORKERS": workers} | ({} if threshold is None else {"METABENCH_MMAP_THRESHOLD": threshold})
    return _child(code, **env), platform.libc_ver()[0] == "glibc"


def test_the_task_pool_tunes_malloc_once_per_process():
    out, glibc = _pool_in_a_child(None)
    assert out == (f"[] [1, 2] [{KEEP}] {KEEP}" if glibc else "[] [1, 2] [{}] {}")
    out, glibc = _pool_in_a_child("131072")
    assert out == ("[] [1, 2] [{-3: 131072}] {-3: 131072}" if glibc else "[] [1, 2] [{}] {}")
    assert _pool_in_a_child("dynamic")[0] == "[] [1, 2] [{}] {}"


def test_the_lean_mode_tunes_malloc_too():
    """With the pool off (METABENCH_TASK_WORKERS=0) the tasks run in the calling thread, whose freed graphs
    glibc would otherwise also give back and fault in again every step."""
    out, glibc = _pool_in_a_child(None, workers="0")
    assert out == (f"[] [1, 2] [{KEEP}] {KEEP}" if glibc else "[] [1, 2] [{}] {}")


def test_fit_tunes_malloc_for_methods_whose_tasks_skip_the_pool():
    code = ("import dataclasses; from bench import allocator, perf\n"
            "w = dataclasses.replace(perf.WORKLOADS['omniglot-5w1s'], meta_batch=1)\n"
            "m = perf.make_learner(w, 'fomaml'); print(list(allocator._tuned))\n"
            "m.fit(iter(perf.synthetic_episodes(w, 1)), 1); print(allocator._tuned)")
    out = _child(code, METABENCH_TASK_WORKERS="0")
    import platform

    assert out.split("\n") == ["[]", f"[{KEEP}]" if platform.libc_ver()[0] == "glibc" else "[{}]"]


MINI_MAP = 75 * 32 * 84 * 84 * 4  # miniImageNet 5-way 1-shot: the first conv's output for 75 query images (68 MB)


def test_pool_tasks_whose_maps_outgrow_a_thread_heap_take_the_main_heap():
    """A glibc thread heap holds 64 MiB at most; tasks on the pool that allocate more at once get one arena for
    every thread (the main heap, which grows to any size), where the threads keep their own heaps otherwise."""
    import platform

    out = allocator.malloc_settings({}, MINI_MAP)
    assert out == {**allocator.malloc_settings({}), allocator.M_ARENA_MAX: 1}
    assert allocator.malloc_settings({}, 60 * 2**20) == allocator.malloc_settings({})  # Omniglot 20-way: 60 MB
    assert allocator.malloc_settings({"METABENCH_MMAP_THRESHOLD": "dynamic"}, MINI_MAP) == {}
    code = ("import dataclasses; from bench import allocator, perf\n"
            "w = dataclasses.replace(perf.WORKLOADS['miniimagenet-5w1s'], meta_batch=2, inner_steps=1)\n"
            "m = perf.make_learner(w, 'fomaml'); batch = perf.synthetic_episodes(w, 2)\n"
            "print(m.largest_task_block(batch)); m.fit(iter(batch), 1); print(allocator._tuned)")
    block, tuned = _child(code, METABENCH_TASK_WORKERS="2").split("\n")
    assert int(block) == MINI_MAP
    assert tuned == (f"[{KEEP[:-1]}, -8: 1}}]" if platform.libc_ver()[0] == "glibc" else "[{}]")


def test_a_process_that_only_evaluates_tunes_for_its_blocks_too():
    """`metabench verify` and a run resumed after training evaluate without `fit`: tune_malloc_for makes the
    first call there, with the largest block of the learner's tasks (none for a learner without the notion)."""
    import platform

    glibc = platform.libc_ver()[0] == "glibc"
    code = ("from bench import perf, allocator; w = perf.WORKLOADS['miniimagenet-5w1s']\n"
            "print(allocator.tune_malloc_for(perf.make_learner(w, 'fomaml'), perf.synthetic_episodes(w, 2)))")
    assert _child(code, METABENCH_TASK_WORKERS="2") == (f"{KEEP[:-1]}, -8: 1}}" if glibc else "{}")
    code = "from bench import allocator; print(allocator.tune_malloc_for(object(), [1, 2]))"
    assert _child(code) == (KEEP if glibc else "{}")


def _training_faults(workload: str, method: str, changes: str, steps: int, first: str = "", **env: str) -> int:
    """Minor page faults of a fresh glibc child over `steps` meta-iterations of `method` on `workload` with
    `changes` (dataclasses.replace arguments, e.g. "meta_batch=4"; perf's synthetic episodes, unfused, 2 pool
    workers, one intra-op thread), after two that fill its heaps; `first`: a statement run before the learner
    is built."""
    code = ("import dataclasses, resource; from bench import allocator, perf\n"
            f"w = dataclasses.replace(perf.WORKLOADS[{workload!r}], {changes})\n"
            f"{first}\nstep, _ = perf.metabench_impl(w, {method!r}, 'cpu'); step(); step()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            f"for _ in range({steps}): step()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    env = {"METABENCH_TASK_WORKERS": "2", "METABENCH_FUSED": "0", "OMP_NUM_THREADS": "1", **env}
    return int(_child(code, **env).split()[-1])


def test_one_arena_stops_the_page_faults_of_blocks_beyond_a_thread_heap():
    """On the pool, miniImageNet's 68 MB maps are mapped by themselves and faulted in afresh every time unless the
    threads share the main heap, which keeps them (first-order MAML, 4 tasks, 1 inner step, 2 workers,
    iterations 3-4 on a 2-core EPYC: ~535,000 minor faults with each thread on its own heap, as fit chose before,
    against 900-16,500)."""
    import platform

    import pytest

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    faults = {block: _training_faults("miniimagenet-5w1s", "fomaml", "meta_batch=4, inner_steps=1", 2,
                                      first=f"allocator.tune_malloc({block})")
              for block in (0, MINI_MAP)}
    assert 4 * faults[MINI_MAP] < faults[0], faults


def test_keep_stops_the_page_faults_of_meta_training_under_glibc():
    """Under glibc's own rule each meta-iteration gives the pool threads' freed activations back to the system
    and faults them in again (Omniglot 5-way 1-shot MAML, 4 tasks, 2 workers, iterations 3-6 on a 2-core Xeon:
    130,000-190,000 minor faults, also beside two busy processes); with the keep settings those iterations reuse what
    the first two held (300-13,000 faults; 0-7,400 in any one iteration, since which thread's arena a task lands in
    varies: the test sums four)."""
    import platform

    import pytest

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    faults = {mode: _training_faults("omniglot-5w1s", "maml", "meta_batch=4", 4, METABENCH_MMAP_THRESHOLD=mode)
              for mode in ("dynamic", "keep")}
    assert 4 * faults["keep"] < faults["dynamic"], faults


def test_release_free_memory_gives_kept_blocks_back():
    """Under the keep settings glibc holds freed heap blocks resident (never trimmed); release_free_memory
    hands them back, so a later peak of the resident set counts the pages a block needs afresh."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        import pytest

        pytest.skip("glibc's malloc only")
    code = ("import torch; from bench import allocator, perf; allocator.tune_malloc(); "
            "xs = [torch.ones(4 * 2**20) for _ in range(40)]; del xs; kept = perf.proc_status_mb('VmRSS'); "
            "allocator.release_free_memory(); print(round(kept - perf.proc_status_mb('VmRSS')))")
    assert int(_child(code)) > 500  # 40 x 16 MB were kept, nearly all of them given back

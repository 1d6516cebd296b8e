"""baselines/cudagraph.py on any machine: the switch and what a capture is keyed on (tests/test_cuda.py captures
and replays on a GPU)."""

from __future__ import annotations

import pytest
import torch

from baselines import cudagraph
from baselines.maml import MAML


@pytest.mark.parametrize("value, on", [("", True), ("1", True), ("0", False)])
def test_switch(monkeypatch, value, on):
    monkeypatch.setenv("METABENCH_CUDA_GRAPHS", value)
    assert cudagraph.enabled() is on


def test_a_bad_switch_value_is_named(monkeypatch):
    monkeypatch.setenv("METABENCH_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="METABENCH_CUDA_GRAPHS must be 0 or 1"):
        cudagraph.enabled()


def test_a_capture_is_for_its_key_and_shapes():
    step = cudagraph.CapturedStep(lambda *x: None, ("opt", 5))
    a = [torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)]
    assert step.matches(("opt", 5), a)  # (nothing seen yet: any shapes)
    step.shapes = cudagraph.signature(a)
    assert step.matches(("opt", 5), [torch.ones(2, 3), torch.ones(2, dtype=torch.long)])
    assert not step.matches(("opt", 5), [torch.zeros(3, 3), torch.zeros(3, dtype=torch.long)])
    assert not step.matches(("other", 5), a)


def test_the_cpu_never_captures(synthetic_set):
    m = MAML(meta_batch=2, task_batch=2, hidden=4, seed=0).setup(synthetic_set.task_info())
    m.fit(synthetic_set.stream("train"), 3)
    assert getattr(m, "_captured", None) is None
    assert not any(g.get("capturable") for g in m.optimizer.param_groups)

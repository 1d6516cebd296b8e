"""On a CUDA device (skipped without one; marked `cuda`): every method on the GPU, MAML's meta-gradient against
the CPU's in float64, the captured CUDA-graph step against the eager one (baselines/cudagraph.py), resume,
and a whole run through the harness.

CI has no GPU, so these skip there; scripts/gpu_check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from baselines import registry
from baselines.maml import MAML
from baselines.metasgd import MetaSGD
from baselines.taskbatch import stack_episodes, tasks_loss
from bench.api import Episode
from bench.checks import make_subject, predict

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 as on the CPU: TF32 off for convolutions and matmuls (cuDNN convolutions default to it)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def double_on(ep: Episode, device: torch.device) -> Episode:
    return Episode(ep.support_x.double().to(device), ep.support_y.to(device), ep.query_x.double().to(device),
                   ep.query_y.to(device), ep.classes, ep.split, ep.index, ep.spec_hash)


def meta_gradient(synthetic_set, device: torch.device, batched: bool, first_order: bool) -> list[torch.Tensor]:
    """float64 meta-gradient of 3 tasks' mean query loss after 2 inner steps, on `device` (back on the CPU)."""
    m = MAML(meta_batch=3, hidden=8, seed=1, inner_steps=2, inner_lr=0.3, first_order=first_order)
    m.setup(synthetic_set.task_info())
    m.meta = {k: v.detach().double().to(device).requires_grad_(True) for k, v in m.meta.items()}
    eps = [double_on(synthetic_set.episode("train", i), device) for i in range(3)]
    if batched:
        sx, sy, qx, qy = stack_episodes(eps)
        fast = m.inner_tasks(m.meta, (sx, sy), m.inner_steps, first_order, eps[0].way)
        loss = tasks_loss(m.forward_tasks, eps[0].way)(fast, qx, qy) / len(eps)
    else:
        loss = sum(m.task_loss(ep) for ep in eps) / len(eps)
    return [g.cpu() for g in torch.autograd.grad(loss, list(m.meta.values()))]


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("batched", [False, True], ids=["per-task", "task-batched"])
def test_maml_meta_gradient_on_cuda_equals_the_cpus_float64(synthetic_set, batched, first_order):
    cpu = meta_gradient(synthetic_set, torch.device("cpu"), batched, first_order)
    gpu = meta_gradient(synthetic_set, CUDA, batched, first_order)
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (a - b).abs().max().item()


def near(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 round-off taken in another order on another device, grown by up to 100 steps of an
    inner optimizer (Reptile's Adam, finetune's SGD): 1e-3 of the logits' scale."""
    scale = 1.0 + a.double().abs().max().item()
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.parametrize("name", registry.METHODS.names())
def test_every_method_adapts_like_the_cpu_and_trains_on_cuda(name):
    """Same meta-parameters from the seed on either device, the same adapted predictions (float32 round-off),
    then four outer steps (past the check-time phase boundary of LEO and scale-and-shift, 2) and a prediction on
    the GPU with everything kept there."""
    s = make_subject(name)
    ep = s.episode()
    on_cpu = s.ready()
    m = s.new()
    m.device = CUDA
    m.setup(s.info())
    assert near(predict(on_cpu, ep), predict(m, ep.to(CUDA)).cpu()), name
    m.fit((e.to(CUDA) for e in s.train_stream()), 4)
    logits = predict(m, ep.to(CUDA))
    assert logits.device.type == "cuda" and logits.shape == (len(ep.query_y), ep.way)
    assert torch.isfinite(logits).all(), name


@pytest.fixture
def deterministic():
    """cuDNN's deterministic algorithms (some of its convolution backwards add with atomics, in an order that
    changes from run to run); restored after."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def fit_batched(cls: type, steps: int, graphs: str, monkeypatch, start: dict | None = None,
                task_batch: int = 4) -> MAML:
    """A task-batched learner of `cls` on CUDA (meta-batch 4) fitted `steps` outer steps
    (METABENCH_CUDA_GRAPHS=graphs), from state `start` when given."""
    from bench.checks import episode_set

    monkeypatch.setenv("METABENCH_CUDA_GRAPHS", graphs)
    m = cls(meta_batch=4, task_batch=task_batch, hidden=16, seed=3, inner_steps=2, inner_lr=0.3)
    m.device = CUDA
    if start is None:
        m.setup(make_subject("maml").info())
    else:
        m.load_state_dict(start)
    first = m.fit_episodes
    m.fit((e.to(CUDA) for e in episode_set(5, 1, 5).stream("train", first)), steps)
    torch.cuda.synchronize()
    return m


@pytest.mark.parametrize("cls", [MAML, MetaSGD], ids=["maml", "metasgd"])
def test_the_captured_step_gives_the_eager_steps_bits(cls, monkeypatch, deterministic):
    eager = fit_batched(cls, 6, "0", monkeypatch)
    graphed = fit_batched(cls, 6, "1", monkeypatch)
    assert getattr(eager, "_captured", None) is None
    assert graphed._captured.graph is not None  # (steps 3-6 replayed the graph)
    for k in eager.meta:
        assert torch.equal(eager.meta[k], graphed.meta[k]), (k, (eager.meta[k] - graphed.meta[k]).abs().max().item())


def test_task_batch_1_on_a_gpu_is_the_whole_meta_batch_replayed(monkeypatch, deterministic):
    default = fit_batched(MAML, 4, "1", monkeypatch, task_batch=1)
    explicit = fit_batched(MAML, 4, "1", monkeypatch, task_batch=4)
    assert default._captured.graph is not None
    for k in default.meta:
        assert torch.equal(default.meta[k], explicit.meta[k]), k


def test_a_resumed_graphed_run_continues_as_an_unbroken_one(monkeypatch, deterministic):
    whole = fit_batched(MAML, 8, "1", monkeypatch)
    half = fit_batched(MAML, 4, "1", monkeypatch)
    resumed = fit_batched(MAML, 4, "1", monkeypatch, start=half.state_dict())
    assert resumed.fit_steps == 8 and resumed._captured.graph is not None
    for k in whole.meta:
        assert torch.equal(whole.meta[k], resumed.meta[k]), k


def test_a_cpu_checkpoint_resumes_on_the_gpu(monkeypatch):
    """Adam's step counts move to the device on load (its capturable setting is the learner's)."""
    from bench.checks import episode_set

    m = MAML(meta_batch=4, task_batch=4, hidden=16, seed=3, inner_steps=2, inner_lr=0.3)
    m.setup(make_subject("maml").info())
    m.fit(episode_set(5, 1, 5).stream("train"), 1)
    resumed = fit_batched(MAML, 4, "1", monkeypatch, start=m.state_dict())
    assert resumed._captured.graph is not None
    assert all(torch.isfinite(v).all() for v in resumed.meta.values())
    back = MAML(meta_batch=4, task_batch=4, hidden=16, seed=3, inner_steps=2, inner_lr=0.3)
    back.load_state_dict({k: v for k, v in resumed.state_dict().items()})
    assert all(s["step"].device.type == "cpu" for s in back.optimizer.state.values())
    back.fit(episode_set(5, 1, 5).stream("train", back.fit_episodes), 1)


def test_a_run_on_cuda_writes_its_rows_says_where_it_ran_and_repeats(tmp_path):
    from bench.results import read_csv
    from bench.runner import RunConfig, RunDirs, run

    cfg = RunConfig(method="fomaml", benchmark="synthetic-5w1s", seed=0, steps=3, chunk=1, val_episodes=2,
                    test_episodes=4, device="cuda", overrides=dict(meta_batch=2, task_batch=2, hidden=8))
    rows = [read_csv(run(cfg, RunDirs(tmp_path / d / "root", tmp_path / d / "results", tmp_path / d / "runs"),
                         progress=False)) for d in ("a", "b")]
    assert len(rows[0]) == 4 and rows[0]["accuracy"].between(0, 1).all()
    assert set(rows[0]["device"]) == {"cuda-" + torch.cuda.get_device_name(0).replace(" ", "_")}
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    # the same seed twice: the same numbers (cuDNN's deterministic algorithms, resolve_device)
    assert rows[0]["loss"].tolist() == rows[1]["loss"].tolist()


def test_perf_no_tf32_turns_tf32_off_in_its_worker_and_says_so(monkeypatch):
    from bench import perf

    tiny = perf.Workload("omniglot", 3, 1, 2, channels=1, size=28, hidden=4, meta_batch=2, inner_steps=1,
                         inner_lr=0.4, test_steps=2)
    monkeypatch.setitem(perf.WORKLOADS, "tiny", tiny)
    job = {"workload": "tiny", "impl": "metabench", "method": "maml", "allocator": "glibc", "threads": 1,
           "device": "cuda", "repeats": 1, "warmup": 0, "eval_episodes": 2}
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # (the fixture restores them)
    assert perf.measure(job)["tf32"] == "conv on, matmul on"
    assert perf.measure(job | {"no_tf32": True})["tf32"] == "conv off, matmul off"

"""The `metabench` command line: ls, run, leaderboard, demo, data, check, submit, perf."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path

from bench.errors import MetabenchError
from bench.paths import resolve_root


def cmd_ls(args: argparse.Namespace) -> int:
    """List methods, benchmarks and sources (built-in and installed)."""
    from bench.benchmarks import BENCHMARKS
    from bench.sources import SOURCES
    from baselines.registry import METHODS, method_class

    print("methods:")
    for name, entry in METHODS.entries().items():
        presets = method_class(name).PRESETS
        paper = next(iter(presets.values())).paper.split(".")[0] if presets else "no presets"
        print(f"  {name:12s} {entry.target:32s} {paper}")
    print("benchmarks:")
    suites = []
    for name in BENCHMARKS:
        b = BENCHMARKS.get(name)
        if b.is_suite:
            suites.append(b)
            continue
        print(f"  {name:22s} v{b.version} {b.source:14s} {b.protocol.shape()}, "
              f"{b.test_episodes} test episodes, {b.image_size}px")
    print("suites (train once, test on each member; one CSV per member):")
    for b in suites:
        train = ", ".join(b.protocol.split_sources(b, "train"))
        print(f"  {b.name:22s} v{b.version} train on {train}; validate on {b.protocol.split_sources(b, 'val')[0]}; "
              f"test {len(b.members)} benchmarks: {', '.join(b.members)}")
    print("sources:")
    for name, entry in SOURCES.entries().items():
        print(f"  {name:14s} {entry.about}")
    return 0


def parse_overrides(items: list[str]) -> dict:
    """`key=value` pairs; values parsed as Python literals when possible (numbers, booleans)."""
    import ast

    out = {}
    for item in items:
        if "=" not in item:
            raise MetabenchError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def cmd_run(args: argparse.Namespace) -> int:
    """Run one method on one benchmark."""
    from bench.report import preset_note, run_summary
    from bench.runner import RunConfig, RunDirs, run, warn_oversubscription

    root = resolve_root(args.root)
    cfg = RunConfig(args.method, args.benchmark, args.seed, args.steps, args.chunk, args.val_episodes,
                    args.test_episodes, parse_overrides(args.set), args.patience, args.label, args.device,
                    args.step_curve, args.permutations, args.flops, args.axis_episodes, args.fused)
    dirs = RunDirs(root, Path(args.results), Path(args.runs) if args.runs else root / "runs")
    warn_oversubscription()
    note = None if args.quiet else preset_note(cfg, dirs, args.restart)
    if note:
        print(note, file=sys.stderr, flush=True)
    path = run(cfg, dirs, restart=args.restart, overwrite=args.overwrite, progress=not args.quiet)
    print(run_summary(path, dirs.runs))
    return 0


DEMO_BENCHMARK = "glyphs-5w1s"
# Short budgets so the demo finishes in minutes on 2 CPU cores: paper settings otherwise, except
# MAML's meta-batch (32 -> 8 tasks) and outer lr (1e-3 -> 3e-3), so a short budget still learns.
DEMO_PLAN = {
    "maml": dict(steps=150, chunk=75, overrides=dict(meta_batch=8, outer_lr=3e-3)),
    "fomaml": dict(steps=150, chunk=75, overrides=dict(meta_batch=8, outer_lr=3e-3)),
    "finetune": dict(steps=200, chunk=100, overrides=dict()),
}
DEMO_VAL_EPISODES = 50
# The steps and permutation axes (several evaluations per episode) on the first 100 test episodes only.
DEMO_AXIS_EPISODES = 100


def cmd_demo(args: argparse.Namespace) -> int:
    """Train maml, fomaml and finetune briefly on glyphs-5w1s, test on 600 episodes, build the page."""
    from bench.runner import RunConfig, RunDirs, run
    from leaderboard.build import build_site

    root = resolve_root(args.root)
    out = Path(args.out)
    dirs = RunDirs(root, out / "results", out / "runs")
    start = time.perf_counter()
    for method, plan in DEMO_PLAN.items():
        cfg = RunConfig(method, DEMO_BENCHMARK, args.seed, plan["steps"], plan["chunk"], val_episodes=DEMO_VAL_EPISODES,
                        overrides=plan["overrides"], label=method, device=args.device,
                        axis_episodes=DEMO_AXIS_EPISODES)
        print(f"[demo] {method} on {DEMO_BENCHMARK}: {plan['steps']} outer steps", flush=True)
        run(cfg, dirs)
    index = build_site([dirs.results], out / "site")
    from bench.results import read_results
    from bench.stats import summarize

    table = summarize(read_results(dirs.results))
    print(f"\n[demo] finished in {time.perf_counter() - start:.0f} s")
    for _, row in table.iterrows():
        print(f"  {row['method']:10s} {100 * row['mean']:.1f}% ± {100 * row['ci95']:.1f}% "
              f"({int(row['n_episodes'])} test episodes)")
    print(f"[demo] results:     {dirs.results}")
    print(f"[demo] leaderboard: {index}")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, unless its help text already names one or it has none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `metabench`."""
    from bench import __version__

    p = argparse.ArgumentParser(prog="metabench", description="Benchmark and leaderboard for meta-initialization methods.",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"metabench {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ls", help="list methods, benchmarks and sources")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("run", help="run METHOD on BENCHMARK and write per-episode results")
    s.add_argument("method", help="a registered method or pkg.module:Class")
    s.add_argument("benchmark", help="a registered benchmark, pkg.module:NAME, or a benchmark .toml file")
    s.add_argument("--seed", type=int, default=0, help="training seed (seeds 0, 1, 2 for a ranked leaderboard row)")
    s.add_argument("--steps", type=int, default=None,
                   help="outer updates (default: the method's preset for the benchmark, announced with an estimate "
                        "of its time before starting)")
    s.add_argument("--chunk", type=int, default=100, help="outer updates between checkpoints")
    s.add_argument("--val-episodes", type=int, default=None, help="validation episodes (default: the benchmark's)")
    s.add_argument("--test-episodes", type=int, default=None,
                   help="test episodes (default: the benchmark's; fewer make an unranked row)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a hyperparameter")
    s.add_argument("--patience", type=int, default=None,
                   help="stop early after this many checkpoints without a better validation accuracy")
    s.add_argument("--results", default="results", help="results folder (CSV and run card per run)")
    s.add_argument("--runs", default=None, help="checkpoint folder (default: ROOT/runs)")
    s.add_argument("--label", default=None,
                   help="the method column and folder of the results (default: METHOD, or METHOD+<params hash> "
                        "when --set overrides hyperparameters)")
    s.add_argument("--restart", action="store_true",
                   help="start from step 0, moving the old checkpoints aside (default: continue from them)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a result of other hyperparameters at the same path (default: an error)")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint (the default already)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    s.add_argument("--quiet", action="store_true", help="no progress bars or announcements; only the final summary")
    s.add_argument("--root", default=None, help="data folder (default: per-user cache)")
    from bench.grid import FUSED_HELP, add_axis_flags

    s.add_argument("--fused", action="store_true", default=False,
                   help=FUSED_HELP + " (default: as METABENCH_FUSED says)")

    add_axis_flags(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", help="train 3 methods briefly on the embedded glyphs data and build the page")
    s.add_argument("--out", default="metabench-demo", help="folder of the demo's results, checkpoints and site")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    s.add_argument("--seed", type=int, default=0, help="training seed of the three runs")
    s.add_argument("--root", default=None, help="data folder (default: per-user cache)")
    s.set_defaults(func=cmd_demo)

    for module in ("leaderboard.build", "bench.data", "bench.checks", "bench.bundle", "bench.validation",
                   "bench.verify", "bench.report", "bench.grid", "bench.perf"):
        if importlib.util.find_spec(module) is not None:  # command groups of optional modules
            importlib.import_module(module).add_cli(sub)
    stack = list(sub.choices.values())
    while stack:  # every command and subcommand shows its defaults
        parser = stack.pop()
        parser.formatter_class = HelpFormatter
        stack += [c for a in parser._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values()]
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `metabench` console command (re-run under tcmalloc where installed)."""
    if argv is None:
        from bench.allocator import reexec_with_tcmalloc

        reexec_with_tcmalloc(sys.argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MetabenchError as e:
        print(f"metabench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output folder that is read-only, full, or under a file
        where = f"{e.filename}: " if e.filename else ""
        what = ("a file is in the way of a folder" if isinstance(e, (FileExistsError, NotADirectoryError))
                else e.strerror or str(e))
        print(f"metabench: error: {where}{what} (nothing else was written)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metabench: interrupted (run the same command again to continue)", file=sys.stderr)
        return 130

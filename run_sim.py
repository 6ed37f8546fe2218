#!/usr/bin/env python
"""WarmFed-Sim command line: `run`, `list`, `partition`, `sweep`, `tune`.

    python run_sim.py run                                   # the embedded default comparison
    python run_sim.py run --config cfg.yaml --set rounds=10 --set algorithms=fedavg,warmfed
    python run_sim.py run --resume results/<run_id>         # continue an interrupted run
    python run_sim.py list                                  # algorithms, datasets, partition schemes
    python run_sim.py partition --config cfg.yaml           # build/find the partition, print its stats
    python run_sim.py sweep --config cfg.yaml --grid algorithms=fedavg,warmfed --grid num_clients=10,100 \
        --grid seed=0,1,2 [--name NAME]                     # every cell of the grid; rerun to resume
    python run_sim.py tune --config configs/benchmark.yaml --search-rounds 3 --search-seeds 0
                                                            # per-algorithm search on validation, then the seeds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults apply to every key it leaves out)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set partition.alpha=0.1 (repeatable)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from sim.config import load_config
    from sim.orchestration.report import markdown_table, summary_table, write_report
    from sim.orchestration.runner import run_comparison
    from sim.results import read_metrics

    if args.resume:
        from sim.typed import ConfigError

        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise ConfigError(f"--resume {run_dir}: no such directory")
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there (not a run directory)")
        cfg = load_config(run_dir / "config.yaml", args.set)
    else:
        cfg = load_config(args.config, args.set)
    result = run_comparison(cfg)
    report = write_report(result.run_dir, reference=args.reference)  # the paired column against --reference
    table = summary_table(read_metrics(result.run_dir).to_pandas(), reference=args.reference)
    print(markdown_table(table))
    print(f"\nresults: {result.run_dir}")
    print(f"report:  {report}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from algorithms.registry import algorithm_names, get_algorithm
    from sim.data import dataset_names, dataset_params_cls
    from sim.models import model_names
    from sim.partition import scheme_names, scheme_params_cls
    from sim.typed import describe_fields

    print("algorithms:")
    for name in algorithm_names():
        cls = get_algorithm(name)
        print(f"  {name:<14} {cls.describe()}")
    print("datasets:")
    for name in dataset_names():
        print(f"  {name:<14} {describe_fields(dataset_params_cls(name))}")
    print("partition schemes:")
    for name in scheme_names():
        print(f"  {name:<16} {describe_fields(scheme_params_cls(name))}")
    print("models:")
    for name in model_names():
        print(f"  {name}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from sim.config import load_config
    from sim.data import load_dataset
    from sim.orchestration.partition_build import partition_for
    from sim.partition import describe

    cfg = load_config(args.config, args.set)
    dataset = load_dataset(cfg.dataset, cfg.data)
    for seed in cfg.seeds:
        partition, path = partition_for(cfg, dataset, seed)
        print(describe(partition, dataset.labels, dataset.num_classes))
        print(f"partition: {path}")
        print(f"plot:      {path / 'heatmap.png'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from sim.orchestration.report import markdown_table
    from sim.orchestration.sweep import run_sweep

    result = run_sweep(
        args.config, args.set, args.grid, args.name, note=lambda text: print(text, flush=True), reference=args.reference
    )
    if not result.summary.empty:
        print(markdown_table(result.summary))
    print(f"\nsweep:   {result.sweep.dir}")
    print(f"results: {result.sweep.results_path}")
    print(f"summary: {result.summary_path}")
    for path in result.plots:
        print(f"plot:    {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from sim.orchestration.report import markdown_table
    from sim.orchestration.tune import plan_tune, run_tune

    plan = plan_tune(
        args.config,
        args.set,
        args.grid,
        args.space,
        args.search_rounds,
        args.search_seeds,
        args.untuned,
        args.name,
        args.shared_only,
    )
    result = run_tune(plan, note=lambda text: print(text, flush=True), reference=args.reference)
    for algo, point in result.chosen.items():
        print(f"chosen {algo}: " + (", ".join(f"{k}={v}" for k, v in point.items()) or "(defaults)"))
    if not result.final.empty:
        print(markdown_table(result.final))
    print(f"\nsearch {result.search_s:.0f} s, final {result.final_s:.0f} s")
    print(f"report: {result.report_path}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _add_reference_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reference",
        default="fedavg",
        metavar="NAME",
        help="the method every table's paired Δ column compares with (default fedavg)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="run_sim.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a comparison of algorithms")
    _add_config_args(run)
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this directory")
    _add_reference_arg(run)
    run.set_defaults(func=cmd_run)
    lst = sub.add_parser("list", help="list algorithms, datasets, partition schemes and models")
    lst.set_defaults(func=cmd_list)
    part = sub.add_parser("partition", help="build or find the partition and print its statistics")
    _add_config_args(part)
    part.set_defaults(func=cmd_partition)
    sweep = sub.add_parser("sweep", help="run every cell of a grid of config values (rerun to resume)")
    _add_config_args(sweep)
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a config key and its values; cells are the cartesian product of all --grid keys",
    )
    sweep.add_argument(
        "--name",
        help="sweep name (default: a hash of --config, --set and --grid); "
        "the same name resumes, skipping finished cells",
    )
    _add_reference_arg(sweep)
    sweep.set_defaults(func=cmd_sweep)
    tune = sub.add_parser(
        "tune",
        help="search each algorithm's hyper-parameters on validation, then run the "
        "chosen settings over the seeds (rerun to resume)",
    )
    _add_config_args(tune)
    tune.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a shared hyper-parameter searched for every algorithm (default: train.lr=0.005,0.01,0.02)",
    )
    tune.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="ALGO.PARAM=V1,V2,...",
        help="replace one axis of an algorithm's own search space, e.g. fedprox.mu=0.01,0.1",
    )
    tune.add_argument(
        "--search-rounds", type=int, metavar="N", help="rounds of each search run (default: the config's)"
    )
    tune.add_argument(
        "--search-seeds", type=_int_list, metavar="S1,S2", help="seeds of the search (default: the config's)"
    )
    tune.add_argument(
        "--untuned",
        type=lambda t: t.split(","),
        default=[],
        metavar="ALGO,...",
        help="algorithms run with their defaults (not searched), e.g. warmfed when its cost rules tuning out",
    )
    tune.add_argument(
        "--shared-only",
        action="store_true",
        help="search only the shared --grid keys (the algorithms' own spaces stay at their defaults)",
    )
    tune.add_argument("--name", help="tuning name (default: a hash of the command); the same name resumes")
    _add_reference_arg(tune)
    tune.set_defaults(func=cmd_tune)
    args = parser.parse_args(argv)

    from sim.errors import UserError
    from sim.orchestration.interrupts import RunInterrupted, catch_signals, status

    try:
        with catch_signals():
            if args.command != "run":  # a sweep resumes by running the same command again
                import shlex

                status.resume = "run_sim.py " + " ".join(
                    shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
                )
            return args.func(args)
    except RunInterrupted as exc:
        if not exc.printed:
            print(exc.line(), file=sys.stderr, flush=True)
        return exc.exit_code
    except UserError as exc:
        cause = getattr(exc, "cause", None) or exc  # an error raised inside a Ray actor: show the original
        print(f"error: {cause}", file=sys.stderr)
        return 2
    except BaseException:
        if status.signum is not None:  # Ray cut short by the interrupt raised its own error: the line is out
            return 128 + status.signum
        raise


if __name__ == "__main__":
    sys.exit(main())

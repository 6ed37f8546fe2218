"""`run_sim.py tune`: per-algorithm hyper-parameter search on validation, then the chosen settings over the seeds.

    python run_sim.py tune --config configs/benchmark.yaml [--grid train.lr=0.005,0.01,0.02] \\
        [--space fedprox.mu=0.01,0.1] [--search-rounds 5 --search-seeds 0] [--untuned warmfed] \\
        [--reference fedavg] [--name NAME]

Protocol. Every algorithm's grid is the shared keys (`--grid`, default `train.lr`) times its own
`search_space` (the class attribute; `--space ALGO.PARAM=v1,v2` replaces one axis). Each grid point
is one sweep cell run at the search budget (`--search-rounds` rounds, `--search-seeds` seeds; by
default the config's). A point's score is its validation accuracy — global accuracy for methods
whose personalized model is the global one (FedAvg, FedProx, SCAFFOLD, MOON), personalized
accuracy for every other method — at the best round on validation, averaged over the search
seeds; the best point wins (best as sim/metrics.py declares the criterion; ties: the first in
grid order). Only validation rows are read to choose: test accuracy is never looked at. The
chosen settings then run at the full budget over the config's seeds (the final sweep), reported
like any run: the validation-selected round, mean ± std over seeds, the paired difference to the
reference, and every other declared client metric.

Both sweeps live under `<out>/sweeps/<name>-search` and `<name>-final` (resumable: run the same
command again), on one Ray connection and one partition cache; the report is
`<out>/tunes/<name>/report.md` (+ `chosen.json`, `grid.csv`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow.parquet as pq

from sim.config import RunConfig, algorithm_spec, load_config, parse_override, run_algorithms
from sim.metrics import GLOBAL_ACC, PERSONAL_ACC, metric
from sim.orchestration.sweep import _NAME, FIXED_KEYS, Cell, Sweep, _text, cell_id, execute_sweep
from sim.typed import ConfigError

if TYPE_CHECKING:
    from algorithms.base import Algorithm

#: The shared hyper-parameters searched for every algorithm unless `--grid` says otherwise.
DEFAULT_SHARED = {"train.lr": [0.005, 0.01, 0.02]}


@dataclass(frozen=True)
class Plan:
    name: str
    out: Path
    algorithms: list[str]
    untuned: list[str]
    shared: list[dict[str, Any]]  # the shared grid points (override key -> value), in order
    own: dict[str, list[dict[str, Any]]]  # algorithm -> its own grid points (override key -> value)
    criteria: dict[str, str]  # algorithm -> the metric it is chosen on (GLOBAL_ACC | PERSONAL_ACC)
    search: Sweep
    labels: dict[str, tuple[str, int]]  # run name in a search cell -> (algorithm, own point index)
    base: RunConfig
    config: str | None
    sets: list[str]

    @property
    def dir(self) -> Path:
        return self.out / "tunes" / self.name

    def points(self, algo: str) -> int:
        return 0 if algo in self.untuned else len(self.shared) * len(self.own[algo])


@dataclass(frozen=True)
class TuneResult:
    plan: Plan
    chosen: dict[str, dict[str, Any]]
    report_path: Path
    final: Any  # the final table (pandas)
    search_s: float
    final_s: float


def criterion(cls: type[Algorithm]) -> str:
    """What a method is chosen on: its personalized model's validation accuracy when it has one of its
    own (pFL), else the global model's."""
    from algorithms.base import Algorithm

    personal = (
        cls.personal_weights is not Algorithm.personal_weights
        or bool(cls.personal_patterns)
        or not cls.has_global_model
    )
    return PERSONAL_ACC if personal else GLOBAL_ACC


def _param_key(cfg: RunConfig, name: str, param: str) -> str:
    return f"variants.{name}.{param}" if name in cfg.variants else f"algo.{name}.{param}"


def parse_space(items: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """`ALGO.PARAM=v1,v2` per item -> {algo: {param: [values]}}."""
    space: dict[str, dict[str, list[Any]]] = {}
    for text in items:
        key, value = parse_override(text)
        if "." not in key:
            raise ConfigError(f"--space {text}: expected ALGO.PARAM=v1,v2 (e.g. fedprox.mu=0.01,0.1)")
        algo, param = key.rsplit(".", 1)
        space.setdefault(algo, {})[param] = value if isinstance(value, list) else [value]
    return space


def parse_shared(items: Sequence[str]) -> dict[str, list[Any]]:
    shared: dict[str, list[Any]] = {}
    for text in items:
        key, value = parse_override(text)
        if key in FIXED_KEYS or key.startswith("ray.") or key in ("algorithms", "seed", "rounds"):
            raise ConfigError(f"--grid {key}: not a hyper-parameter the tuner can search")
        if key in shared:
            raise ConfigError(f"--grid {key}: given twice; list all its values in one --grid {key}=v1,v2")
        shared[key] = value if isinstance(value, list) else [value]
    return shared


def own_grid(cfg: RunConfig, name: str, space: dict[str, dict[str, list[Any]]]) -> list[dict[str, Any]]:
    """An algorithm's own grid points (its `search_space`, axes replaced by --space), as Params values."""
    cls, _ = algorithm_spec(cfg, name)
    own = {p: list(v) for p, v in getattr(cls, "search_space", {}).items()}
    for param, values in space.get(name, {}).items():
        if not dataclasses.is_dataclass(cls.Params) or param not in {f.name for f in dataclasses.fields(cls.Params)}:
            raise ConfigError(
                f"--space {name}.{param}: {name} has no hyper-parameter {param!r}; it has: {cls.describe() or '(none)'}"
            )
        own[param] = list(values)
    keys = list(own)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*own.values())] if keys else [{}]


def product(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes.values())] if keys else [{}]


def _variant_overrides(cfg: RunConfig, algo: str, run_name: str, point: dict[str, Any]) -> list[str]:
    """--set lines that define `run_name` as `algo` (a registered name or a config variant) with `point`."""
    spec = dict(cfg.variants.get(algo, {"algorithm": algo}))
    spec.update(point)
    return [f"variants.{run_name}.{k}={json.dumps(v)}" for k, v in spec.items()]


def _load(config: str | None, overrides: list[str], where: str) -> RunConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({where})") from None


def plan_tune(
    config: str | None,
    sets: Sequence[str],
    grid_items: Sequence[str] = (),
    space_items: Sequence[str] = (),
    search_rounds: int | None = None,
    search_seeds: Sequence[int] | None = None,
    untuned: Sequence[str] = (),
    name: str | None = None,
    shared_only: bool = False,
) -> Plan:
    """Every search cell's config is built and validated here; nothing runs (`shared_only`: the
    algorithms' own search spaces are left at their defaults, the cheap budget). A search cell is one
    shared grid point with every algorithm's own grid points in it, each a named variant
    (`<algo>@<i>`): one actor pool per shared point instead of one per grid point."""
    base = load_config(config, sets)
    if any(parse_override(s)[0] == "run_id" for s in sets):
        raise ConfigError("--set run_id: a tuning run names its cells itself; use --name to name it")
    shared_axes = parse_shared(grid_items) if grid_items else {k: list(v) for k, v in DEFAULT_SHARED.items()}
    space = parse_space(space_items)
    algorithms = run_algorithms(base)
    for algo in [*space, *untuned]:
        if algo not in algorithms:
            raise ConfigError(f"tune: {algo!r} is not among the config's algorithms ({', '.join(algorithms)})")
    if search_rounds is not None and search_rounds < 1:
        raise ConfigError(f"--search-rounds must be >= 1, got {search_rounds}")
    seeds = list(search_seeds) if search_seeds else base.seeds
    blob = json.dumps(
        {
            "config": Path(config).read_text() if config else None,
            "set": list(sets),
            "grid": shared_axes,
            "space": space,
            "rounds": search_rounds,
            "seeds": seeds,
            "untuned": list(untuned),
            "shared_only": shared_only,
        },
        sort_keys=True,
        default=str,
    )
    name = name or "tune-" + hashlib.sha256(blob.encode()).hexdigest()[:8]
    if not _NAME.match(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    out = Path(base.out).resolve()
    cache = str(base.cache_path.resolve())
    extra = [f"seed={json.dumps(seeds)}"] + ([f"rounds={search_rounds}"] if search_rounds is not None else [])
    search_dir = out / "sweeps" / f"{name}-search"
    criteria = {algo: criterion(algorithm_spec(base, algo)[0]) for algo in algorithms}
    tuned = [a for a in algorithms if a not in untuned]
    own: dict[str, list[dict[str, Any]]] = {
        algo: [{}] if shared_only else own_grid(base, algo, space) for algo in tuned
    }
    labels: dict[str, tuple[str, int]] = {}
    variant_sets: list[str] = []
    for algo in tuned:
        for i, point in enumerate(own[algo]):
            run_name = f"{algo}@{i}"
            labels[run_name] = (algo, i)
            variant_sets += _variant_overrides(base, algo, run_name, point)
    shared = product(shared_axes)
    cells = []
    if tuned:
        for point in shared:
            overrides = [f"{k}={json.dumps(v)}" for k, v in point.items()]
            where = "search cell " + (", ".join(f"{k}={_text(v)}" for k, v in point.items()) or "(defaults)")
            cfg = _load(
                config, [*sets, *extra, *variant_sets, f"algorithms={json.dumps(list(labels))}", *overrides], where
            )
            cid = cell_id({**point, "budget": extra, "runs": {k: own[a][i] for k, (a, i) in labels.items()}})
            cells.append(
                Cell(
                    cid,
                    dict(point),
                    dataclasses.replace(cfg, out=str(search_dir / "cells"), cache_dir=cache, run_id=cid),
                )
            )
    search = Sweep(
        f"{name}-search", search_dir, {k: list(v) for k, v in shared_axes.items()}, cells, config, [*sets, *extra]
    )
    return Plan(name, out, algorithms, list(untuned), shared, own, criteria, search, labels, base, config, list(sets))


# ----------------------------------------------------------------------------------- choosing
def validation_scores(results: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """One row per (algorithm, grid point): validation score = mean and std over the search seeds of
    the best-round validation value of the algorithm's criterion (combined over clients and best as
    the criterion is declared). Only `split == "val"` rows are read."""
    from sim.orchestration.report import per_round

    val = results[results["split"] == "val"]
    columns = ["algorithm", "seed", "round", "client_id", "split", "metric", "value"]
    criteria = list(dict.fromkeys(plan.criteria.values()))
    rows = []
    for s_index, cell in enumerate(plan.search.cells):
        acc = per_round(val[val["cell"] == cell.id][columns], criteria, "val")
        for run_name, (algo, i) in plan.labels.items():
            name = plan.criteria[algo]
            mine = acc[acc["algorithm"] == run_name] if not acc.empty else acc
            best = (
                mine.groupby("seed")[name].agg(metric(name).best)
                if name in mine and not mine.empty
                else pd.Series(dtype=float)
            )
            point = {**cell.values, **{_param_key(plan.base, algo, k): v for k, v in plan.own[algo][i].items()}}
            rows.append(
                {
                    "algorithm": algo,
                    "order": (plan.algorithms.index(algo), s_index, i),
                    "point": point,
                    "shared": s_index,
                    "own": i,
                    "criterion": name,
                    "val_mean": float(best.mean()) if len(best) else float("nan"),
                    "val_std": float(best.std(ddof=1)) if len(best) > 1 else 0.0,
                    "seeds": int(len(best)),
                }
            )
    if not rows:
        return pd.DataFrame(columns=["algorithm", "point", "val_mean"])
    return pd.DataFrame(rows).sort_values("order", kind="stable").drop(columns="order").reset_index(drop=True)


def choose(scores: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per algorithm, the grid point with the best validation score, best as its criterion is declared
    (the first one in grid order on ties)."""
    chosen: dict[str, dict[str, Any]] = {}
    for algo, g in scores.groupby("algorithm", sort=False):
        g = g[g["val_mean"].notna()]
        if g.empty:
            raise ConfigError(f"tune: no validation score for {algo} (did its search runs evaluate?)")
        best = metric(g["criterion"].iloc[0]).best
        chosen[algo] = dict(g.loc[getattr(g["val_mean"], f"idx{best}")(), "point"])
    return chosen


# ----------------------------------------------------------------------------------- running
def final_sweep(plan: Plan, chosen: dict[str, dict[str, Any]]) -> Sweep:
    """The chosen settings at the full budget over the config's seeds: one cell per chosen shared point
    holding the algorithms that chose it (each under its own name, with its chosen `algo.*` values);
    the id hashes the chosen values, so a re-tune that picks other values runs again."""
    out = plan.out / "sweeps" / f"{plan.name}-final"
    cache = str(plan.base.cache_path.resolve())
    shared_keys = list(plan.search.grid)
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for algo in plan.algorithms:
        point = chosen.get(algo, {})
        shared = {k: point[k] for k in shared_keys if k in point}
        groups.setdefault(json.dumps(shared, sort_keys=True), (shared, []))[1].append(algo)
    cells = []
    for shared, algos in groups.values():
        own = [f"{k}={json.dumps(v)}" for a in algos for k, v in chosen.get(a, {}).items() if k not in shared]
        overrides = [*[f"{k}={json.dumps(v)}" for k, v in shared.items()], *own, f"algorithms={json.dumps(algos)}"]
        cfg = _load(plan.config, [*plan.sets, *overrides], "final cell " + ", ".join(algos))
        cid = cell_id({"final": {a: chosen.get(a, {}) for a in algos}})
        cells.append(
            Cell(cid, dict(shared), dataclasses.replace(cfg, out=str(out / "cells"), cache_dir=cache, run_id=cid))
        )
    return Sweep(f"{plan.name}-final", out, {}, cells, plan.config, plan.sets)


def final_metrics(sweep: Sweep) -> pd.DataFrame:
    if not sweep.results_path.exists():
        return pd.DataFrame()
    df = pq.read_table(sweep.results_path).to_pandas()
    return df[df["cell"].isin([c.id for c in sweep.cells])].drop(columns=["cell"])


def run_tune(plan: Plan, note: Callable[[str], None] = print, reference: str | None = None) -> TuneResult:
    from sim.orchestration.cluster import connect, shutdown
    from sim.orchestration.warm_actors import keeping_actors

    started = connect(plan.base, f"tune-{plan.name}")  # one Ray connection for the search and the final runs
    try:
        with keeping_actors():  # the search's actors go on to the final runs when they fit
            began = time.perf_counter()
            if plan.search.cells:
                note(f"tune {plan.name}: search, {len(plan.search.cells)} cells of {len(plan.labels)} runs each")
                execute_sweep(plan.search, note, summary=False)
            search_s = time.perf_counter() - began
            scores = validation_scores(_search_results(plan), plan)
            chosen = choose(scores) if not scores.empty else {}
            for algo in plan.untuned:
                chosen[algo] = {}
            plan.dir.mkdir(parents=True, exist_ok=True)
            (plan.dir / "chosen.json").write_text(json.dumps(chosen, indent=2, default=str))
            began = time.perf_counter()
            final = final_sweep(plan, chosen)
            note(f"tune {plan.name}: final runs of the chosen settings, {len(final.cells)} cells")
            execute_sweep(final, note, reference)
            final_s = time.perf_counter() - began
    finally:
        if started:
            shutdown()
    table, path = write_tune_report(plan, scores, chosen, final, reference, search_s, final_s)
    return TuneResult(plan, chosen, path, table, search_s, final_s)


def _search_results(plan: Plan) -> pd.DataFrame:
    path = plan.search.results_path
    if not path.exists():
        return pd.DataFrame(columns=["cell", "split"])
    return pq.read_table(
        path, columns=["cell", "algorithm", "seed", "round", "client_id", "split", "metric", "value"]
    ).to_pandas()


# ----------------------------------------------------------------------------------- report
def _point_text(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_text(v)}" for k, v in point.items()) or "(defaults)"


def _recorded_commits(sweeps: Sequence[Sweep]) -> list[str]:
    """The commits the runs recorded when each started: a tune that outlived a code change lists both."""
    commits: list[str] = []
    for sweep in sweeps:
        for cell in sweep.cells:
            path = cell.dir / "manifest.json"
            commit = json.loads(path.read_text()).get("git_commit") if path.is_file() else None
            if commit and commit not in commits:
                commits.append(commit)
    return commits


def _criterion_label(name: str) -> str:
    return f"{metric(name).title} val acc"


def write_tune_report(
    plan: Plan,
    scores: pd.DataFrame,
    chosen: dict[str, dict[str, Any]],
    final: Sweep,
    reference: str | None,
    search_s: float,
    final_s: float,
) -> tuple[pd.DataFrame, Path]:
    from sim.orchestration.report import (
        DEFAULT_REFERENCE,
        budget_table,
        markdown_table,
        other_client_columns,
        other_client_legend,
        other_client_table,
        paired_note,
        summary_table,
    )
    from sim.orchestration.runner import git_commit

    reference = DEFAULT_REFERENCE if reference is None else reference
    df = final_metrics(final)
    table = summary_table(df, reference=reference) if not df.empty else pd.DataFrame()
    others = other_client_table(df) if not df.empty else pd.DataFrame()
    parts = [budget_table(c.dir, c.cfg.algorithms) for c in final.cells if c.dir.is_dir()]
    budgets = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    search_cfg = plan.search.cells[0].cfg if plan.search.cells else plan.base
    rows = []
    for algo in plan.algorithms:
        rows.append(
            {
                "algorithm": algo,
                "chosen on": "— (untuned: defaults)" if algo in plan.untuned else _criterion_label(plan.criteria[algo]),
                "chosen": _point_text(chosen.get(algo, {})),
                "grid points": plan.points(algo),
            }
        )
    lines = [
        f"# Tuning {plan.name}",
        "",
        f"Config: {plan.config or '(defaults)'}; --set: {' '.join(plan.sets) or '(none)'}; "
        f"git {', '.join(_recorded_commits([plan.search, final])) or git_commit()}.",
        "",
        f"Search: {sum(plan.points(a) for a in plan.algorithms)} grid points ({len(plan.search.cells)} sweep cells) "
        f"at {search_cfg.rounds} rounds, seeds {search_cfg.seeds}; "
        f"{search_s:.0f} s. Final: the chosen settings at {plan.base.rounds} rounds, seeds {plan.base.seeds}; "
        f"{final_s:.0f} s.",
        "",
        "Each grid point is scored by its **validation** accuracy at its best round on validation, mean over the "
        "search seeds: the global model's for methods whose personalized model is the global one, the personalized "
        "model's for the others (column *chosen on*). Test accuracy is never read to choose.",
        "",
        "## Chosen settings",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
        "## Final runs (round chosen on validation)",
        "",
        markdown_table(table) if not table.empty else "(no final runs finished)",
        "",
        paired_note(reference, df if not df.empty else pd.DataFrame({"algorithm": []})),
        "",
    ]
    if not others.empty:
        lines += [
            "## Other client metrics of the final runs (round chosen on validation)",
            "",
            "Every other client metric declared in sim/metrics.py (or by its algorithm, `declare_metric`), "
            "combined over the clients as declared; mean ± std over seeds.",
            "",
            markdown_table(others),
            "",
            *other_client_legend(other_client_columns(df)),
            "",
        ]
    if not budgets.empty:
        lines += ["## Budgets", "", markdown_table(budgets), ""]
    lines += ["## The grid (validation accuracy, mean ± std over search seeds)", ""]
    grid_rows = []
    for _, r in scores.iterrows():
        mark = " **(chosen)**" if r["point"] == chosen.get(r["algorithm"]) else ""
        spread = f" ± {r['val_std']:.3f}" if r["seeds"] > 1 else ""
        grid_rows.append(
            {
                "algorithm": r["algorithm"],
                "setting": _point_text(r["point"]) + mark,
                "on": _criterion_label(r["criterion"]),
                "val acc": f"{r['val_mean']:.3f}{spread}",
            }
        )
    if grid_rows:
        lines += [markdown_table(pd.DataFrame(grid_rows)), ""]
        scores.assign(point=scores["point"].map(_point_text)).to_csv(plan.dir / "grid.csv", index=False)
    else:
        lines += ["(nothing searched)", ""]
    path = plan.dir / "report.md"
    path.write_text("\n".join(lines))
    return table, path

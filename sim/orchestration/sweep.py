"""Sweeps: every cell of a grid of config overrides, each a normal run, on one Ray connection.

    python run_sim.py sweep --config cfg.yaml --grid algorithms=fedavg,warmfed \\
        --grid num_clients=10,100,1000 --grid seed=0,1,2 [--set k=v ...] [--name NAME]

Layout under `<out>/sweeps/<name>/`:

    sweep.json            the command (config, --set, --grid) and the cells with their ids
    cells/<cell-id>/      a run directory (config.yaml, metrics.parquet, report.md, ...) + done.json
    results.parquet       every finished cell's rows, plus `cell` and the cell's grid values as columns
    summary.md            mean ± std over seeds of final accuracies and wall time, and of every other
                          declared client metric (sim/metrics.py); finals.csv, summary.csv
    plots/                acc_vs_clients.png, wall_vs_clients.png

A cell id is a hash of the cell's grid values as the resolved config holds them (so `alpha=1`
and `alpha=1.0` are one cell, and adding values to a grid keeps the ids of the old cells).
Every cell shares one partition/backbone cache (`<out>/cache`, content-addressed, so cells with
the same data parameters share partitions) and one Ray connection. A cell is finished when its
run directory has metrics.parquet and done.json; running the same sweep again skips finished
cells and resumes an interrupted one from its checkpoint. Every cell's config (and its data and
partition) is validated before any cell runs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sim.config import RunConfig, config_mapping, load_config, parse_override, stored_config_matches
from sim.files import replacing, write_json
from sim.metrics import GLOBAL_ACC, PERSONAL_ACC, SELECTION, metric
from sim.typed import ConfigError, to_mapping

#: Keys that must be the same for every cell: one results tree, one cache, one Ray connection.
FIXED_KEYS = ("out", "cache_dir", "run_id", "ray", "ray.address", "ray.namespace", "ray.num_cpus")
#: Grid keys that are already columns of the metrics table (`seed`, `algorithm`).
_BUILTIN_COLUMNS = {"seed": "seed", "algorithms": "algorithm"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DONE = "done.json"


@dataclass(frozen=True)
class Cell:
    id: str
    values: dict[str, Any]  # grid key -> value, as the resolved config holds it
    cfg: RunConfig  # resolved: out = <sweep>/cells, run_id = id, one shared cache_dir

    @property
    def dir(self) -> Path:
        return Path(self.cfg.out) / self.id

    @property
    def finished(self) -> bool:
        return (self.dir / "metrics.parquet").is_file() and (self.dir / DONE).is_file()

    def label(self) -> str:
        return " ".join(f"{k}={_text(v)}" for k, v in self.values.items())


@dataclass(frozen=True)
class Sweep:
    name: str
    dir: Path
    grid: dict[str, list[Any]]
    cells: list[Cell]
    config: str | None
    sets: list[str]

    @property
    def results_path(self) -> Path:
        return self.dir / "results.parquet"

    @property
    def group_keys(self) -> list[str]:
        """Grid keys a summary row is keyed by besides the algorithm (seeds are averaged over)."""
        return [k for k in self.grid if k not in _BUILTIN_COLUMNS]


@dataclass(frozen=True)
class SweepResult:
    sweep: Sweep
    summary: Any  # pandas DataFrame, formatted
    summary_path: Path
    plots: list[Path]
    ran: list[str]  # ids of the cells run (or resumed) by this call


# ----------------------------------------------------------------------------------- planning
def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """`key=v1,v2,...` per item → {key: [values]} (values parsed as YAML, like --set)."""
    grid: dict[str, list[Any]] = {}
    for text in items:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("--set", "--grid", 1)) from None
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; list all its values in one --grid {key}=v1,v2")
        if key in FIXED_KEYS or (key.startswith("ray.") and key != "ray.pool_size"):
            raise ConfigError(
                f"--grid {key}: cannot vary within a sweep (one results tree, cache and Ray connection); "
                f"set it with --set {key}=..."
            )
        grid[key] = value if isinstance(value, list) else [value]
    return grid


def _lookup(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _canonical(cfg: RunConfig, key: str) -> Any:
    value = _lookup(config_mapping(cfg), key)
    if key == "algorithms" and isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def cell_id(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def default_name(config: str | None, sets: Sequence[str], grid_items: Sequence[str]) -> str:
    text = Path(config).read_text() if config and Path(config).is_file() else None
    blob = json.dumps({"config": text, "set": list(sets), "grid": list(grid_items)}, sort_keys=True)
    return "sweep-" + hashlib.sha256(blob.encode()).hexdigest()[:8]


def plan_sweep(config: str | None, sets: Sequence[str], grid_items: Sequence[str], name: str | None = None) -> Sweep:
    """Parse the grid and build and validate every cell's config; nothing is written."""
    if not grid_items:
        raise ConfigError("sweep: give at least one --grid key=v1,v2,...")
    grid = parse_grid(grid_items)
    if any(parse_override(s)[0] == "run_id" for s in sets):
        raise ConfigError("--set run_id: a sweep names its cells itself; use --name to name the sweep")
    name = name or default_name(config, sets, grid_items)
    if not _NAME.match(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    cells: list[Cell] = []
    seen: set[str] = set()
    sweep_dir: Path | None = None
    for combo in itertools.product(*grid.values()):
        overrides = [f"{k}={json.dumps(v)}" for k, v in zip(grid, combo, strict=True)]
        raw = dict(zip(grid, combo, strict=True))
        try:
            cfg = load_config(config, [*sets, *overrides])
        except ConfigError as exc:
            where = ", ".join(f"{k}={_text(v)}" for k, v in raw.items())
            raise ConfigError(f"{exc} (sweep cell {where})") from None
        if sweep_dir is None:
            out = Path(cfg.out).resolve()
            sweep_dir = out / "sweeps" / name
            cache = str(cfg.cache_path.resolve())  # <out>/cache unless cache_dir is set: one for every cell
        values = {k: _canonical(cfg, k) for k in grid}
        cid = cell_id(values)
        if cid in seen:
            continue
        seen.add(cid)
        cfg = dataclasses.replace(cfg, out=str(sweep_dir / "cells"), cache_dir=cache, run_id=cid)
        cells.append(Cell(cid, values, cfg))
    assert sweep_dir is not None
    return Sweep(name, sweep_dir, grid, cells, config, list(sets))


def check_cells(sweep: Sweep, note: Callable[[str], None] = print) -> None:
    """Before anything runs: a finished or started cell must hold the same config, and every cell's
    dataset and partition must build (partitions land in the shared, content-addressed cache)."""
    from sim.data import load_dataset, make_params
    from sim.orchestration.partition_build import partition_for

    for cell in sweep.cells:
        path = cell.dir / "config.yaml"
        if path.exists() and not stored_config_matches(path, cell.cfg):
            raise ConfigError(
                f"sweep {sweep.name}: cell {cell.id} ({cell.label()}) was run with a different config "
                f"({path}); keep the sweep's --config/--set or start another sweep with --name"
            )
        make_params(cell.cfg.dataset, cell.cfg.data)
    done: set[str] = set()
    todo = [c for c in sweep.cells if not c.finished]
    for cell in todo:
        cfg = cell.cfg
        dataset = load_dataset(cfg.dataset, cfg.data)
        for seed in cfg.seeds:
            key = json.dumps([cfg.dataset, cfg.data, to_mapping(cfg.partition), cfg.num_clients, seed], default=str)
            if key not in done:
                partition_for(cfg, dataset, seed)
                done.add(key)
    if todo:
        note(
            f"sweep {sweep.name}: {len(sweep.cells)} cells, {len(todo)} to run; data and partitions checked "
            f"({len(done)} partitions in {sweep.cells[0].cfg.cache_path / 'partitions'})"
        )


# ----------------------------------------------------------------------------------- running
def _column(value: Any, n: int) -> pa.Array:
    if isinstance(value, (list, tuple, dict)):
        value = json.dumps(value)
    return pa.array([value] * n)


def cell_table(sweep: Sweep, cell: Cell) -> pa.Table:
    """The cell's metrics rows with `cell` and its grid values (those not already columns) appended."""
    from sim.results import read_metrics

    table = read_metrics(cell.dir)
    n = table.num_rows
    table = table.append_column("cell", pa.array([cell.id] * n, pa.string()))
    for key in sweep.group_keys:
        table = table.append_column(key, _column(cell.values.get(key), n))
    return table


def append_results(sweep: Sweep, cell: Cell) -> None:
    """Add (or replace) the cell's rows in results.parquet, atomically."""
    new = cell_table(sweep, cell)
    path = sweep.results_path
    if path.exists():
        old = pq.read_table(path)
        if "cell" in old.column_names:
            import pyarrow.compute as pc

            old = old.filter(pc.not_equal(old["cell"], cell.id))
        new = pa.concat_tables([old, new], promote_options="permissive")
    with replacing(path) as tmp:
        pq.write_table(new, tmp)


def _results_cells(path: Path) -> set[str]:
    if not path.exists():
        return set()
    table = pq.read_table(path, columns=["cell"])
    return set(table["cell"].to_pylist())


def _wait_for_free_cpus(baseline: float, timeout: float = 20.0) -> None:
    """Actors killed by the previous cell free their CPUs asynchronously; wait for them, so every cell
    gets the full pool (wall times stay comparable across cells)."""
    import ray

    from sim.orchestration.warm_actors import with_parked

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if with_parked(ray.available_resources()).get("CPU", 0.0) >= baseline - 1e-6:
            return
        time.sleep(0.1)


def _run_cells(sweep: Sweep, note: Callable[[str], None]) -> list[str]:
    """Run every unfinished cell in order on the connected Ray; returns the ids of those run."""
    import ray

    from sim.orchestration.runner import run_comparison
    from sim.orchestration.warm_actors import with_parked

    ran: list[str] = []
    baseline = with_parked(ray.available_resources()).get("CPU", 0.0)
    for i, cell in enumerate(sweep.cells, 1):
        head = f"[{i}/{len(sweep.cells)}] cell {cell.id} ({cell.label()})"
        if cell.finished:
            note(f"{head}: finished earlier, skipped")
            continue
        _wait_for_free_cpus(baseline)  # what the last cell did not park
        began = time.perf_counter()
        run_comparison(cell.cfg, keep_dataset_cached=True)  # the next cell reuses it
        append_results(sweep, cell)
        write_json(
            cell.dir / DONE,
            {
                "cell": cell.id,
                "values": cell.values,
                "wall_s": time.perf_counter() - began,
                "finished": dt.datetime.now().isoformat(timespec="seconds"),
            },
        )
        ran.append(cell.id)
        note(f"{head}: done in {time.perf_counter() - began:.1f}s")
    return ran


def run_sweep(
    config: str | None,
    sets: Sequence[str],
    grid_items: Sequence[str],
    name: str | None = None,
    note: Callable[[str], None] = print,
    reference: str | None = None,
) -> SweepResult:
    sweep = plan_sweep(config, sets, grid_items, name)
    return execute_sweep(sweep, note, reference)


def execute_sweep(
    sweep: Sweep, note: Callable[[str], None] = print, reference: str | None = None, summary: bool = True
) -> SweepResult:
    """Run (or resume) every unfinished cell of a planned sweep on one Ray connection; `summary=False`
    skips summary.md (a tuning search writes its own, validation-only, tables)."""

    from sim.orchestration.cluster import connect, shutdown
    from sim.orchestration.warm_actors import keeping_actors

    config = sweep.config
    check_cells(sweep, note)
    sweep.dir.mkdir(parents=True, exist_ok=True)
    write_json(
        sweep.dir / "sweep.json",
        {
            "name": sweep.name,
            "config": str(Path(config).resolve()) if config else None,
            "set": sweep.sets,
            "grid": sweep.grid,
            "cache_dir": sweep.cells[0].cfg.cache_path,
            "cells": [{"id": c.id, "values": c.values, "dir": str(c.dir)} for c in sweep.cells],
        },
    )
    stored = _results_cells(sweep.results_path)
    for cell in sweep.cells:
        if cell.finished and cell.id not in stored:  # finished, but its rows never reached the table
            append_results(sweep, cell)
    ran: list[str] = []
    todo = [c for c in sweep.cells if not c.finished]
    if todo:
        started = connect(todo[0].cfg, f"sweep-{sweep.name}")  # one Ray connection for every cell
        try:
            with keeping_actors():  # a cell that would start the last cell's actors takes them warm
                ran = _run_cells(sweep, note)
        finally:
            if started:
                shutdown()
    else:
        note(f"sweep {sweep.name}: all {len(sweep.cells)} cells finished earlier")
    if not summary:
        import pandas as pd

        return SweepResult(sweep, pd.DataFrame(), sweep.dir / "summary.md", [], ran)
    table, path, plots = write_summary(sweep, reference)
    return SweepResult(sweep, table, path, plots, ran)


# ----------------------------------------------------------------------------------- summary
def _cell_rows(sweep: Sweep) -> Iterator[tuple[str, Cell, Any]]:
    """(cell id, cell, its rows without the cell and grid columns) for every finished cell of this sweep."""
    if not sweep.results_path.exists():
        return
    wanted = {c.id: c for c in sweep.cells}
    df = pq.read_table(sweep.results_path).to_pandas()
    df = df[df["cell"].isin(list(wanted))]
    for cid, rows in df.groupby("cell", sort=False):
        yield cid, wanted[cid], rows.drop(columns=["cell", *[k for k in sweep.group_keys if k in rows.columns]])


def _grid_value(value: Any) -> Any:
    return _text(value) if isinstance(value, (list, dict)) else value


def final_numbers(sweep: Sweep) -> Any:
    """One row per (cell, algorithm, seed): final-round global and personal test accuracy, wall time
    and bytes (sim.orchestration.report's per-run numbers), with the cell's grid values and client count."""
    import pandas as pd

    from sim.orchestration.report import per_round_accuracy, run_totals

    out = []
    for cid, cell, rows in _cell_rows(sweep):
        acc = per_round_accuracy(rows)
        if acc.empty:
            continue
        final = acc.loc[acc.groupby(["algorithm", "seed"])["round"].idxmax()]
        merged = final.merge(run_totals(rows), on=["algorithm", "seed"], how="left")
        merged.insert(0, "cell", cid)
        for key in sweep.group_keys:
            merged[key] = _grid_value(cell.values.get(key))
        merged["num_clients"] = cell.cfg.num_clients
        out.append(merged)
    if not out:
        return pd.DataFrame()
    finals = pd.concat(out, ignore_index=True)
    for col in (GLOBAL_ACC, PERSONAL_ACC, "wall_s", "bytes_up", "bytes_down"):
        if col not in finals:
            finals[col] = float("nan")
    return finals


def client_finals(sweep: Sweep) -> Any:
    """One row per (cell, algorithm, seed, client) at the final round: personal_acc, global_acc and n
    on the test split, with the cell's grid values (the input of the paired columns)."""
    import pandas as pd

    from sim.orchestration.report import chosen_rounds
    from sim.stats import client_scores

    out = []
    for _cid, cell, rows in _cell_rows(sweep):
        scores = client_scores(rows, chosen_rounds(rows, "final"))
        for key in sweep.group_keys:
            scores[key] = _grid_value(cell.values.get(key))
        out.append(scores)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def paired_cells(sweep: Sweep, clients: Any, reference: str | None) -> dict[tuple, dict[str, str]]:
    """(algorithm, *other grid values) -> {column: "Δ [CI] (wins)"} against the reference's row with
    the same other grid values (seeds and clients paired)."""
    from sim.orchestration.report import paired_heading
    from sim.stats import paired_against

    if not reference or clients.empty or reference not in set(clients["algorithm"]):
        return {}
    keys = sweep.group_keys
    out: dict[tuple, dict[str, str]] = {}
    groups = clients.groupby(keys, sort=False, dropna=False) if keys else [((), clients)]
    for values, g in groups:
        values = values if isinstance(values, tuple) else (values,)
        for name in SELECTION:
            heading = paired_heading(name, reference)
            for algo, paired in paired_against(g, reference, name).items():
                out.setdefault((algo, *values), {})[heading] = paired.text() if paired else "n/a"
            out.setdefault((reference, *values), {})[heading] = "(reference)"
    return out


def _summary_groups(sweep: Sweep, frame: Any) -> list[tuple[tuple, dict[str, Any], Any]]:
    """(key, {column: value}, rows) per (algorithm, other grid values): algorithms in run order, then the
    grid values as text."""
    keys = ["algorithm", *sweep.group_keys]
    order = {a: i for i, a in enumerate(dict.fromkeys(frame["algorithm"]))}
    groups = frame.groupby(keys, sort=False, dropna=False)
    out = []
    for key, g in sorted(groups, key=lambda kv: (order[kv[0][0]], *[str(v) for v in kv[0][1:]])):
        key = key if isinstance(key, tuple) else (key,)
        out.append((tuple(key), dict(zip(keys, key, strict=True)), g))
    return out


def other_client_summary(sweep: Sweep) -> tuple[Any, list[Any]]:
    """(table, its columns): every other declared client metric (sim.orchestration.report's
    `other_client_columns`) at the final round, mean ± std over seeds per (algorithm, other grid values)."""
    import pandas as pd

    from sim.orchestration.report import chosen_rounds, mean_std, other_client_columns, other_client_numbers

    cells = list(_cell_rows(sweep))
    columns = other_client_columns(*(rows for _, _, rows in cells))
    if not columns:
        return pd.DataFrame(), columns
    parts = []
    for _cid, cell, rows in cells:
        chosen = chosen_rounds(rows, "final")
        if chosen.empty:
            continue
        numbers = other_client_numbers(rows, chosen, columns)
        for key in sweep.group_keys:
            numbers[key] = _grid_value(cell.values.get(key))
        parts.append(numbers)
    if not parts:
        return pd.DataFrame(), columns
    numbers = pd.concat(parts, ignore_index=True)
    rows = [
        {**head, "seeds": int(g["seed"].nunique()), **{c.heading: mean_std(g[c.heading]) for c in columns}}
        for _key, head, g in _summary_groups(sweep, numbers)
    ]
    return pd.DataFrame(rows), columns


def summarize(sweep: Sweep, finals: Any, paired: dict[tuple, dict[str, str]] | None = None) -> tuple[Any, Any]:
    """(formatted table, numeric table): mean ± std over seeds per (algorithm, other grid values),
    with the paired columns of `paired_cells` when given."""
    import pandas as pd

    from sim.orchestration.report import mean_std

    paired = paired or {}
    if finals.empty:
        return pd.DataFrame(), pd.DataFrame()
    glob, personal = metric(GLOBAL_ACC).title, metric(PERSONAL_ACC).title
    rows, numeric = [], []
    for key, head, g in _summary_groups(sweep, finals):
        rows.append(
            {
                **head,
                "seeds": int(g["seed"].nunique()),
                f"{glob} acc": mean_std(g[GLOBAL_ACC], digits=3),
                f"{personal} acc": mean_std(g[PERSONAL_ACC], digits=3),
                **paired.get(key, {}),
                "wall s": mean_std(g["wall_s"], digits=1),
            }
        )
        stats = {**head, "num_clients": int(g["num_clients"].iloc[0]), "seeds": int(g["seed"].nunique())}
        for col in (GLOBAL_ACC, PERSONAL_ACC, "wall_s"):
            stats[f"{col}_mean"] = float(g[col].mean())
            stats[f"{col}_std"] = float(g[col].std(ddof=1)) if g[col].notna().sum() > 1 else 0.0
        numeric.append(stats)
    return pd.DataFrame(rows), pd.DataFrame(numeric)


def _line_label(row: Any, keys: list[str]) -> str:
    extra = [f"{k}={row[k]}" for k in keys]
    return row["algorithm"] + (f" ({', '.join(extra)})" if extra else "")


def plot_vs_clients(sweep: Sweep, numeric: Any, plots: Path) -> list[Path]:
    """Accuracy and wall time against client count, one line per algorithm (and other grid values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    others = [k for k in sweep.group_keys if k != "num_clients"]
    if numeric.empty:
        return []
    numeric = numeric.assign(line=[_line_label(r, others) for _, r in numeric.iterrows()])
    xs = numeric["num_clients"]
    log_x = xs.max() >= 10 * xs.min()

    def draw(ax: Any, col: str) -> None:
        for line, g in numeric.groupby("line", sort=False):
            g = g.sort_values("num_clients")
            if g[f"{col}_mean"].isna().all():
                continue
            ax.errorbar(g["num_clients"], g[f"{col}_mean"], yerr=g[f"{col}_std"], marker="o", capsize=3, label=line)
        if log_x:
            ax.set_xscale("log")
            ax.minorticks_off()
        ticks = sorted(set(int(x) for x in xs))
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.set_xlabel("clients")
        ax.grid(alpha=0.3)

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, col, title in (
        (axes[0], GLOBAL_ACC, "global model, final round"),
        (axes[1], PERSONAL_ACC, "personalized (client mean), final round"),
    ):
        draw(ax, col)
        ax.set_title(title)
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    paths.append(plots / "acc_vs_clients.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax, "wall_s")
    if log_x and (numeric["wall_s_mean"] > 0).all():
        ax.set_yscale("log")
    ax.set_ylabel("wall time of the run, s (mean ± std over seeds)")
    ax.set_title("wall time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(plots / "wall_vs_clients.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_summary(sweep: Sweep, reference: str | None = None) -> tuple[Any, Path, list[Path]]:
    import pandas as pd

    from sim.orchestration.report import DEFAULT_REFERENCE, markdown_table, other_client_legend, paired_note

    reference = DEFAULT_REFERENCE if reference is None else reference
    finals = final_numbers(sweep)
    clients = client_finals(sweep)
    table, numeric = summarize(sweep, finals, paired_cells(sweep, clients, reference))
    plots = plot_vs_clients(sweep, numeric, sweep.dir / "plots")
    if not finals.empty:
        finals.to_csv(sweep.dir / "finals.csv", index=False)
        numeric.to_csv(sweep.dir / "summary.csv", index=False)
    finished = sum(c.finished for c in sweep.cells)
    grid = "; ".join(f"`{k}` = {', '.join(_text(v) for v in vs)}" for k, vs in sweep.grid.items())
    lines = [
        f"# Sweep {sweep.name}",
        "",
        f"Grid: {grid}. Config: {sweep.config or '(defaults)'}; --set: {' '.join(sweep.sets) or '(none)'}.",
        "",
        f"{finished} of {len(sweep.cells)} cells finished; each is a run directory under `cells/`.",
        "",
        "## Final round, mean ± std over seeds",
        "",
        markdown_table(table) if not table.empty else "(no finished cells yet)",
        "",
        "Global accuracy: the global model on the union of the clients' test splits (the evaluated clients: "
        "`eval.max_clients` caps them). Personalized accuracy: each client's own model on its own test split, "
        "averaged over clients. Wall time: the whole run of that algorithm (set-up phases, rounds, evaluation). "
        "Per-run numbers: `finals.csv`; every row: `results.parquet` (columns `cell` and the grid values).",
        "",
        paired_note(reference, clients if not clients.empty else pd.DataFrame({"algorithm": []})),
        "",
    ]
    others, columns = other_client_summary(sweep)
    if not others.empty:
        lines += [
            "## Other client metrics, final round, mean ± std over seeds",
            "",
            "Every other client metric declared in sim/metrics.py (or by its algorithm, `declare_metric`), "
            "combined over the clients as declared.",
            "",
            markdown_table(others),
            "",
            *other_client_legend(columns),
            "",
        ]
    for path in plots:
        lines += [f"![{path.stem}](plots/{path.name})", ""]
    path = sweep.dir / "summary.md"
    path.write_text("\n".join(lines))
    return table, path, plots

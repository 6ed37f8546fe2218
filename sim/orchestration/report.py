"""Summary tables and plots from the long-format metrics of one run directory.

Global accuracy is pooled over all clients' test samples (the global model on the union of
test splits); personalized accuracy is each client's own model on its own test split,
averaged over clients. With several seeds, every number is mean ± std over seeds; with one
seed, the personalized ± is the spread over clients. Metric names, how client values combine,
which way is better and what a column is called come from the declarations (sim/metrics.py):
every other declared client metric gets a column of the "other client metrics" table.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sim.metrics import (
    GLOBAL_ACC,
    HEADLINE,
    NEW_CLIENT_ACC,
    PERSONAL_ACC,
    SAMPLES,
    SELECTION,
    Metric,
    declared,
    metric,
)
from sim.results import RUN_LEVEL, read_metrics

#: Fewer evaluated clients than this and "worst 10 %" is one client: the column says "worst client".
DECILE_MIN_CLIENTS = 10
#: The method every comparison table is paired against unless `--reference` names another.
DEFAULT_REFERENCE = "fedavg"
#: The splits the "other client metrics" tables read, in column order: test numbers, then what the
#: clients' local training reports (validation only chooses rounds).
OTHER_SPLITS = ("test", "train")
_RUN_KEYS = ["algorithm", "seed", "round"]


def _worst_decile(values: pd.Series, spec: Metric) -> float:
    """Mean of the worst 10 % of clients (at least one client), worst as `spec` declares."""
    k = max(1, int(np.ceil(0.1 * len(values))))
    ordered = np.sort(values.to_numpy())
    return float((ordered[:k] if spec.best == "max" else ordered[-k:]).mean())


def worst_label(clients: int) -> str:
    title = metric(PERSONAL_ACC).title
    return f"worst-10% {title}" if clients >= DECILE_MIN_CLIENTS else f"worst client {title}"


def _client_wide(df: pd.DataFrame, split: str, names: Sequence[str] | None = None) -> pd.DataFrame | None:
    """Per (algorithm, seed, round, client) of `split`: one column per metric (of `names` and the sample
    count, when given); None without such rows."""
    clients = df[(df.client_id != RUN_LEVEL) & (df.split == split)]
    if names is not None:
        clients = clients[clients.metric.isin([*names, SAMPLES])]
    if clients.empty:
        return None
    wide = clients.pivot_table(index=[*_RUN_KEYS, "client_id"], columns="metric", values="value")
    return wide.reset_index()


def _sizes(g: pd.DataFrame) -> pd.Series:
    """The clients' sample counts of the split (1 each where the split has none, e.g. `train`)."""
    return g[SAMPLES] if SAMPLES in g else pd.Series(np.ones(len(g)), index=g.index)


def _combined(values: pd.Series, n: pd.Series, spec: Metric) -> float:
    """The clients' values combined as `spec` declares: pooled (weighted by samples) or the client mean."""
    m = values.notna()
    if spec.aggregate == "weighted":
        return float((values[m] * n[m]).sum() / n[m].sum())
    return float(values[m].mean())


def per_round(df: pd.DataFrame, names: Sequence[str], split: str = "test") -> pd.DataFrame:
    """Rows (algorithm, seed, round): each metric of `names` combined over the clients of `split` as it
    is declared (a column only where some client reports it)."""
    wide = _client_wide(df, split, names)
    if wide is None:
        return pd.DataFrame(columns=_RUN_KEYS)
    out = []
    for (algo, seed, rnd), g in wide.groupby(_RUN_KEYS):
        row = {"algorithm": algo, "seed": seed, "round": rnd}
        n = _sizes(g)
        for name in names:
            if name in g and g[name].notna().any():
                row[name] = _combined(g[name], n, metric(name))
        out.append(row)
    return pd.DataFrame(out)


def per_round_accuracy(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Rows (algorithm, seed, round): the headline accuracies, global and new-client combined as declared
    (pooled over samples), personalized as the client mean and its sample-weighted mean, std and worst
    decile over clients."""
    wide = _client_wide(df, split)
    if wide is None:
        return pd.DataFrame(columns=_RUN_KEYS)
    personal = metric(PERSONAL_ACC)
    out = []
    for (algo, seed, rnd), g in wide.groupby(_RUN_KEYS):
        row = {"algorithm": algo, "seed": seed, "round": rnd}
        n = _sizes(g)
        for name in (GLOBAL_ACC, NEW_CLIENT_ACC):
            if name in g and g[name].notna().any():
                row[name] = _combined(g[name], n, metric(name))
        if PERSONAL_ACC in g and g[PERSONAL_ACC].notna().any():
            p = g[PERSONAL_ACC].dropna()
            row[PERSONAL_ACC] = float(p.mean())
            row["personal_acc_w"] = float((p * n[p.index]).sum() / n[p.index].sum())
            row["personal_std"] = float(p.std(ddof=0))
            row["personal_worst10"] = _worst_decile(p, personal)
            row["clients"] = int(len(p))
        out.append(row)
    return pd.DataFrame(out)


def selected_rounds(df: pd.DataFrame, on: Sequence[str] = SELECTION) -> pd.DataFrame:
    """Per (algorithm, seed), the round with the best validation value (best as declared) of the first
    metric of `on` the method reports (personalized accuracy, else global): tables report test numbers
    at a round chosen without looking at the test split. Ties: the earliest round."""
    val = per_round(df, on, "val")
    picks = []
    for (algo, seed), g in val.groupby(["algorithm", "seed"]):
        key = next((name for name in on if name in g and g[name].notna().any()), None)
        g = g.sort_values("round")
        best = g.loc[getattr(g[key], f"idx{metric(key).best}")(), "round"] if key else g["round"].max()
        picks.append({"algorithm": algo, "seed": seed, "round": int(best)})
    return pd.DataFrame(picks)


def run_totals(df: pd.DataFrame) -> pd.DataFrame:
    """Per (algorithm, seed): total bytes up/down and wall time over the whole run."""
    run = df[(df.client_id == RUN_LEVEL)]
    totals = run[run.metric.isin(["bytes_up", "bytes_down", "wall_s"]) | run.metric.str.endswith("/bytes_up")]
    totals = totals.assign(metric=totals.metric.where(~totals.metric.str.endswith("/bytes_up"), "bytes_up"))
    return totals.pivot_table(
        index=["algorithm", "seed"], columns="metric", values="value", aggfunc="sum"
    ).reset_index()


def mean_std(values: pd.Series | None, scale: float = 1.0, digits: int = 3, spread: float | None = None) -> str:
    """`mean ± std` (sample std) of the non-missing values; one value alone, or with `spread` as its ±."""
    if values is None:
        return "n/a"
    values = values.dropna() * scale
    if values.empty:
        return "n/a"
    if len(values) > 1:
        return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"
    if spread is not None:
        return f"{values.iloc[0]:.{digits}f} ± {spread * scale:.{digits}f}"
    return f"{values.iloc[0]:.{digits}f}"


def chosen_rounds(df: pd.DataFrame, at: str = "selected", acc: pd.DataFrame | None = None) -> pd.DataFrame:
    """(algorithm, seed, round) rows: validation-selected, final or round 0 (see `summary_table`)."""
    acc = per_round_accuracy(df) if acc is None else acc
    if acc.empty:
        return pd.DataFrame(columns=["algorithm", "seed", "round"])
    if at == "final":
        return acc.loc[acc.groupby(["algorithm", "seed"])["round"].idxmax(), ["algorithm", "seed", "round"]]
    if at == "start":
        return acc.loc[acc["round"] == 0, ["algorithm", "seed", "round"]]
    return selected_rounds(df)


def paired_heading(name: str, reference: str) -> str:
    return f"Δ {metric(name).title} vs {reference} [95% CI] (wins)"


def paired_columns(df: pd.DataFrame, chosen: pd.DataFrame, reference: str | None) -> dict[str, dict[str, str]]:
    """Column name -> {algorithm: "Δ [95 % CI] (seeds won)"} against `reference` (nothing when the
    reference is not in the run)."""
    from sim.stats import client_scores, paired_against

    if not reference or reference not in set(df.algorithm):
        return {}
    scores = client_scores(df, chosen)
    columns: dict[str, dict[str, str]] = {}
    for name in SELECTION:
        paired = paired_against(scores, reference, name)
        if not any(v is not None for v in paired.values()):
            continue
        cells = {algo: (v.text() if v is not None else "n/a") for algo, v in paired.items()}
        cells[reference] = "(reference)"
        columns[paired_heading(name, reference)] = cells
    return columns


def summary_table(df: pd.DataFrame, at: str = "selected", reference: str | None = DEFAULT_REFERENCE) -> pd.DataFrame:
    """One row per algorithm at the validation-selected round (`at="selected"`), the last one
    (`"final"`) or round 0 (`"start"`: after any one-shot warm start, before the rounds), with the
    paired difference to `reference` (sim.stats) when it ran."""
    acc = per_round_accuracy(df)
    if acc.empty:
        return pd.DataFrame()
    chosen = chosen_rounds(df, at, acc)
    merged = chosen.merge(acc, on=["algorithm", "seed", "round"], how="left")
    merged = merged.merge(run_totals(df), on=["algorithm", "seed"], how="left")
    clients = int(merged["clients"].min()) if "clients" in merged and merged["clients"].notna().any() else 0
    paired = paired_columns(df, chosen, reference)
    glob, personal, new = (metric(name).title for name in (GLOBAL_ACC, PERSONAL_ACC, NEW_CLIENT_ACC))
    rows = []
    for algo in dict.fromkeys(df.algorithm):  # the order the run used
        g = merged[merged.algorithm == algo]
        if g.empty:
            continue
        one = len(g) == 1
        rows.append(
            {
                "algorithm": algo,
                "round": "/".join(str(int(r)) for r in g["round"]),
                "seeds": int(g.seed.nunique()),
                f"{glob} acc": mean_std(g.get(GLOBAL_ACC)),
                f"{personal} acc (weighted)": mean_std(g.get("personal_acc_w")),
                f"{personal} acc (mean ± std)": mean_std(
                    g.get(PERSONAL_ACC), spread=g["personal_std"].iloc[0] if one and "personal_std" in g else None
                ),
                worst_label(clients): mean_std(g.get("personal_worst10")),
                f"{new} acc": mean_std(g.get(NEW_CLIENT_ACC)),
                **{name: cells.get(algo, "n/a") for name, cells in paired.items()},
                "MB up": mean_std(g.get("bytes_up"), 1e-6, 2),
                "MB down": mean_std(g.get("bytes_down"), 1e-6, 2),
                "wall s": mean_std(g.get("wall_s"), 1.0, 1),
            }
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class ClientColumn:
    """A column of the "other client metrics" tables: a declared metric on one split."""

    spec: Metric
    split: str
    heading: str


def other_client_columns(*frames: pd.DataFrame) -> list[ClientColumn]:
    """The declared metrics besides the headline accuracies (sim.metrics.HEADLINE) that clients report in
    `frames`, on the test split or the train split (what local training reports), in declaration order;
    a heading names the split only when the metric has a column on both. Undeclared metrics get none."""
    present: set[tuple[str, str]] = set()
    for df in frames:
        rows = df[(df.client_id != RUN_LEVEL) & df.split.isin(OTHER_SPLITS)]
        present |= set(rows[["metric", "split"]].drop_duplicates().itertuples(index=False, name=None))
    columns = []
    for spec in declared():
        splits = [s for s in OTHER_SPLITS if (spec.name, s) in present] if spec.name not in HEADLINE else []
        for split in splits:
            heading = spec.title if len(splits) == 1 else f"{spec.title} ({split})"
            columns.append(ClientColumn(spec, split, heading))
    return columns


def other_client_numbers(df: pd.DataFrame, chosen: pd.DataFrame, columns: Sequence[ClientColumn]) -> pd.DataFrame:
    """Rows (algorithm, seed, round) of `chosen`, one numeric column per `columns` heading: the metric
    combined over the clients as declared, at that round (NaN where the method does not report it)."""
    out = chosen[_RUN_KEYS].reset_index(drop=True)
    rows = df.merge(out, on=_RUN_KEYS)
    for split in OTHER_SPLITS:
        mine = [c for c in columns if c.split == split]
        if not mine:
            continue
        values = per_round(rows, [c.spec.name for c in mine], split)
        values = values.rename(columns={c.spec.name: c.heading for c in mine})
        out = out.merge(
            values[[*_RUN_KEYS, *[c.heading for c in mine if c.heading in values]]], on=_RUN_KEYS, how="left"
        )
    for c in columns:
        if c.heading not in out:
            out[c.heading] = np.nan
    return out


def other_client_table(df: pd.DataFrame, at: str = "selected") -> pd.DataFrame:
    """One row per algorithm: every other declared client metric (`other_client_columns`) at the round
    `chosen_rounds` picks, mean ± std over seeds; empty when the clients report none."""
    columns = other_client_columns(df)
    chosen = chosen_rounds(df, at)
    if not columns or chosen.empty:
        return pd.DataFrame()
    numbers = other_client_numbers(df, chosen, columns)
    rows = []
    for algo in dict.fromkeys(df.algorithm):
        g = numbers[numbers.algorithm == algo]
        if not g.empty:
            rows.append({"algorithm": algo, **{c.heading: mean_std(g[c.heading]) for c in columns}})
    return pd.DataFrame(rows)


def other_client_legend(columns: Sequence[ClientColumn]) -> list[str]:
    """One markdown list line per column: its declaration's description, split, combination and direction."""
    lines = []
    for c in columns:
        combine = "weighted by the clients' samples" if c.spec.aggregate == "weighted" else "mean over clients"
        about = c.spec.description or "(no description)"
        lines.append(f"- {c.heading}: {about} (`{c.spec.name}`, {c.split} split, {combine}; {c.spec.direction})")
    return lines


def budget_table(run_dir: Path, names: list[str]) -> pd.DataFrame:
    """Per algorithm: its local training and its personalization budget (from the run's config), so a
    reader sees that fine-tuning methods had the same `train.finetune_epochs`."""
    from sim.config import algorithm_spec, load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        return pd.DataFrame()
    cfg = load_config(path)
    rows = []
    for name in names:
        try:
            cls, params = algorithm_spec(cfg, name)
        except Exception:  # a run of an algorithm this checkout no longer has: no budget to state
            continue
        describe = getattr(cls, "finetune_budget", None)
        own_lr = getattr(cls, "local_lr", None)  # a method whose rounds train at its own rate says so
        lr = own_lr(params, cfg.train) if own_lr else cfg.train.lr
        rows.append(
            {
                "algorithm": name,
                "local training": f"{cfg.train.local_epochs} epoch(s)/round, lr {lr:g}, momentum {cfg.train.momentum:g}",
                "personalization budget": describe(params, cfg.train) if describe else "none (the trained model)",
            }
        )
    return pd.DataFrame(rows)


def _phase_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Run-level round-0 rows named `<phase>/<metric>`: what one-shot phases report."""
    return df[(df.client_id == RUN_LEVEL) & (df["round"] == 0) & df.metric.str.contains("/", regex=False)]


def phase_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per algorithm and one-shot phase: mean over seeds."""
    rows = _phase_rows(df)
    if rows.empty:
        return pd.DataFrame()
    split = rows.metric.str.split("/", n=1, expand=True)
    rows = rows.assign(phase=split[0], what=split[1])
    table = rows.pivot_table(index=["algorithm", "phase"], columns="what", values="value", aggfunc="mean")
    order = {name: i for i, name in enumerate(dict.fromkeys(rows.phase))}
    table = table.reset_index().sort_values(
        ["algorithm", "phase"], key=lambda c: c.map(order) if c.name == "phase" else c
    )
    return table.map(
        lambda v: f"{v:.4g}" if isinstance(v, float) and not np.isnan(v) else ("" if isinstance(v, float) else v)
    )


def warm_started(df: pd.DataFrame) -> list[str]:
    """Algorithms with one-shot phases, in run order."""
    return list(dict.fromkeys(_phase_rows(df).algorithm))


def round_cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per algorithm, one training round's cost (rounds 1..R, mean over rounds and seeds): wall,
    training and evaluation seconds, the largest client task's peak memory, MB up."""
    run = df[(df.client_id == RUN_LEVEL) & (df["round"] >= 1)]
    wanted = {
        "wall_s": "round s",
        "train_s": "train s",
        "eval_s": "eval s",
        "client_peak_rss_mb": "client peak MiB",
        "bytes_up": "MB up",
    }
    run = run[run.metric.isin(list(wanted))]
    if run.empty:
        return pd.DataFrame()
    table = run.pivot_table(index="algorithm", columns="metric", values="value", aggfunc="mean")
    if "bytes_up" in table:
        table["bytes_up"] = table["bytes_up"] / 1e6
    table = table.reindex(index=list(dict.fromkeys(run.algorithm)), columns=[c for c in wanted if c in table])
    table = table.rename(columns=wanted).reset_index()
    return table.map(
        lambda v: f"{v:.3g}" if isinstance(v, float) and not np.isnan(v) else ("" if isinstance(v, float) else v)
    )


def paired_note(reference: str | None, df: pd.DataFrame) -> str:
    from sim.stats import BOOTSTRAP

    if not reference:
        return ""
    if reference not in set(df.algorithm):
        return f"No paired column: the reference `{reference}` is not in this run (`--reference NAME`)."
    return (
        f"Δ vs {reference}: the method minus `{reference}` on the same clients and seeds, mean over seeds of the "
        f"per-seed difference (personal: client mean; global: pooled over test samples), each method at its "
        f"own reported round; 95 % interval from a seeded bootstrap ({BOOTSTRAP} resamples) over clients within "
        f"seeds; (wins) = seeds on which the method is ahead."
    )


def domain_table(df: pd.DataFrame, manifest: dict) -> pd.DataFrame:
    """Test accuracy per client domain at the round chosen on validation (mean ± std over seeds):
    where a method gains, domain by domain. Empty unless the partition gives clients several domains."""
    names = (manifest.get("dataset") or {}).get("domain_names") or []
    owners = {int(seed): info.get("client_domain") for seed, info in (manifest.get("partitions") or {}).items()}
    if len(names) < 2 or not all(owners.values()):
        return pd.DataFrame()
    picks = selected_rounds(df)
    wide = _client_wide(df, "test")
    wide = wide.merge(picks, on=_RUN_KEYS) if wide is not None and not picks.empty else None
    if wide is None or wide.empty:
        return pd.DataFrame()
    wide["domain"] = [
        owners[int(s)][int(c)] if int(c) < len(owners[int(s)]) else -1
        for s, c in zip(wide.seed, wide.client_id, strict=True)
    ]
    if wide["domain"].nunique() < 2:
        return pd.DataFrame()
    wide = wide.assign(_n=_sizes(wide))
    rows = []
    for algo, g in wide.groupby("algorithm", sort=False):
        row: dict[str, str] = {"algorithm": str(algo)}
        for d in sorted(g["domain"].unique()):
            name = names[d] if 0 <= d < len(names) else "mixed"
            per_seed = g[g["domain"] == d].groupby("seed")
            parts = []
            for acc in (GLOBAL_ACC, PERSONAL_ACC):  # combined as declared: pooled / client mean
                if acc not in g or g[acc].isna().all():
                    continue
                if metric(acc).aggregate == "weighted":
                    parts.append(mean_std(per_seed.apply(lambda s, a=acc: (s[a] * s["_n"]).sum() / s["_n"].sum())))
                else:
                    parts.append(mean_std(per_seed[acc].mean()))
            row[name] = " / ".join(parts) if parts else "n/a"
        rows.append(row)
    return pd.DataFrame(rows).fillna("n/a")


def markdown_table(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def plot_accuracy(df: pd.DataFrame, path: Path) -> Path:
    acc = per_round_accuracy(df)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, name, title in (
        (axes[0], GLOBAL_ACC, "global model, all test splits"),
        (axes[1], PERSONAL_ACC, "personalized, own test split (client mean)"),
    ):
        for algo in dict.fromkeys(acc.algorithm):
            g = acc[acc.algorithm == algo]
            if name not in g or g[name].isna().all():
                continue
            stats = g.groupby("round")[name].agg(["mean", "std"]).fillna(0.0)
            ax.plot(stats.index, stats["mean"], marker="o", label=algo)
            ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("round (0 = start / warm start)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, reference: str | None = DEFAULT_REFERENCE) -> Path:
    """Write report.md and plots/ for a run directory and return the report's path."""
    run_dir = Path(run_dir)
    df = read_metrics(run_dir).to_pandas()
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    table = summary_table(df, reference=reference)
    lines = [f"# Run {run_dir.name}", ""]
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest:
        ds = manifest.get("dataset", {})
        lines += [
            f"Dataset `{ds.get('name')}` ({ds.get('samples')} samples, fingerprint {ds.get('fingerprint')}); "
            f"seeds {manifest.get('seeds')}; git {manifest.get('git_commit')}.",
            "",
        ]
    lines += ["## Summary (round chosen on validation accuracy)", "", markdown_table(table), ""]
    lines += ["## Final round", "", markdown_table(summary_table(df, at="final", reference=reference)), ""]
    lines += [
        "Global accuracy: the global model on the union of all clients' test splits. Personalized accuracy: each "
        "client's own model on its own test split, weighted by test samples or averaged over clients (± over "
        "clients for one seed, over seeds for several); worst-10%: mean of the worst decile of clients (with fewer "
        f"than {DECILE_MIN_CLIENTS} clients: the worst client). New-client "
        "accuracy: held-out clients adapt the final model for `eval.new_client_epochs`. The summary round is the "
        "one with the best validation accuracy, never chosen on test. Bytes include one-shot warm-start uploads.",
        "",
        paired_note(reference, df),
        "",
    ]
    domains = domain_table(df, manifest)
    if not domains.empty:
        lines += [
            "## Per client domain (round chosen on validation)",
            "",
            "Test accuracy of the clients whose data is mostly that domain: global model (sample-weighted) / "
            "personalized (mean over clients); mean ± std over seeds. Methods without a global model show "
            "the personalized figure only.",
            "",
            markdown_table(domains),
            "",
        ]
    others = other_client_table(df)
    if not others.empty:
        lines += [
            "## Other client metrics (round chosen on validation)",
            "",
            "Every other client metric declared in sim/metrics.py (or by its algorithm, `declare_metric`), at the "
            "round of the summary, combined over the clients as declared; mean ± std over seeds.",
            "",
            markdown_table(others),
            "",
            *other_client_legend(other_client_columns(df)),
            "",
        ]
    budgets = budget_table(run_dir, list(dict.fromkeys(df.algorithm)))
    if not budgets.empty:
        lines += ["## Budgets", "", markdown_table(budgets), ""]
    warm = warm_started(df)
    if warm:
        start = summary_table(df[df.algorithm.isin(warm)], at="start")
        lines += ["## After the one-shot warm start (round 0, before any round)", "", markdown_table(start), ""]
    phases = phase_table(df)
    if not phases.empty:
        lines += [
            "## Warm-start phases",
            "",
            "Seconds, bytes and peak resident memory (MiB, the largest client task and the server) per "
            "phase; mean over seeds.",
            "",
            markdown_table(phases),
            "",
        ]
    costs = round_cost_table(df)
    if not costs.empty:
        lines += ["## Cost of one round", "", markdown_table(costs), ""]
    if not df.empty:
        plot_accuracy(df, plots / "accuracy.png")
        lines += ["## Accuracy per round", "", "![accuracy](plots/accuracy.png)", ""]
    for seed, info in (manifest.get("partitions") or {}).items():
        heatmap = Path(info["path"]) / "heatmap.png"
        if heatmap.exists():
            target = plots / f"partition_seed{seed}.png"
            shutil.copyfile(heatmap, target)
            lines += [
                f"## Partition (seed {seed}, key {info['key']})",
                "",
                f"![partition]({target.relative_to(run_dir)})",
                "",
            ]
    artifacts = sorted((run_dir / "artifacts").glob("**/*.png")) if (run_dir / "artifacts").exists() else []
    if artifacts:
        lines += ["## Artifacts", ""] + [f"![{p.stem}]({p.relative_to(run_dir)})" for p in artifacts] + [""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path

"""Summary tables and plots from the long-format metrics of one run directory.

Global accuracy is pooled over all clients' test samples (the global model on the union of
test splits); personalized accuracy is each client's own model on its own test split,
averaged over clients. With several seeds, every number is mean ± std over seeds; with one
seed, the personalized ± is the spread over clients.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sim.results import RUN_LEVEL, read_metrics

#: Fewer evaluated clients than this and "worst 10 %" is one client: the column says "worst client".
DECILE_MIN_CLIENTS = 10
#: The method every comparison table is paired against unless `--reference` names another.
DEFAULT_REFERENCE = "fedavg"


def _worst_decile(values: pd.Series) -> float:
    """Mean accuracy of the worst 10 % of clients (at least one client)."""
    k = max(1, int(np.ceil(0.1 * len(values))))
    return float(np.sort(values.to_numpy())[:k].mean())


def worst_label(clients: int) -> str:
    return "worst-10% personal" if clients >= DECILE_MIN_CLIENTS else "worst client personal"


def per_round_accuracy(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Rows (algorithm, seed, round): pooled global accuracy, personalized accuracy (sample-weighted
    mean, unweighted mean, std and worst decile over clients) and new-client accuracy."""
    clients = df[(df.client_id != RUN_LEVEL) & (df.split == split)]
    if clients.empty:
        return pd.DataFrame(columns=["algorithm", "seed", "round"])
    wide = clients.pivot_table(index=["algorithm", "seed", "round", "client_id"], columns="metric", values="value")
    wide = wide.reset_index()
    out = []
    for (algo, seed, rnd), g in wide.groupby(["algorithm", "seed", "round"]):
        row = {"algorithm": algo, "seed": seed, "round": rnd}
        n = g["n"] if "n" in g else pd.Series(np.ones(len(g)), index=g.index)
        for metric, name in (("global_acc", "global_acc"), ("new_client_acc", "new_client_acc")):
            if metric in g and g[metric].notna().any():
                m = g[metric].notna()
                row[name] = float((g.loc[m, metric] * n[m]).sum() / n[m].sum())
        if "personal_acc" in g and g["personal_acc"].notna().any():
            p = g["personal_acc"].dropna()
            row["personal_acc"] = float(p.mean())
            row["personal_acc_w"] = float((p * n[p.index]).sum() / n[p.index].sum())
            row["personal_std"] = float(p.std(ddof=0))
            row["personal_worst10"] = _worst_decile(p)
            row["clients"] = int(len(p))
        out.append(row)
    return pd.DataFrame(out)


def selected_rounds(df: pd.DataFrame) -> pd.DataFrame:
    """Per (algorithm, seed), the round with the best validation accuracy (personalized, else global):
    tables report test accuracy at a round chosen without looking at the test split."""
    val = per_round_accuracy(df, "val")
    picks = []
    for (algo, seed), g in val.groupby(["algorithm", "seed"]):
        key = "personal_acc" if "personal_acc" in g and g["personal_acc"].notna().any() else "global_acc"
        g = g.sort_values("round")
        best = g.loc[g[key].idxmax(), "round"] if key in g and g[key].notna().any() else g["round"].max()
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


def paired_columns(df: pd.DataFrame, chosen: pd.DataFrame, reference: str | None) -> dict[str, dict[str, str]]:
    """Column name -> {algorithm: "Δ [95 % CI] (seeds won)"} against `reference` (nothing when the
    reference is not in the run)."""
    from sim.stats import client_scores, paired_against

    if not reference or reference not in set(df.algorithm):
        return {}
    scores = client_scores(df, chosen)
    columns: dict[str, dict[str, str]] = {}
    for metric, label in (("personal_acc", "personal"), ("global_acc", "global")):
        paired = paired_against(scores, reference, metric)
        if not any(v is not None for v in paired.values()):
            continue
        cells = {algo: (v.text() if v is not None else "n/a") for algo, v in paired.items()}
        cells[reference] = "(reference)"
        columns[f"Δ {label} vs {reference} [95% CI] (wins)"] = cells
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
                "global acc": mean_std(g.get("global_acc")),
                "personal acc (weighted)": mean_std(g.get("personal_acc_w")),
                "personal acc (mean ± std)": mean_std(
                    g.get("personal_acc"), spread=g["personal_std"].iloc[0] if one and "personal_std" in g else None
                ),
                worst_label(clients): mean_std(g.get("personal_worst10")),
                "new-client acc": mean_std(g.get("new_client_acc")),
                **{name: cells.get(algo, "n/a") for name, cells in paired.items()},
                "MB up": mean_std(g.get("bytes_up"), 1e-6, 2),
                "MB down": mean_std(g.get("bytes_down"), 1e-6, 2),
                "wall s": mean_std(g.get("wall_s"), 1.0, 1),
            }
        )
    return pd.DataFrame(rows)


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
    clients = df[(df.client_id != RUN_LEVEL) & (df.split == "test")]
    wide = clients.pivot_table(index=["algorithm", "seed", "round", "client_id"], columns="metric", values="value")
    wide = wide.reset_index().merge(picks, on=["algorithm", "seed", "round"])
    if wide.empty:
        return pd.DataFrame()
    wide["domain"] = [
        owners[int(s)][int(c)] if int(c) < len(owners[int(s)]) else -1
        for s, c in zip(wide.seed, wide.client_id, strict=True)
    ]
    if wide["domain"].nunique() < 2:
        return pd.DataFrame()
    n = wide["n"] if "n" in wide else pd.Series(np.ones(len(wide)), index=wide.index)
    wide = wide.assign(_n=n)
    rows = []
    for algo, g in wide.groupby("algorithm", sort=False):
        row: dict[str, str] = {"algorithm": str(algo)}
        for d in sorted(g["domain"].unique()):
            name = names[d] if 0 <= d < len(names) else "mixed"
            per_seed = g[g["domain"] == d].groupby("seed")
            parts = []
            if "global_acc" in g and g["global_acc"].notna().any():
                acc = per_seed.apply(lambda s: (s["global_acc"] * s["_n"]).sum() / s["_n"].sum())
                parts.append(mean_std(acc))
            if "personal_acc" in g and g["personal_acc"].notna().any():
                parts.append(mean_std(per_seed["personal_acc"].mean()))
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
    for ax, metric, title in (
        (axes[0], "global_acc", "global model, all test splits"),
        (axes[1], "personal_acc", "personalized, own test split (client mean)"),
    ):
        for algo in dict.fromkeys(acc.algorithm):
            g = acc[acc.algorithm == algo]
            if metric not in g or g[metric].isna().all():
                continue
            stats = g.groupby("round")[metric].agg(["mean", "std"]).fillna(0.0)
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

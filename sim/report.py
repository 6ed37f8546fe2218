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
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sim.results import RUN_LEVEL, read_metrics  # noqa: E402


def per_round_accuracy(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Rows (algorithm, seed, round) with pooled global accuracy and client-mean personal accuracy."""
    clients = df[(df.client_id != RUN_LEVEL) & (df.split == split)]
    wide = clients.pivot_table(index=["algorithm", "seed", "round", "client_id"], columns="metric", values="value")
    wide = wide.reset_index()
    out = []
    for (algo, seed, rnd), g in wide.groupby(["algorithm", "seed", "round"]):
        row = {"algorithm": algo, "seed": seed, "round": rnd}
        n = g["n"] if "n" in g else pd.Series(np.ones(len(g)))
        if "global_acc" in g and g["global_acc"].notna().any():
            row["global_acc"] = float((g["global_acc"] * n).sum() / n.sum())
        if "personal_acc" in g:
            row["personal_acc"] = float(g["personal_acc"].mean())
            row["personal_std"] = float(g["personal_acc"].std(ddof=0))
            row["personal_worst10"] = float(g["personal_acc"].quantile(0.1))
        out.append(row)
    return pd.DataFrame(out)


def run_totals(df: pd.DataFrame) -> pd.DataFrame:
    """Per (algorithm, seed): total bytes up/down and wall time over the whole run."""
    run = df[(df.client_id == RUN_LEVEL)]
    totals = run[run.metric.isin(["bytes_up", "bytes_down", "wall_s"]) | run.metric.str.endswith("/bytes_up")]
    totals = totals.assign(metric=totals.metric.where(~totals.metric.str.endswith("/bytes_up"), "bytes_up"))
    return totals.pivot_table(index=["algorithm", "seed"], columns="metric", values="value", aggfunc="sum").reset_index()


def _fmt(values: pd.Series, scale: float = 1.0, digits: int = 3, spread: float | None = None) -> str:
    values = values.dropna() * scale
    if values.empty:
        return "n/a"
    if len(values) > 1:
        return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"
    if spread is not None:
        return f"{values.iloc[0]:.{digits}f} ± {spread * scale:.{digits}f}"
    return f"{values.iloc[0]:.{digits}f}"


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    acc = per_round_accuracy(df)
    final = acc.loc[acc.groupby(["algorithm", "seed"])["round"].idxmax()]
    totals = run_totals(df)
    merged = final.merge(totals, on=["algorithm", "seed"], how="left")
    order = list(dict.fromkeys(df.algorithm))  # the order the run used
    rows = []
    for algo in order:
        g = merged[merged.algorithm == algo]
        if g.empty:
            continue
        rows.append(
            {
                "algorithm": algo,
                "rounds": int(g["round"].max()),
                "seeds": int(g.seed.nunique()),
                "global acc": _fmt(g["global_acc"]) if "global_acc" in g else "n/a",
                "personal acc": _fmt(g["personal_acc"], spread=g["personal_std"].iloc[0] if len(g) == 1 else None),
                "worst-10% personal": _fmt(g["personal_worst10"]),
                "MB up": _fmt(g.get("bytes_up", pd.Series(dtype=float)), 1e-6, 2),
                "MB down": _fmt(g.get("bytes_down", pd.Series(dtype=float)), 1e-6, 2),
                "wall s": _fmt(g.get("wall_s", pd.Series(dtype=float)), 1.0, 1),
            }
        )
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def plot_accuracy(df: pd.DataFrame, path: Path) -> Path:
    acc = per_round_accuracy(df)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, metric, title in ((axes[0], "global_acc", "global model, all test splits"),
                              (axes[1], "personal_acc", "personalized, own test split (client mean)")):
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


def write_report(run_dir: str | Path) -> Path:
    """Write report.md and plots/ for a run directory and return the report's path."""
    run_dir = Path(run_dir)
    df = read_metrics(run_dir).to_pandas()
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    table = summary_table(df)
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
    lines += ["## Final round", "", markdown_table(table), ""]
    lines += [
        "Global accuracy: the global model on the union of all clients' test splits. Personalized accuracy: each "
        "client's own model on its own test split, mean over clients (± over clients for one seed, over seeds for "
        "several). Bytes include any one-shot warm-start uploads.",
        "",
    ]
    if not df.empty:
        plot_accuracy(df, plots / "accuracy.png")
        lines += ["## Accuracy per round", "", "![accuracy](plots/accuracy.png)", ""]
    for seed, info in (manifest.get("partitions") or {}).items():
        heatmap = Path(info["path"]) / "heatmap.png"
        if heatmap.exists():
            target = plots / f"partition_seed{seed}.png"
            shutil.copyfile(heatmap, target)
            lines += [f"## Partition (seed {seed}, key {info['key']})", "", f"![partition]({target.relative_to(run_dir)})", ""]
    artifacts = sorted((run_dir / "artifacts").glob("**/*.png")) if (run_dir / "artifacts").exists() else []
    if artifacts:
        lines += ["## Artifacts", ""] + [f"![{p.stem}]({p.relative_to(run_dir)})" for p in artifacts] + [""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path

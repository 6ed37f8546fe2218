"""Heterogeneity scalars, a human summary and the label-count heat-map of a Partition.

Papers state heterogeneity only through the generator's knob (alpha, C). The scalars below
measure what the clients actually got, so two partitions built differently can be compared,
and they are stored in every manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sim.partition.base import SPLITS, Partition

HEATMAP_MAX_CLIENTS = 100


def heterogeneity(
    partition: Partition,
    labels: np.ndarray,
    num_classes: int,
    domains: np.ndarray | None = None,
    num_domains: int | None = None,
    split: str = "train",
) -> dict[str, float]:
    """Scalars on `split` (train: what clients learn from); domain scalars use all splits.

    - label_tv_mean: mean total-variation distance between a client's label distribution and
      the pooled one (0 = IID, -> 1 = disjoint label sets)
    - label_entropy_mean: mean label entropy normalized by log(num_classes) (1 = uniform)
    - max_class_share_mean, classes_per_client_mean: how concentrated clients are
    - size_cv: coefficient of variation of client sizes (quantity skew)
    - domains_per_client_mean, domain_purity_mean: feature skew (1.0 / 1.0 = one domain each)
    """
    counts = partition.label_counts(labels, num_classes, split).astype(np.float64)
    sizes = counts.sum(axis=1)
    nz = sizes > 0
    share = counts[nz] / sizes[nz, None]
    pooled = counts.sum(axis=0) / max(counts.sum(), 1.0)
    tv = 0.5 * np.abs(share - pooled).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(share > 0, share * np.log(share), 0.0).sum(axis=1)
    ent_norm = ent / np.log(num_classes) if num_classes > 1 else np.zeros_like(ent)
    out = {
        "label_tv_mean": float(tv.mean()) if tv.size else 0.0,
        "label_entropy_mean": float(ent_norm.mean()) if ent_norm.size else 0.0,
        "max_class_share_mean": float(share.max(axis=1).mean()) if share.size else 0.0,
        "classes_per_client_mean": float((counts > 0).sum(axis=1).mean()),
        "size_cv": float(sizes.std() / sizes.mean()) if sizes.mean() > 0 else 0.0,
    }
    if domains is not None:
        domains = np.asarray(domains, dtype=np.int64)
        D = int(num_domains if num_domains is not None else (domains.max() + 1 if domains.size else 1))
        dc = np.zeros((partition.num_clients, D), dtype=np.int64)
        for s in SPLITS:
            flat = partition.client_ids(s) * D + domains[partition.indices[s]]
            dc += np.bincount(flat, minlength=partition.num_clients * D).reshape(partition.num_clients, D)
        tot = dc.sum(axis=1)
        out["domains_per_client_mean"] = float((dc > 0).sum(axis=1).mean())
        out["domain_purity_mean"] = float((dc.max(axis=1) / np.maximum(tot, 1)).mean())
    return out


def describe(
    partition: Partition,
    labels: np.ndarray,
    num_classes: int,
    domains: np.ndarray | None = None,
    num_domains: int | None = None,
) -> str:
    """A few lines for `run_sim.py partition`: who got how much, and how skewed it is."""
    meta = partition.meta
    head = f"partition {partition.key}"
    if meta:
        params = ", ".join(f"{k}={v}" for k, v in meta.get("params", {}).items())
        head += (
            f": scheme={meta.get('scheme')}({params}) seed={meta.get('seed')} min_size={meta.get('min_size')} "
            f"split val={meta.get('split', {}).get('val')} test={meta.get('split', {}).get('test')}"
        )
    lines = [head, f"  clients: {partition.num_clients}"]
    for s in SPLITS:
        z = partition.sizes(s)
        lines.append(
            f"  {s:5s} sizes min/median/max = {int(z.min())}/{float(np.median(z)):g}/{int(z.max())}"
            f"  total {int(z.sum())}"
        )
    h = heterogeneity(partition, labels, num_classes, domains, num_domains)
    lines.append("  heterogeneity (train): " + ", ".join(f"{k}={v:.3f}" for k, v in h.items()))
    cd = partition.client_domain
    lines.append(f"  clients with a majority domain: {int((cd >= 0).sum())}/{partition.num_clients}")
    return "\n".join(lines)


def label_count_table(partition: Partition, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Columns for label_counts.csv: client_id, split, class_0..class_{K-1} (one row per client and split)."""
    J = partition.num_clients
    counts = np.concatenate([partition.label_counts(labels, num_classes, s) for s in SPLITS])
    cols: dict[str, Any] = {
        "client_id": np.tile(np.arange(J, dtype=np.int32), len(SPLITS)),
        "split": np.repeat(np.array(SPLITS), J),
    }
    for k in range(num_classes):
        cols[f"class_{k}"] = counts[:, k]
    return cols


def plot_heatmap(partition: Partition, labels: np.ndarray, num_classes: int, path: str | Path, title: str = "") -> Path:
    """Clients x classes train label counts; beyond HEATMAP_MAX_CLIENTS, evenly spaced clients (said in the title).

    Uses the Agg canvas directly (no pyplot), so it never touches a global backend or a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    J = partition.num_clients
    counts = partition.label_counts(labels, num_classes, "train")
    if J > HEATMAP_MAX_CLIENTS:
        shown = np.unique(np.linspace(0, J - 1, HEATMAP_MAX_CLIENTS).round().astype(np.int64))
        note = f"{shown.size} of {J} clients shown (evenly spaced ids)"
    else:
        shown = np.arange(J)
        note = f"all {J} clients"
    fig = Figure(figsize=(min(max(6.5, 4 + 0.25 * num_classes), 16), min(2 + 0.08 * shown.size, 11)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(counts[shown], aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("client id")
    step = max(1, shown.size // 20)
    ax.set_yticks(np.arange(0, shown.size, step))
    ax.set_yticklabels([str(int(c)) for c in shown[::step]], fontsize=7)
    if num_classes <= 40:
        ax.set_xticks(np.arange(num_classes))
        ax.tick_params(axis="x", labelsize=7)
    fig.colorbar(im, ax=ax, label="train samples")
    ax.set_title(f"{title + chr(10) if title else ''}train label counts, {note}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path

"""Progress bars and one-line round summaries (tqdm), silenced by `progress: false`."""

from __future__ import annotations

import math
import sys
from typing import Any

from tqdm import tqdm


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def bar(self, total: int, desc: str) -> Any:
        if not self.enabled or not sys.stderr.isatty():
            return _NullBar()  # bars in a log file are noise; the per-round summary lines remain
        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    def note(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def report_round(self, algorithm: str, seed: int, round: int, rows: list) -> None:
        """Print mean test accuracies of the round (global: pooled over samples; personal: mean over clients)."""
        if not self.enabled:
            return
        g_correct = g_n = 0.0
        personal: list[float] = []
        sizes = {r[0]: r[3] for r in rows if r[1] == "test" and r[2] == "n"}
        for client, split, metric, value in rows:
            if split != "test" or math.isnan(value):
                continue
            if metric == "global_acc":
                g_correct += value * sizes.get(client, 0.0)
                g_n += sizes.get(client, 0.0)
            elif metric == "personal_acc":
                personal.append(value)
        parts = [f"{algorithm} seed {seed} round {round}:"]
        if g_n:
            parts.append(f"global {g_correct / g_n:.3f}")
        if personal:
            parts.append(f"personal {sum(personal) / len(personal):.3f}")
        tqdm.write(" ".join(parts), file=sys.stderr)

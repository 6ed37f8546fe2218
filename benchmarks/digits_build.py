"""How long building the built-in `digits-domains` data takes (moved here from a unit test: a
wall-clock bound fails on a loaded machine, so the figure is printed for people to read).

    .venv/bin/python benchmarks/digits_build.py [--repeats 5] [--copies 1]

The source digits are read once first (as any run does); each repeat then renders the five
domains afresh (`cache=False`, a new seed each time) and the median, min and max are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.data import load_dataset  # noqa: E402


def measure(repeats: int, copies: int) -> list[float]:
    """Seconds of each fresh build."""
    load_dataset("digits-domains", {"copies": copies}, cache=False)  # warm the source-digit read
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        data = load_dataset("digits-domains", {"seed": 7 + i, "copies": copies}, cache=False)
        times.append(time.perf_counter() - start)
        assert len(data.labels) > 0
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=1, help="data.copies (k renders per source digit and domain)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.copies < 1:
        parser.error("--repeats and --copies must be >= 1")
    times = measure(args.repeats, args.copies)
    print(
        f"digits-domains build (copies={args.copies}): median {statistics.median(times):.3f} s "
        f"over {len(times)} (min {min(times):.3f}, max {max(times):.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Mutation testing (mutmut) of the code whose bugs slip through tests most easily.

    make mutation                                  # every target below
    make mutation ARGS="--target aggregation"      # one (or a comma list)
    make mutation ARGS="--target baselines --paths baselines/fedprox.py,baselines/ditto.py"  # some of its files
    .venv/bin/python scripts/mutation.py --target baselines,dsd --max-children 2

mutmut rewrites each target's functions into many small deliberate bugs (mutants) and runs, for
each, the fast tests that cover it: a mutant no test notices has "survived" and names a gap in
the tests (or an equivalent change: one that cannot alter any result, such as renumbering tree
levels consistently). For each target the sources are copied into `results/mutation/<target>/`
(tracked and untracked files, so your working changes are included; mutmut writes its
`mutants/` tree there, never in the checkout), the target's mutmut config is appended to the
copy's pyproject.toml, and the survivors are printed with their diffs, then a summary line.

Only in-process tests are used (mutmut forks the test process per mutant; Ray tests and slow
end-to-end runs are left to `make test`). Not part of CI: it takes minutes per target.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["algorithms", "sim", "actors", "baselines", "run_sim.py", "benchmarks"]  # what the tests import


@dataclass(frozen=True)
class Target:
    paths: tuple[str, ...]  # files or folders mutmut mutates
    tests: tuple[str, ...]  # pytest arguments selecting the fast tests that guard them


TARGETS: dict[str, Target] = {
    "aggregation": Target(
        ("algorithms/aggregation.py",),
        (
            "tests/test_aggregation.py",
            "tests/test_chunked_training.py",
            "-m",
            "not slow",
            "-k",
            "not bit_identical_however",
        ),
    ),  # that one needs Ray
    "baselines": Target(
        ("baselines/",), ("tests/test_baselines.py", "tests/test_mutation_guards.py", "-m", "not slow")
    ),
    # the objective's __call__ (teacher mode, per-step λ) is exercised by the in-process protocol tests
    "dsd": Target(
        ("algorithms/warmfed/dsd.py",), ("tests/test_dsd.py", "tests/test_warmfed_protocol.py", "-m", "not slow")
    ),
    "checkpoints": Target(("sim/orchestration/checkpoints.py",), ("tests/test_checkpoints.py", "-m", "not slow")),
}


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files (the working tree as the developer sees it)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: scripts/mutation.py needs a git checkout to copy the project: {out.stderr.strip()}")
    return [line for line in out.stdout.splitlines() if line and (ROOT / line).is_file()]


def prepare(name: str, target: Target) -> Path:
    work = ROOT / "results" / "mutation" / name
    shutil.rmtree(work, ignore_errors=True)
    for rel in project_files():
        dest = work / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    config = {
        "source_paths": list(target.paths),
        "also_copy": SOURCES,
        "pytest_add_cli_args_test_selection": list(target.tests),
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-p", "no:timeout"],
    }
    lines = ["", "[tool.mutmut]", *(f"{key} = {json.dumps(value)}" for key, value in config.items()), ""]
    with open(work / "pyproject.toml", "a") as f:
        f.write("\n".join(lines))
    return work


def mutmut_command() -> list[str]:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        raise SystemExit(
            f"error: mutmut is not installed next to {sys.executable}; run `make mutation` "
            f"(it installs it) or `{Path(sys.executable).with_name('pip')} install mutmut`"
        )
    return [str(exe)]


def statuses(work: Path) -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true` (lines `    name: status`)."""
    out = subprocess.run([*mutmut_command(), "results", "--all", "true"], cwd=work, capture_output=True, text=True)
    found = {}
    for line in out.stdout.splitlines():
        match = re.match(r"^\s+(\S+): (.+)$", line)
        if match:
            found[match[1]] = match[2].strip()
    return found


def diff(work: Path, mutant: str) -> str:
    out = subprocess.run([*mutmut_command(), "show", mutant], cwd=work, capture_output=True, text=True)
    return "\n".join(
        line for line in out.stdout.splitlines() if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))
    )


def run_target(name: str, target: Target, max_children: int) -> Counter:
    work = prepare(name, target)
    print(f"== {name}: mutating {', '.join(target.paths)} with pytest {' '.join(target.tests)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [*mutmut_command(), "run", "--max-children", str(max_children)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    (work / "mutmut-run.log").write_text(done.stdout + done.stderr)
    found = statuses(work)
    if done.returncode != 0 and not found:
        tail = (done.stdout + done.stderr)[-3000:]
        raise SystemExit(
            f"error: mutmut failed on {name} (exit {done.returncode}); log: {work / 'mutmut-run.log'}\n{tail}"
        )
    counts = Counter(found.values())
    for mutant, status in sorted(found.items()):
        if status != "killed":
            print(f"-- {status}: {mutant}\n{diff(work, mutant)}")
    total = sum(counts.values())
    print(
        f"== {name}: {total} mutants, {counts.get('killed', 0)} killed, {counts.get('survived', 0)} survived"
        + "".join(f", {n} {s}" for s, n in sorted(counts.items()) if s not in ("killed", "survived"))
        + f" (log and mutants: {work})",
        flush=True,
    )
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--target", default=",".join(TARGETS), help=f"comma-separated targets among {', '.join(TARGETS)} (default: all)"
    )
    parser.add_argument("--paths", help="comma-separated files to mutate instead of the whole target (one target)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.target.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        parser.error(f"--target: unknown {', '.join(unknown) or '(none given)'}; choose among {', '.join(TARGETS)}")
    if args.max_children < 1:
        parser.error("--max-children must be >= 1")
    targets = {name: TARGETS[name] for name in names}
    if args.paths:
        if len(names) != 1:
            parser.error("--paths narrows one target: give a single --target")
        paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
        missing = [p for p in paths if not (ROOT / p).exists()]
        if missing or not paths:
            parser.error(f"--paths: no such file {', '.join(missing) or '(none given)'}")
        targets[names[0]] = Target(paths, TARGETS[names[0]].tests)
    totals: Counter = Counter()
    for name, target in targets.items():
        totals += run_target(name, target, args.max_children)
    if len(names) > 1:
        print(
            f"== all: {sum(totals.values())} mutants, {totals.get('killed', 0)} killed, "
            f"{totals.get('survived', 0)} survived"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

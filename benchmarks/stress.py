"""Reliability and stress run: every reliability test at full size, figures as a table.

Run: ``.venv/bin/python benchmarks/stress.py`` (about 10 minutes on 2 quiet cores; ``--quick``: about
2 minutes). It runs
``tests/test_reliability_*.py`` with ``LORAPLEX_STRESS=1`` (the ``stress``-marked parts at full size:
5,000+ schemathesis cases, 32 threads x 1,000 churn operations, 5 kill -9 rounds, 1,000 load/evict
cycles, 60 s of mixed load with 32 clients over 20 tenants) plus the normal-size parts, collects the
figures each test records, prints a markdown table and writes benchmarks/results/reliability.json
and reliability.md. ``--quick`` runs only the normal-suite sizes.

Every figure is measured in this run; a test that fails still reports what it measured, and the
table says which tests failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TESTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_reliability_*.py"))

# Figure key -> what the row claims (the wording).
LABELS = {
    "corpus_cases": "bad-input corpus against a real server: specific 4xx, never 5xx",
    "chunked_413_upload": "chunked upload, no length: refused at",
    "chunked_413_classify": "chunked inference body, no length: refused at",
    "fuzz_cases": "schemathesis cases (normal suite), 5xx",
    "fuzz_cases_stress": "schemathesis cases (stress), 5xx",
    "kill9_uploads": "uploads under kill -9: every version verifies or is absent",
    "byte_flips": "one flipped byte per stored file",
    "churn_ops_small": "register/delete/promote on one name + inference (8x25)",
    "churn_ops_full": "register/delete/promote on one name + inference (32x1,000)",
    "swap_requests": "delete/replace while in use",
    "sigterm_exit_s": "SIGTERM with requests in flight: exit after",
    "overload_429_max_s": "2x the in-flight limit: slowest 429",
    "evict_cycles": "load/evict cycles with a tiny cache",
    "mixed_load_small": "mixed load with churn (small)",
    "mixed_load_full": "mixed load with churn: 60 s, 32 clients, 20 tenants",
}


def run_tests(stress: bool, figures: Path, junit: Path) -> tuple[int, str]:
    env = dict(os.environ, LORAPLEX_RELIABILITY_FIGURES=str(figures), HF_HUB_OFFLINE="1")
    if stress:
        env["LORAPLEX_STRESS"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *TESTS]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout[-6000:] + proc.stderr[-2000:]


def read_outcomes(junit: Path) -> dict[str, str]:
    """test id -> passed/failed/skipped, from the junit report."""
    import xml.etree.ElementTree as ET

    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        kids = {child.tag for child in case}
        out[name] = "failed" if kids & {"failure", "error"} else "skipped" if "skipped" in kids else "passed"
    return out


def read_figures(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def markdown(figures: list[dict], outcomes: dict[str, str], seconds: float) -> str:
    lines = ["| check | figure | held |", "|---|---|---|"]
    for f in figures:
        label = LABELS.get(f["key"], f["key"])
        lines.append(f"| {label} | {f['value']} {f['unit']} | {f['held']} |")
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("passed", "failed", "skipped")}
    lines.append("")
    lines.append(f"Tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
                 f"in {seconds:.0f} s.")  # fmt: skip
    failed = sorted(k for k, v in outcomes.items() if v == "failed")
    if failed:
        lines.append("Failed: " + ", ".join(failed))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="normal-suite sizes only")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loraplex-stress-") as tmp:
        figures_path, junit = Path(tmp) / "figures.jsonl", Path(tmp) / "junit.xml"
        start = time.monotonic()
        rc, tail = run_tests(not args.quick, figures_path, junit)
        seconds = time.monotonic() - start
        figures = read_figures(figures_path)
        outcomes = read_outcomes(junit) if junit.exists() else {}
    table = markdown(figures, outcomes, seconds)
    print(table)
    if rc != 0:
        print(re.sub(r"\n{3,}", "\n\n", tail))
    mode = "normal-suite sizes (--quick)" if args.quick else "full stress sizes"
    (RESULTS / "reliability.md").write_text(f"# Reliability run: {mode}\n\n" + table)
    (RESULTS / "reliability.json").write_text(
        json.dumps(
            {"stress": not args.quick, "seconds": round(seconds, 1), "figures": figures, "tests": outcomes},
            indent=2,
        )  # fmt: skip
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Start-up time of the ``plugrl`` command: how long before ``plugrl score`` scores its first row.

Each command runs ``--repeat`` times in a fresh interpreter (the median wall time is reported, so one
slow run on a busy machine does not decide the row), twice over: compiling every module from source
(``PYTHONDONTWRITEBYTECODE=1``, as in some CI images and containers) and with bytecode caches (an
installed package; the caches go to a temporary ``PYTHONPYCACHEPREFIX``, never into the tree). The one-row ``score`` includes that row, so its
time bounds the start-up from above; the budget is 0.5 s. ``python -c pass`` is the floor no plugrl
change can go under (interpreter and site-packages start-up).

    python benchmarks/cli_startup.py [--repeat 7] [--reward deepscaler]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 0.5


def wall(cmd: list[str], repeat: int, env: dict) -> float:
    """Median seconds of ``cmd`` over ``repeat`` runs; a failing command stops the benchmark."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--reward", default="deepscaler", help="reward plugin of the one-row score")
    args = parser.parse_args()

    py = [sys.executable]
    plugrl = [*py, "-m", "plugrl.core.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "one.jsonl"
        rows.write_text(json.dumps({"response": "The answer is \\boxed{42}.", "label": "42"}) + "\n")
        cases = [
            ("python -c pass", [*py, "-c", "pass"], None),
            ("python -c 'import plugrl'", [*py, "-c", "import plugrl"], None),
            ("plugrl --help", [*plugrl, "--help"], None),
            ("plugrl score --help", [*plugrl, "score", "--help"], BUDGET_S),
            (f"plugrl score --rm-type {args.reward} (1 row)",
             [*plugrl, "score", "--rm-type", args.reward, "--input", str(rows)], BUDGET_S),
            ("plugrl plugins list", [*plugrl, "plugins", "list"], None),
        ]
        no_pyc = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        with_pyc = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        with_pyc["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        for _, cmd, _ in cases:
            subprocess.run(cmd, capture_output=True, env=with_pyc)  # writes the caches
        results = [(name, wall(cmd, args.repeat, no_pyc), wall(cmd, args.repeat, with_pyc), budget)
                   for name, cmd, budget in cases]

    print(f"plugrl start-up, median of {args.repeat} runs; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"| {'command':<44} | {'no .pyc s':>9} | {'.pyc s':>6} | {'budget':>8} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 8}|{'-' * 10}|")
    for name, cold, cached, budget in results:
        verdict = "" if budget is None else ("ok" if max(cold, cached) <= budget else "OVER") + f" {budget:g}s"
        print(f"| {name:<44} | {cold:9.3f} | {cached:6.3f} | {verdict:>8} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

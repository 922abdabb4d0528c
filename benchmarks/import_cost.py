"""What `import pkm` costs: wall and CPU (user + sys) seconds of fresh interpreters, runs interleaved.

    python benchmarks/import_cost.py [--runs 7] [--before /path/to/older/checkout]

CPU seconds are the steadier number on a shared machine (wall time grows with the load).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--before", help="another checkout to compare `import pkm` with")
    args = p.parse_args()
    cases = [("import torch", REPO, "import torch"),
             ("import pkm", REPO, "import pkm"),
             ("import pkm + the model classes", REPO, "import pkm; pkm.BertPkmConfig()")]
    if args.before:
        cases.insert(1, (f"import pkm ({args.before})", args.before, "import pkm"))
    times = {name: ([], []) for name, _, _ in cases}
    for _ in range(args.runs):
        for name, path, code in cases:
            env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
            r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, cwd="/", check=True, capture_output=True)
            r1, t1 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            times[name][0].append(t1 - t0)
            times[name][1].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    for name, (wall, cpu) in times.items():
        print(f"{name:45s} wall median {statistics.median(wall):5.2f} s (min {min(wall):.2f})   "
              f"CPU median {statistics.median(cpu):5.2f} s (min {min(cpu):.2f})")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

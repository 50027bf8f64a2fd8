"""Run every benchmark, one after another in this one run, and print their tables as markdown.

    python benchmarks/run_all.py [--quick] [--only perturb,corrupt,scoring,sweep,data]

``make bench`` runs this and keeps the output in ``bench_out/latest.md``; BENCHMARKS.md records
the figures with what they mean.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "perturb": "Feature-level PGD cost and training-step throughput (core)",
    "corrupt": "Corruptions: our wrapper against imagecorruptions (scoring)",
    "scoring": "Scoring pool: actors and the corrupted-set cache (scoring)",
    "sweep": "Sweep orchestration overhead and throughput inside Ray Train (sweep)",
    "data": "Streaming training input from WebDataset shards (core)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats everywhere")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    args = parser.parse_args()
    import torch

    print("# clipray benchmarks\n")
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.processor() or platform.machine()} · "
        f"{torch.get_num_threads()} CPU threads · torch {torch.__version__} · "
        f"{'quick' if args.quick else 'full'} run\n"
    )
    failed = []
    for name in args.only.split(","):
        print(f"## {BENCHES[name]}\n", flush=True)
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), *(["--quick"] if args.quick else [])]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        print(done.stdout.strip() + "\n")
        print(f"_({time.perf_counter() - t0:.0f} s)_\n", flush=True)
        if done.returncode:
            failed.append(name)
            print(f"```\n{done.stderr[-3000:]}\n```\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

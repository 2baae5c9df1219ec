"""Wall time of `fastcd demo` at its default budget (one seed, every method), with its phases.

    python benchmarks/bench_demo.py [--seeds 0] [--task entity-tracking] [--repeats 1]

Prints one JSON line per repeat: the wall time of run_demo, its phases (the runs' own seconds from
runs.jsonl; the rest is the shared work: loading, discovery, matching, teacher cache, evaluations, figures), the
torch threads, and the machine's load average at the start (run it on an idle machine; figures in
benchmarks/RESULTS.md)."""

import argparse
import json
import os
import tempfile
import time

import torch

from fastcd.demo import run_demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="entity-tracking", choices=["entity-tracking", "tom"])
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    seeds = tuple(int(s) for s in a.seeds.split(","))
    for r in range(a.repeats):
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            report = run_demo(a.task, out=out, seeds=list(seeds), progress=False)
            wall = time.perf_counter() - t0
            with open(os.path.join(out, "runs.jsonl")) as f:
                runs_s = sum(json.loads(line)["seconds"] for line in f if line.strip())
        ce_cka = next(r["accuracy"]["mean"] for r in report["table"] if r["method"] == "ce+cka")
        print(json.dumps({"task": a.task, "seeds": list(seeds), "repeat": r, "wall_s": round(wall, 1),
                          "per_seed_s": round(wall / len(seeds), 1), "runs_s": round(runs_s, 1),
                          "shared_s": round(wall - runs_s, 1), "threads": torch.get_num_threads(),
                          "loadavg_1min_at_start": round(load, 2), "ce+cka": ce_cka}), flush=True)


if __name__ == "__main__":
    main()

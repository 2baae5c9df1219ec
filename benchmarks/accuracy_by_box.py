"""Test accuracy of an entity-tracking experiment per queried box: where on the test prompts do the methods differ?

    python benchmarks/accuracy_by_box.py configs/real_ood3_same_lr.yaml --out docs/real/experiments/real_ood3_same_lr

Rebuilds the experiment's fixed test set from its config exactly as `fastcd experiment` does (tokenisers only, no
weights), reads each run's per-prompt answers from OUT/runs.jsonl (this config's runs, the tuning seeds left out) and
prints, per setting and method (and the teacher and the untrained student, when OUT holds their records), the
accuracy at each queried box (1 = the first box of the context) averaged over seeds, with the number of test prompts
that query it; `--json FILE` writes the same numbers. Descriptive, not a test: a breakdown chosen after the fact has
no multiple-comparison control.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def test_set(cfg):
    """The experiment's fixed test set (an EncodedBatch), rebuilt from its config as `fastcd experiment` builds it."""
    from fastcd.shared_work import SharedWork

    with tempfile.TemporaryDirectory() as tmp:
        work = SharedWork(cfg, tmp, "float32", progress=False)
        work.prompts()
    return work.s_test


def by_box(cfg, out: str) -> dict:
    """``{"boxes": [prompts per queried box], "rows": [{setting, method, lam, seeds, overall, per_box}]}``."""
    from fastcd.errors import UsageError
    from fastcd.experiment_config import chosen_lrs
    from fastcd.io import correct_from_bits
    from fastcd.report import read_runs

    if cfg.task != "entity-tracking":
        raise UsageError(f"config: task must be entity-tracking (queried boxes), got {cfg.task!r}")
    manifest = os.path.join(out, "experiment.json")
    if os.path.isfile(manifest):  # the config must build the test set this directory's runs were tested on
        with open(manifest) as f:
            made = json.load(f)["config"]
        for name in ("teacher", "student", "task", "n_boxes", "test_boxes", "n_test"):
            if made.get(name) != getattr(cfg, name):
                raise UsageError(f"config: {name} is {getattr(cfg, name)!r}, but {out} was made with "
                                 f"{made.get(name)!r}: pass the config of that experiment")
    test = test_set(cfg)
    qi = [ex.meta["query_index"] for ex in test.examples]
    assert all(int(test.candidate_ids[i, q]) == int(test.answer_ids[i]) for i, q in enumerate(qi)), "query index"
    n_boxes = test.candidate_ids.shape[1]
    counts = [qi.count(b) for b in range(n_boxes)]
    groups: dict = {}
    done = read_runs(os.path.join(out, "runs.jsonl"))
    wanted = {spec["key"] for spec in cfg.run_specs(chosen_lrs(cfg, done))}  # this config's runs, as its report
    for key, r in done.items():
        if key not in wanted or r["seed"] in cfg.tune_seeds or "correct" not in r:
            continue
        correct = correct_from_bits(r["correct"])
        if len(correct) != len(qi):
            raise UsageError(f"--out: run {r['key']} holds {len(correct)} test answers, the config's test set "
                             f"{len(qi)}: not this config's experiment")
        setting = {k: v for k, v in sorted(r["setting"].items()) if k != "lam"}
        group = (json.dumps(setting), r["method"], r["setting"].get("lam"))
        groups.setdefault(group, {})[r["seed"]] = correct
    for name, label in (("teacher_eval", "teacher"), ("base_eval", "untrained student")):  # beside the runs
        for path in (os.path.join(out, "shared", f"{name}.json"), os.path.join(out, f"{name}.json")):
            if os.path.isfile(path):
                with open(path) as f:
                    groups[("{}", label, None)] = {None: correct_from_bits(json.load(f)["correct"])}
                break
    rows = []
    for (setting, method, lam), seeds in sorted(groups.items(), key=str):
        per_box = [sum(c[i] for c in seeds.values() for i in range(len(qi)) if qi[i] == b)
                   / (len(seeds) * counts[b]) if counts[b] else None for b in range(n_boxes)]
        overall = sum(sum(c) for c in seeds.values()) / (len(seeds) * len(qi))
        rows.append({"setting": json.loads(setting), "method": method, "lam": lam,
                     "seeds": sorted(k for k in seeds if k is not None),
                     "overall": overall, "per_box": per_box})
    return {"boxes": counts, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="the experiment's config (.yaml/.json)")
    ap.add_argument("--out", required=True, help="the experiment directory (its runs.jsonl)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    a = ap.parse_args(argv)
    from fastcd.errors import UsageError
    from fastcd.experiment_config import ExperimentConfig

    try:
        if not os.path.isfile(os.path.join(a.out, "runs.jsonl")):
            raise UsageError(f"--out: {a.out} holds no runs.jsonl (an experiment directory was expected)")
        res = by_box(ExperimentConfig.from_file(a.config), a.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    nb = len(res["boxes"])
    print("| setting | method | lambda | seeds | overall | " + " | ".join(f"box {b + 1}" for b in range(nb)) + " |")
    print("|---|---|---|---|---|" + "---|" * nb)
    print("| test prompts querying it | | | | " + str(sum(res["boxes"])) + " | "
          + " | ".join(str(c) for c in res["boxes"]) + " |")
    for r in res["rows"]:
        s = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in r["per_box"])
        print(f"| {s} | {r['method']} | {'-' if r['lam'] is None else r['lam']} | {len(r['seeds']) or '-'} | "
              f"{r['overall']:.3f} | {cells} |")
    if a.json:
        from fastcd.io import write_json_atomic

        write_json_atomic(res, a.json, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

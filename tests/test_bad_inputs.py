"""Every bad input of docs/ERRORS.md gets its one-line error, naming the argument, before any expensive work.

Each case runs the command line (``fastcd.cli.main``) or the library call a user would make and checks the exit
code 2 (CLI), that stderr is one line, and the message. The table in docs/ERRORS.md must name every case.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from fastcd.cli import main
from fastcd.pretrain import shipped_checkpoint

T = shipped_checkpoint("et-teacher")
S = shipped_checkpoint("et-student")
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "ERRORS.md")
TOY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "toy_table1.yaml")


@pytest.fixture
def files(tmp_path):
    d = {}
    d["empty"] = tmp_path / "empty"
    d["empty"].mkdir()
    d["noweights"] = tmp_path / "noweights"
    d["noweights"].mkdir()
    shutil.copy(os.path.join(S, "config.json"), d["noweights"])
    d["trunc"] = tmp_path / "trunc"
    shutil.copytree(S, d["trunc"])
    w = d["trunc"] / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    d["notok"] = tmp_path / "notok"  # config and weights, no tokenizer
    d["notok"].mkdir()
    for f in os.listdir(S):
        if not f.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(os.path.join(S, f), d["notok"])
    d["badrole"] = tmp_path / "badrole.json"
    d["badrole"].write_text(json.dumps({"method": "x", "pairs": [
        {"teacher": "L0H1", "student": "L0H1", "position": "nowhere"}]}))
    d["malformed"] = tmp_path / "malformed.json"
    d["malformed"].write_text('{"method": "x", "pairs": [')
    d["bigcircuit"] = tmp_path / "circuit.json"
    d["bigcircuit"].write_text(json.dumps({"task": "entity-tracking", "n_layers": 40, "n_heads": 40, "heads": [
        {"head": "L30H9", "group": "heads", "position": "last", "score": -1.0}], "meta": {}}))
    d["tomcircuit"] = tmp_path / "tom_circuit.json"  # the toy teacher's shape, found on theory of mind
    d["tomcircuit"].write_text(json.dumps({"task": "tom", "n_layers": 2, "n_heads": 4, "heads": [
        {"head": "L1H2", "group": "heads", "position": "last", "score": -1.0}], "meta": {"model": "tom-teacher"}}))
    d["allcircuit"] = tmp_path / "all_circuit.json"  # heads live at every position (search --roles all)
    d["allcircuit"].write_text(json.dumps({"task": "entity-tracking", "n_layers": 2, "n_heads": 4, "heads": [
        {"head": "L1H2", "group": "search", "position": "all", "score": 0.0}], "meta": {}}))
    d["file"] = tmp_path / "a_file"
    d["file"].write_text("x")
    d["out"] = tmp_path / "out"
    return d


def _distill(*extra):
    return ["distill", "--teacher", T, "--student", S, "--task", "entity-tracking", "--steps", "1",
            "--n-train", "8", "--batch-size", "8", "--n-eval", "4", *extra]


CLI_CASES = {
    "matching-role": (lambda f: _distill("--matching", str(f["badrole"]), "--out", str(f["out"])),
                      r"matching: pair L0H1 -> L0H1 is at position 'nowhere'"),
    "truncated-weights": (lambda f: ["distill", "--teacher", T, "--student", str(f["trunc"]), "--task",
                                     "entity-tracking", "--steps", "1", "--out", str(f["out"])],
                          r"student: the weights in .* cannot be read \(SafetensorError"),
    "no-weights": (lambda f: ["distill", "--teacher", T, "--student", str(f["noweights"]), "--task",
                              "entity-tracking", "--out", str(f["out"])],
                   r"student: .* has a config.json but no weights"),
    "discover-no-weights": (lambda f: ["discover", "--model", str(f["noweights"]), "--task", "entity-tracking",
                                       "--out", str(f["out"])],
                            r"--model: .* has a config.json but no weights"),
    "no-tokenizer": (lambda f: ["distill", "--teacher", T, "--student", str(f["notok"]), "--task",
                                "entity-tracking", "--out", str(f["out"])],
                     r"--student: .* has no tokenizer \(none of tokenizer.json"),
    "not-a-model-dir": (lambda f: ["distill", "--teacher", T, "--student", str(f["empty"]), "--task",
                                   "entity-tracking", "--out", str(f["out"])],
                        r"--student: .* has no config.json and no .gguf file"),
    "teacher-missing": (lambda f: ["distill", "--teacher", "/nonexistent/x", "--student", S, "--task",
                                   "entity-tracking", "--out", str(f["out"])],
                        r"--teacher: '/nonexistent/x' is not a local directory"),
    "student-missing": (lambda f: ["distill", "--teacher", T, "--student", "/nonexistent/x", "--task",
                                   "entity-tracking", "--out", str(f["out"])],
                        r"--student: '/nonexistent/x' is not a local directory"),
    "malformed-matching": (lambda f: _distill("--matching", str(f["malformed"]), "--out", str(f["out"])),
                           r"matching: .*malformed.json' is not valid JSON"),
    "circuit-from-larger-model": (lambda f: _distill("--circuit", str(f["bigcircuit"]), "--out", str(f["out"])),
                                  r"circuit is for a model of 40 layers x 40 heads; teacher has 2 x 4"),
    "circuit-of-another-task": (lambda f: _distill("--circuit", str(f["tomcircuit"]), "--out", str(f["out"])),
                                r"circuit: made for task 'tom' on 'tom-teacher', this run's task is "
                                r"'entity-tracking'; .*--allow-foreign-artifacts"),
    "out-is-a-file": (lambda f: _distill("--out", str(f["file"])), r"out: .* exists and is not a directory"),
    "seeds-not-integers": (lambda f: ["demo", "--seeds", "a,b", "--out", str(f["out"])],
                           r"argument --seeds: expected integers like 0,1,2 or 0 1 2, got 'a,b'"),
    "demo-negative-steps": (lambda f: ["demo", "--steps", "-1", "--out", str(f["out"])],
                            r"steps must be an integer >= 1, got -1"),
    "cache-shard-size": (lambda f: _distill("--build-teacher-cache", str(f["out"] / "cache"), "--cache-shard-size",
                                            "0", "--out", str(f["out"])),
                         r"--cache-shard-size must be >= 1, got 0"),
    "teacher-device-map": (lambda f: _distill("--teacher-device-map", "everywhere", "--out", str(f["out"])),
                           r"--teacher-device-map.*invalid choice: 'everywhere'"),
    "cache-only-without-cache": (lambda f: _distill("--cache-only", "--out", str(f["out"])),
                                 r"--cache-only needs --build-teacher-cache DIR"),
    "align-position-role": (lambda f: ["match", "--teacher", T, "--student", S, "--circuit", str(f["allcircuit"]),
                                       "--method", "cka", "--align-position", "box", "--out", str(f["out"] / "m.json")],
                            r"--align-position must be one of the task's roles \('last', .*\), got 'box'"),
    "ablation-baseline-method": (lambda f: ["match", "--teacher", T, "--student", S, "--circuit",
                                            str(f["allcircuit"]), "--method", "cka", "--ablation-baseline", "own",
                                            "--out", str(f["out"] / "m.json")],
                                 r"--ablation-baseline is the ablation rule's \(Eq. 4\), not --method cka's"),
    "search-role": (lambda f: ["discover", "--model", T, "--task", "tom", "--method", "search", "--roles", "object",
                               "--out", str(f["out"] / "c.json")],
                    r"roles must be a non-empty list of the task's roles \('last', 'question_character', "
                    r"'question_container'\) or 'all'"),
    "search-max-units": (lambda f: ["discover", "--model", T, "--task", "tom", "--method", "search", "--max-units",
                                    "0", "--out", str(f["out"] / "c.json")],
                         r"max_units must be a number of units >= 1 \(or None: every unit\), got 0"),
    "max-units-method": (lambda f: ["discover", "--model", T, "--task", "tom", "--method", "patching", "--max-units",
                                    "8", "--out", str(f["out"] / "c.json")],
                         r"--max-units caps the circuit search \(--method search\), not --method patching"),
    "experiment-missing-config": (lambda f: ["experiment", str(f["out"] / "none.yaml"), "--out", str(f["out"])],
                                  r"config: no such file"),
    "experiment-records-overwrite": (lambda f: ["experiment", TOY_CONFIG, "--out", str(f["out"]), "--records-from",
                                                str(f["empty"]), "--overwrite"],
                                     r"--records-from: starts a new OUT from records; it cannot be combined with "
                                     r"--overwrite"),
    "experiment-records-not-a-folder": (lambda f: ["experiment", TOY_CONFIG, "--out", str(f["out"]),
                                                   "--records-from", str(f["empty"])],
                                        r"records_from: .* is not a report folder \(expected experiment.json and "
                                        r"runs.jsonl\)"),
}
if not torch.cuda.is_available():  # on a CUDA machine these are valid requests
    CLI_CASES["device-cuda-on-cpu"] = (lambda f: _distill("--device", "cuda", "--out", str(f["out"])),
                                       r"device: 'cuda' was asked for but this torch .* sees no CUDA device")
    CLI_CASES["impl-triton-on-cpu"] = (lambda f: _distill("--impl", "triton", "--out", str(f["out"])),
                                       r"impl: 'triton' needs CUDA tensors")


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input_is_one_line(case, files, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    argv, pattern = CLI_CASES[case]
    rc = main(argv(files))
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("fastcd: attention")]
    msg = err[-1]
    assert re.search(pattern, msg), msg
    assert len([e for e in err if "error" in e]) == 1, err  # one line
    assert not os.path.exists(files["out"]) or case == "out-is-a-file", "work started before the error"


LIB_CASES = {
    "jsonl-not-utf8": (b"\xff\xfe{}\n", r"is not UTF-8 text \(invalid byte at offset 0\)"),
    "jsonl-task-null": (b'{"task": null, "prompt": "x", "answer": "y"}\n', r"'task' must be a non-empty string"),
    "jsonl-answer-not-in-context": (
        b'{"task": "entity-tracking", "prompt": "The cup is in Box A, the key is in Box B. Box A contains the", '
        b'"answer": "zebra"}\n', r"the answer 'zebra' does not appear in the prompt's context"),
}


@pytest.mark.parametrize("case", sorted(LIB_CASES))
def test_load_jsonl_bad_input(case, tmp_path):
    from fastcd.tasks.base import load_jsonl

    data, pattern = LIB_CASES[case]
    p = tmp_path / "x.jsonl"
    p.write_bytes(data)
    with pytest.raises(ValueError, match=pattern):
        load_jsonl(p)


def test_second_distiller_on_one_student():
    from fastcd.artifacts import Matching, Pair
    from fastcd.config import DistillConfig
    from fastcd.distillation import CircuitDistiller
    from fastcd.hooks import Head
    from fastcd.loading import load_model

    student = load_model(S)
    m = Matching([Pair(Head(0, 1), Head(0, 1), "last")], "given")
    CircuitDistiller(student, m, config=DistillConfig(method="circuit-ce"))
    with pytest.raises(ValueError, match="already parametrised"):
        CircuitDistiller(student, m, config=DistillConfig(method="circuit-ce"))


def test_the_error_table_names_every_case():
    doc = open(DOC, encoding="utf-8").read()
    missing = [c for c in list(CLI_CASES) + list(LIB_CASES) + ["second-distiller", "corrupt-checkpoint",
                                                                "resume-other-run", "experiment-shared-field"]
               if f"`{c}`" not in doc]
    assert not missing, f"docs/ERRORS.md lacks {missing}"

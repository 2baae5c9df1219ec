import subprocess
import sys

import pytest

from fastcd.cli import main


def test_cli_help_lists_commands(capsys):
    assert main([]) == 0
    assert "pretrain" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "fastcd", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    rc = main(["pretrain", "--task", "tom", "--role", "teacher", "--out", str(tmp_path), "--d-model", "30",
               "--n-heads", "4"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "d_model=30 must be divisible by n_heads=4" in err[0]


def _save_tiny(tmp_path, arch="llama"):
    from conftest import make_tiny

    from fastcd.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer()
    m = make_tiny(arch, n_layers=3, vocab_size=len(tok))
    m.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_cli_discover_path_patching_writes_json_and_png(tmp_path, capsys):
    from fastcd.artifacts import Circuit

    model = _save_tiny(tmp_path)
    out = tmp_path / "circuit.json"
    rc = main(["discover", "--model", str(model), "--task", "entity-tracking", "--n-boxes", "3", "--n-examples",
               "12", "--path-k", "2", "1", "1", "1", "--method", "path", "--out", str(out), "--evaluate"])
    assert rc == 0
    c = Circuit.load(out)
    assert c.meta["method"] == "path_patching" and "evaluation" in c.meta
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "faithfulness" in capsys.readouterr().out


def test_cli_discover_roles(tmp_path):
    from fastcd.artifacts import Circuit

    model = _save_tiny(tmp_path)
    out = tmp_path / "roles.json"
    rc = main(["discover", "--model", str(model), "--task", "entity-tracking", "--n-boxes", "3", "--n-examples",
               "12", "--method", "roles", "--threshold", "0", "--top-k", "2", "--out", str(out)])
    assert rc == 0
    c = Circuit.load(out)
    assert c.meta["method"] == "roles" and {h.position for h in c.heads} <= {"last", "query_label", "box_label"}


def test_cli_discover_tom_patching(tmp_path):
    from fastcd.artifacts import Circuit

    model = _save_tiny(tmp_path, "gpt2")
    out = tmp_path / "tom.json"
    rc = main(["discover", "--model", str(model), "--task", "tom", "--n-examples", "8", "--top-k", "3",
               "--out", str(out), "--method", "attribution", "--metric", "logit_diff", "--absolute"])
    assert rc == 0
    assert len(Circuit.load(out).unique_heads()) <= 3


def test_cli_discover_bad_input(tmp_path, capsys):
    model = _save_tiny(tmp_path)
    rc = main(["discover", "--model", str(model), "--task", "tom", "--method", "path", "--out", str(tmp_path / "x")])
    assert rc == 2 and "entity-tracking only" in capsys.readouterr().err
    rc = main(["discover", "--model", str(model), "--task", "tom", "--top-k", "99", "--n-examples", "4",
               "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "--top-k must be in 1..12" in capsys.readouterr().err
    rc = main(["discover", "--model", str(tmp_path / "missing"), "--task", "tom", "--out", str(tmp_path / "x")])
    assert rc == 2 and "not a local directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def discovered(tmp_path_factory):
    """A tiny model and its circuit, discovered once for every matching rule's case."""
    d = tmp_path_factory.mktemp("discovered")
    model, circuit = _save_tiny(d), d / "c.json"
    assert main(["discover", "--model", str(model), "--task", "entity-tracking", "--n-boxes", "3", "--n-examples",
                 "12", "--method", "patching", "--top-k", "3", "--out", str(circuit)]) == 0
    return model, circuit


@pytest.mark.parametrize("method", ["ablation", "cka", "combined", "random"])
def test_cli_match(discovered, tmp_path, method, capsys):
    from fastcd.artifacts import Matching

    model, circuit = discovered
    out = tmp_path / "m.json"
    assert main(["match", "--teacher", str(model), "--student", str(model), "--circuit", str(circuit), "--method",
                 method, "--n-boxes", "3", "--n-examples", "12", "--out", str(out)]) == 0
    m = Matching.load(out)
    assert m.method == method and len(m) >= 1
    assert " -> " in capsys.readouterr().out


def test_cli_distill_with_cache_and_curves(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from fastcd import loading
    from fastcd.artifacts import Matching, Pair
    from fastcd.models import Head

    model = _save_tiny(tmp_path)
    m = Matching([Pair(Head(2, 1), Head(1, 0), "last", "g", {}), Pair(Head(0, 0), Head(0, 1), "query_label", "g", {})],
                 "given")
    m.save(tmp_path / "m.json")
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(model), "--student", str(model), "--task", "entity-tracking", "--n-boxes",
            "3", "--matching", str(tmp_path / "m.json"), "--steps", "4", "--batch-size", "4", "--n-train", "16",
            "--n-eval", "8", "--log-every", "1", "--out", str(out)]
    placed, load = [], loading.load_model

    def spy(*a, **k):
        placed.append((k.get("what"), k.get("device_map")))
        return load(*a, **k)

    monkeypatch.setattr(loading, "load_model", spy)
    assert main(args + ["--build-teacher-cache", str(tmp_path / "c0"), "--teacher-device-map", "auto",
                        "--cache-only"]) == 0
    assert placed == [("--teacher", "auto")]  # the teacher that builds the cache loads spread (here all on the CPU)
    assert (tmp_path / "c0" / "index.json").exists() and not out.exists()  # --cache-only: nothing trained
    assert main(args + ["--build-teacher-cache", str(tmp_path / "cache")]) == 0
    assert (tmp_path / "cache" / "index.json").exists()
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    AutoModelForCausalLM.from_pretrained(out / "student", local_files_only=True)
    assert "student_accuracy" in capsys.readouterr().out
    rc = main(["distill", "--student", str(model), "--task", "tom", "--out", str(out), "--lam", "-1"])
    assert rc == 2 and "lam must be >= 0" in capsys.readouterr().err


def test_cli_help_imports_no_torch():
    code = ("import sys\nfrom fastcd.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'fastcd --help imported torch'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def _command_parsers():
    from fastcd import cli

    made = {}
    real = cli._parse

    def grab(parser, argv, n):
        made[parser.prog] = parser
        raise cli.UsageErrorExit("stop")

    cli._parse = grab
    try:
        for name in cli.COMMANDS:
            assert cli.main([name]) == 2
    finally:
        cli._parse = real
    return made


def test_every_flag_of_every_command_has_help_and_one_meaning():
    parsers = _command_parsers()
    assert len(parsers) == 8
    kinds = {}
    for prog, p in parsers.items():
        for a in p._actions:
            if a.dest == "help":
                continue
            assert a.help and a.help.strip(), f"{prog}: {a.option_strings or a.dest} has no help"
            for opt in a.option_strings:
                kinds.setdefault(opt.replace("_", "-"), set()).add((getattr(a.type, "__name__", str(a.type)),
                                                                     a.nargs))
    # one meaning per flag name across commands: the same type and arity wherever it appears
    clashes = {k: v for k, v in kinds.items() if len(v) > 1}
    assert not clashes, clashes
    assert kinds["--top-k"] == {("int", None)} and kinds["--path-k"] == {("int", "+")}


def test_cli_config_file_supplies_flags_and_the_command_line_wins(tmp_path, capsys):
    cfg = tmp_path / "flags.yaml"
    cfg.write_text("task: tom\nrole: teacher\nd_model: 30\nn-heads: 4\n")
    out = str(tmp_path / "x")
    assert main(["pretrain", "--config", str(cfg), "--out", out]) == 2
    assert "d_model=30 must be divisible by n_heads=4" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(cfg), "--out", out, "--d-model", "32", "--n-heads", "3"]) == 2
    assert "d_model=32 must be divisible by n_heads=3" in capsys.readouterr().err  # the command line wins
    (tmp_path / "bad.json").write_text('{"task": "tom", "n_layer": 2}')
    assert main(["pretrain", "--config", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "unknown flag(s) ['n_layer']" in err and len(err.strip().splitlines()) == 1


def test_cli_debug_shows_the_traceback_and_internal_errors_are_not_disguised(monkeypatch, capsys):
    from fastcd import cli

    args = ["pretrain", "--task", "tom", "--out", "x", "--d-model", "30", "--n-heads", "4"]
    with pytest.raises(ValueError, match="must be divisible"):
        main(args + ["--debug"])

    def broken(argv):
        raise KeyError("an internal bug")

    monkeypatch.setitem(cli.RUNNERS, "pretrain", broken)
    with pytest.raises(KeyError, match="internal bug"):  # not a one-line exit 2
        main(["pretrain"])


def test_cli_unknown_flag_and_missing_required_are_one_line(capsys):
    assert main(["match", "--teacher", "t"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "required" in err[0]
    assert main(["demo", "--stepz", "3"]) == 2
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err


TASK_MODULE = '''
from fastcd.tasks import Example, TaskBase
from fastcd.tasks.base import generate_unique


class Pets(TaskBase):
    name, roles = "pets", ("query_name",)
    names, pets = ("Ann", "Bob", "Cid", "Dee", "Eve", "Fay"), ("cat", "dog", "eel", "fox", "gnu", "hen")

    def sample(self, rng):
        (a, b), (p, q), i = rng.sample(self.names, 2), rng.sample(self.pets, 2), rng.randrange(2)
        prompt = f"{a} owns a {p} . {b} owns a {q} . {(a, b)[i]} owns a"
        start = prompt.rindex((a, b)[i])
        return Example(self.name, prompt, (p, q)[i], {"spans": {"query_name": [start, start + 3]}})

    def generate(self, n, seed=0, split="train"):
        return generate_unique(self.sample, n, f"{self.name}/{seed}", split, self.name)

    def corrupt(self, clean, rng):
        return self.sample(rng)

    def word_pools(self):
        return {"names": self.names, "pets": self.pets}
'''


def test_cli_takes_a_task_of_your_own_by_import_path(tmp_path, monkeypatch, capsys):
    from conftest import make_tiny

    from fastcd.artifacts import Circuit, Matching
    from fastcd.tokenizer import build_word_tokenizer

    (tmp_path / "my_pets.py").write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    tok = build_word_tokenizer(["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "cat", "dog", "eel", "fox", "gnu", "hen",
                                "owns", "a", "."])
    m = make_tiny("llama", n_layers=2, vocab_size=len(tok))
    m.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    model = str(tmp_path / "model")
    assert main(["discover", "--model", model, "--task", "my_pets:Pets", "--n-examples", "16",
                 "--out", str(tmp_path / "c.json")]) == 0
    c = Circuit.load(tmp_path / "c.json")
    assert c.task == "pets" and {h.position for h in c.heads} == {"last"}
    assert main(["match", "--teacher", model, "--student", model, "--circuit", str(tmp_path / "c.json"), "--task",
                 "my_pets:Pets", "--method", "cka", "--n-examples", "16", "--out", str(tmp_path / "m.json")]) == 0
    assert len(Matching.load(tmp_path / "m.json")) == len(c)
    assert main(["discover", "--model", model, "--task", "my_pets:Nope", "--out", str(tmp_path / "x.json")]) == 2
    assert "cannot import 'Nope' from 'my_pets'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["distill", "discover", "match", "experiment", "demo", "pretrain"])
def test_help_states_each_default_once_and_what_a_no_flag_turns_off(command, capsys):
    import re

    from fastcd.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert len(blocks) > 3
    for b in blocks:
        flat = " ".join(b.split())
        assert flat.lower().count("default:") <= 1, flat
        if flat.startswith(("--no_", "--no-")):
            assert "turn off:" in flat, flat


def test_cli_plan_prints_the_stages_and_stops(tmp_path, capsys):
    """``--plan`` on discover, match and distill: the plan block with every stage, a status line for the loading,
    exit 0, and nothing written."""
    from fastcd.artifacts import Circuit, CircuitHead
    from fastcd.models import Head

    model = _save_tiny(tmp_path)
    common = ["--n-boxes", "3"]
    assert main(["discover", "--model", str(model), "--task", "entity-tracking", *common, "--n-examples", "12",
                 "--out", str(tmp_path / "c.json"), "--plan"]) == 0
    err = capsys.readouterr().err
    assert "plan: discover (auto)" in err and "plan:   discovery " in err and "fastcd: load: done in" in err
    search = ["discover", "--model", str(model), "--task", "entity-tracking", *common, "--method", "search",
              "--roles", "all", "--n-examples", "12", "--n-heldout", "20", "--out", str(tmp_path / "c.json"), "--plan"]
    assert main(search) == 0
    err = capsys.readouterr().err
    assert "search over 12 (head, role) units on 12 prompts, about 5 circuit sizes" in err
    assert main([*search, "--max-units", "4"]) == 0  # the plan knows where the growth stops
    assert "search over 12 (head, role) units on 12 prompts growing to at most 4, about" in capsys.readouterr().err
    Circuit([CircuitHead(Head(1, 0), "heads", "last", 0.0)], "entity-tracking", 3, 4).save(tmp_path / "given.json")
    assert main(["match", "--teacher", str(model), "--student", str(model), "--circuit", str(tmp_path / "given.json"),
                 *common, "--n-examples", "12", "--out", str(tmp_path / "m.json"), "--plan"]) == 0
    err = capsys.readouterr().err
    assert "plan: match (ablation)" in err and "plan:   matching " in err
    assert main(["distill", "--teacher", str(model), "--student", str(model), "--task", "entity-tracking", *common,
                 "--n-train", "16", "--batch-size", "4", "--n-eval", "8", "--n-discovery", "8", "--out",
                 str(tmp_path / "run"), "--plan"]) == 0
    err = capsys.readouterr().err
    for name in ("discovery", "matching", "teacher evaluation", "teacher cache", "training", "evaluation"):
        assert f"plan:   {name} " in err, name
    assert not any((tmp_path / f).exists() for f in ("c.json", "c.png", "m.json", "run"))


def test_cli_match_aligns_units_found_at_every_position_at_a_role(tmp_path, capsys):
    """A circuit of heads live at every position (search --roles all): --align-position last matches and aligns
    them at the last token (CKA there), keeps a unit that has its role, and records it, so that the student circuit
    keeps those heads live everywhere (Matching.circuit_units); a bad role or a circuit
    without such units is one line before any model loads."""
    from fastcd.artifacts import Circuit, CircuitHead, Matching
    from fastcd.models import Head

    model = _save_tiny(tmp_path)
    circ = tmp_path / "c.json"
    Circuit([CircuitHead(Head(1, 0), "search", "all", 0.0), CircuitHead(Head(0, 2), "search", "all", 0.0),
             CircuitHead(Head(1, 3), "search", "object", 0.0)], "entity-tracking", 3, 4).save(circ)
    common = ["match", "--teacher", str(model), "--student", str(model), "--circuit", str(circ), "--method", "cka",
              "--n-boxes", "3", "--n-examples", "12"]
    assert main([*common, "--align-position", "last", "--out", str(tmp_path / "m.json")]) == 0
    m = Matching.load(tmp_path / "m.json")
    assert sorted((str(p.teacher), p.position) for p in m.pairs) == [("L0H2", "last"), ("L1H0", "last"),
                                                                      ("L1H3", "object")]
    assert m.meta["aligned_at"] == "last" and m.meta["live_everywhere"] == ["L0H2", "L1H0"]
    # the student circuit keeps the heads found live everywhere live everywhere (circuit accuracy)
    assert sorted((str(h), r) for h, r in m.circuit_units()) == [("L0H2", "all"), ("L1H0", "all"), ("L1H3", "object")]
    assert all(p.student == p.teacher for p in m.pairs)  # a model matched with itself: CKA 1 at the same head
    capsys.readouterr()
    assert main([*common, "--align-position", "nowhere", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--align-position must be one of the task's roles" in err[0], err
    Circuit([CircuitHead(Head(1, 0), "g", "last", 0.0)], "entity-tracking", 3, 4).save(circ)
    assert main([*common, "--align-position", "last", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this circuit has none" in err[0], err
    assert not (tmp_path / "x.json").exists()

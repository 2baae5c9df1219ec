"""The Python examples of docs/USAGE.md (README's guide to the API) run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "docs" / "USAGE.md"


def test_readme_quickstart_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "docs/USAGE.md has no python block"
    quick = [b for b in blocks if "capture_z" in b]
    assert quick, "docs/USAGE.md has no quickstart block"
    exec(compile(quick[0], "docs/USAGE.md", "exec"), {})
    assert "torch.Size([64, 1, 2, 16])" in capsys.readouterr().out


def test_readme_own_loop_runs_and_saves_a_loadable_model(tmp_path, monkeypatch):
    """The own-loop example trains, and the student it saves while still parametrised reloads in plain
    transformers with the trained weights (no ``parametrizations`` keys, identical logits)."""
    import torch
    from transformers import AutoModelForCausalLM

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    loop = [b for b in blocks if "CircuitDistiller(" in b]
    assert loop, "docs/USAGE.md has no own-loop block"
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(loop[0], "docs/USAGE.md", "exec"), ns)
    student, enc = ns["student"], ns["enc"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "own-loop-student", local_files_only=True)
    with torch.no_grad():
        a = student(enc.input_ids).logits
        b = reloaded(enc.input_ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not any("parametrizations" in k for k in reloaded.state_dict())


def test_readme_own_task_runs(capsys):
    """The README's user-defined task (a TaskBase subclass) goes through distill(): discovery with the default
    policy, ablation matching, training and evaluation."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    mine = [b for b in blocks if "class Pets(TaskBase)" in b]
    assert mine, "docs/USAGE.md has no own-task block"
    ns = {}
    exec(compile(mine[0], "docs/USAGE.md", "exec"), ns)
    res = ns["res"]
    assert res.circuit.task == "pets" and all(c.position == "last" for c in res.circuit.heads)
    assert {p.position for p in res.matching.pairs} == {"last"}
    assert res.metrics["trained_heads"] == len(res.matching.student_heads()) >= 1
    assert res.metrics["student_accuracy"] == sum(res.correct) / len(res.correct)
    assert "Circuit(pets" in capsys.readouterr().out

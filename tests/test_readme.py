"""The README's Python quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    quick = [b for b in blocks if "build_word_tokenizer" in b]
    assert quick, "README has no quickstart block"
    exec(compile(quick[0], "README.md", "exec"), {})
    assert "torch.Size([64, 1, 2, 16])" in capsys.readouterr().out

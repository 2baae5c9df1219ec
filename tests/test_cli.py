import subprocess
import sys

from fastcd.cli import main


def test_info_runs_and_reports_choices():
    out = subprocess.run([sys.executable, "-m", "fastcd.info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for key in ("torch", "triton", "CUDA available", "C++ extension fastcd._C", "flash-attn usable",
                "op: nearest_indices", "op: attention in load_model"):
        assert key in out.stdout
    assert "sdpa" in out.stdout  # no CUDA here


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

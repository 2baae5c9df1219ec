"""fastcd.io: every file fastcd writes goes through a temporary target, so a reader (or a killed run) never sees
half a file; per-example correctness round-trips through its bit string."""

import os

import pytest

from fastcd.io import atomic_target, correct_as_bits, correct_from_bits, write_json_atomic, write_text_atomic


def test_a_file_appears_whole_or_not_at_all(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic({"a": 1}, path)
    with pytest.raises(RuntimeError):
        with atomic_target(path) as tmp, open(tmp, "w") as f:
            f.write('{"a": 2, "b"')  # killed half-way
            raise RuntimeError("killed")
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"a":1}'  # the old file, untouched
    assert not os.path.exists(str(path) + ".tmp")  # and nothing left behind
    write_text_atomic("# summary\n", tmp_path / "summary.md")
    assert (tmp_path / "summary.md").read_text() == "# summary\n"


def test_a_directory_is_replaced_in_one_step_and_the_old_one_survives_a_failure(tmp_path):
    d = tmp_path / "final"
    with atomic_target(d, directory=True) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("v1")
    with pytest.raises(RuntimeError), atomic_target(d, directory=True) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("v2-partial")
        raise RuntimeError("killed while saving")
    assert (d / "weights").read_text() == "v1" and not os.path.exists(str(d) + ".tmp")
    with atomic_target(d, directory=True) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("v2")
    assert (d / "weights").read_text() == "v2" and sorted(os.listdir(tmp_path)) == ["final"]  # no .old, no .tmp


def test_correctness_bits_round_trip():
    correct = [True, False, False, True]
    assert correct_as_bits(correct) == "1001" and correct_from_bits("1001") == correct

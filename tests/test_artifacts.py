"""fastcd.artifacts: a circuit and a matching round-trip through JSON, print readably, and refuse bad content (no
head, a head out of range, a missing key) and heads a model lacks, each in one line."""

import json

import pytest
from conftest import make_tiny

from fastcd.artifacts import Circuit, CircuitHead, Matching, Pair
from fastcd.models import Head


def test_circuit_json_roundtrip_and_errors(tmp_path):
    c = Circuit([CircuitHead(Head(1, 2), "value_fetcher", "last", -0.5),
                 CircuitHead(Head(0, 3), "position_detector", "query_label", -0.1)], "entity-tracking", 2, 4)
    c.save(tmp_path / "c.json")
    d = json.loads((tmp_path / "c.json").read_text())
    assert d["heads"][0]["head"] == "L1H2"
    back = Circuit.load(tmp_path / "c.json")
    assert back.to_json() == c.to_json()
    assert "value_fetcher @ last: L1H2(-0.500)" in str(back)
    with pytest.raises(ValueError, match="at least one head"):
        Circuit([], "entity-tracking", 2, 4)
    with pytest.raises(ValueError, match="out of range"):
        Circuit([CircuitHead(Head(5, 0), "g", "all", 0.0)], "entity-tracking", 2, 4)
    with pytest.raises(ValueError, match="missing key"):
        Circuit.from_json({"task": "x"})


def test_matching_json_table_and_model_check(tmp_path, tok):
    m = Matching([Pair(Head(5, 1), Head(3, 8), "last", "value_fetcher", {"cka": 0.9})], "cka")
    m.save(tmp_path / "m.json")
    back = Matching.load(tmp_path / "m.json")
    assert back.to_json() == m.to_json()
    assert "L5H1 -> L3H8" in str(back)
    t = make_tiny("llama", vocab_size=len(tok))
    with pytest.raises(ValueError, match="matching teacher head L5H1 is out of range"):
        back.check_models(t, t)
    with pytest.raises(ValueError, match="at least one pair"):
        Matching([], "cka")
    with pytest.raises(ValueError, match="missing key"):
        Matching.from_json({"pairs": [{"teacher": "L0H0"}]})

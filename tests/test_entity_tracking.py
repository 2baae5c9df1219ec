"""fastcd.tasks.entity_tracking: the prompt format and its answer, box counts, corrupt prompts, parsing."""

import pytest

from fastcd.tasks import EntityTracking


def test_entity_tracking_format_and_answer():
    task = EntityTracking(n_boxes=7)
    for ex in task.generate(200, seed=1):
        m = ex.meta
        assert len(m["objects"]) == 7 and len(set(m["labels"])) == 7
        assert ex.prompt.startswith(f"The {m['objects'][0]} is in Box {m['labels'][0]}, the ")
        assert ex.prompt.endswith(f". Box {m['query_label']} contains the")
        assert ex.answer == m["objects"][m["labels"].index(m["query_label"])]
        s = m["spans"]
        assert ex.prompt[s["query_label"][0]] == m["query_label"]
        assert ex.prompt[s["box_label"][0]] == m["query_label"]
        assert s["box_label"][0] < s["query_label"][0]


def test_entity_tracking_box_count_configurable():
    ex = EntityTracking(n_boxes=3).generate(5)[0]
    assert ex.prompt.count("is in Box") == 3
    with pytest.raises(ValueError, match="n_boxes"):
        EntityTracking(n_boxes=1)
    with pytest.raises(ValueError, match="letters"):
        EntityTracking(n_boxes=3, letters="ABC")


def test_entity_tracking_corrupt_hides_answer():
    task = EntityTracking()
    for p in task.pairs(200, seed=2):
        c, k = p.clean, p.corrupt
        assert k.answer is None
        assert k.meta["query_label"] not in k.meta["labels"]  # answer not recoverable
        assert c.answer not in k.meta["objects"]
        assert k.meta["intended_query_index"] != c.meta["query_index"]
        assert len(c.meta["objects"]) == len(k.meta["objects"])


def test_entity_tracking_parse_roundtrip():
    ex = EntityTracking().generate(3)[1]
    back = EntityTracking.parse(ex.prompt)
    assert back.answer == ex.answer and back.meta["spans"] == ex.meta["spans"]
    with pytest.raises(ValueError, match="entity-tracking format"):
        EntityTracking.parse("hello world")

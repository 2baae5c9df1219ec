import numpy as np
import pytest
import torch
from conftest import make_tiny

from fastcd import _ext
from fastcd.artifacts import Circuit, CircuitHead
from fastcd.cka import cka_matrix
from fastcd.match import MatchInputs, match, match_ablation, match_random
from fastcd.models import Head
from fastcd.reference import cka_matrix_ref, linear_cka_ref
from fastcd.tasks import EntityTracking

needs_cpp = pytest.mark.skipif(not _ext.HAS_CPP, reason="fastcd._C not built")
IMPLS = [pytest.param("cpp", marks=needs_cpp), "torch"]


def _stacks(ha, hb, m, da, db, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((ha, m, da)).astype(dtype)
    # b shares structure with a so that CKA values spread over (0, 1)
    mix = rng.standard_normal((da, db)).astype(dtype)
    b = np.stack([a[i % ha] @ mix + 0.5 * rng.standard_normal((m, db)).astype(dtype) for i in range(hb)])
    return a, b


@pytest.mark.parametrize("m", [2, 7, 97, 300])
@pytest.mark.parametrize("d", [16, 59, 64, 128])
@pytest.mark.parametrize("impl", IMPLS)
def test_cka_matrix_matches_reference(m, d, impl):
    a, b = _stacks(2, 3, m, d, 64 if d != 64 else 59, seed=m + d)
    ref = cka_matrix_ref(a, b)
    forms = ["auto", "gram", "feature"] if impl == "cpp" else ["auto"]
    for form in forms:
        got = cka_matrix(a, b, impl=impl, form=form)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9, err_msg=f"{impl}/{form}")


@pytest.mark.parametrize("m", [2, 7, 97, 300])
@pytest.mark.parametrize("impl", IMPLS)
def test_cka_matrix_float32_precision(m, impl):
    """C++: float32 products summed in float64 per tile agree with the float64 reference to 1e-6 (measured
    ~1e-8), at odd head counts and lengths (it pads rows and columns), with a constant head scoring 0. torch: one
    float32 BLAS product over all P = m(m+1)/2 terms, ~1e-6 at m=300."""
    a, b = _stacks(5, 7, m, 24, 40, seed=m)
    b[2] = 3.0
    ref = cka_matrix_ref(a, b)
    got = cka_matrix(a, b, impl=impl, form="gram" if impl == "cpp" else "auto", precision="float32")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 if impl == "cpp" else 5e-6)
    assert (got[:, 2] == 0).all()


@needs_cpp
def test_cka_matrix_float32_tiles_and_bad_precision():
    a, b = _stacks(37, 41, 60, 16, 24, seed=3)
    big = cka_matrix(a, b, impl="cpp", form="gram", precision="float32", max_bytes=1 << 30)
    small = cka_matrix(a, b, impl="cpp", form="gram", precision="float32", max_bytes=1 << 20)
    np.testing.assert_allclose(small, big, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="precision must be 'float32' or 'float64'"):
        cka_matrix(a, b, impl="cpp", precision="float16")


@needs_cpp
def test_cka_tiling_is_invisible():
    a, b = _stacks(37, 41, 60, 16, 24, seed=3, dtype=np.float64)
    big = cka_matrix(a, b, impl="cpp", form="gram", max_bytes=1 << 30)
    for form in ("gram", "feature"):
        small = cka_matrix(a, b, impl="cpp", form=form, max_bytes=1 << 20)  # forces many tiles
        np.testing.assert_allclose(small, big, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS + ["python"])
def test_cka_properties(impl):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 50, 8))
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    same = cka_matrix(x, x, impl=impl)
    assert same[0, 0] == pytest.approx(1.0, abs=1e-12)
    rotated = cka_matrix(x, 3.0 * (x @ q) + 7.0, impl=impl)  # orthogonal, isotropic scale, shift
    assert rotated[0, 0] == pytest.approx(1.0, abs=1e-10)
    y = rng.standard_normal((1, 50, 5))
    assert cka_matrix(x, y, impl=impl)[0, 0] == pytest.approx(cka_matrix(y, x, impl=impl)[0, 0], abs=1e-12)
    const = np.ones((1, 50, 8))
    assert cka_matrix(const, x, impl=impl)[0, 0] == 0.0  # degenerate head: defined as 0, never NaN


def test_single_pair_reference_against_paper_formula():
    """linear_cka_ref == ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(33, 7, generator=g, dtype=torch.float64), torch.randn(33, 5, generator=g, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expect = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    torch.testing.assert_close(linear_cka_ref(x, y), expect)


@pytest.mark.parametrize("impl", IMPLS + ["python"])
def test_cka_errors_name_the_argument(impl):
    a, b = _stacks(2, 2, 5, 4, 4)
    with pytest.raises(ValueError, match=r"a must have shape \[heads, m, d\]"):
        cka_matrix(a[0], b, impl=impl)
    with pytest.raises(ValueError, match="b must have m >= 2 samples, got 1"):
        cka_matrix(a, b[:, :1], impl=impl)
    with pytest.raises(ValueError, match="a and b must have the same m"):
        cka_matrix(a, b[:, :3], impl=impl)
    bad = b.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="b must be finite"):
        cka_matrix(a, bad, impl=impl)


@needs_cpp
def test_cka_cpp_only_errors():
    a, b = _stacks(2, 2, 5, 4, 4)
    with pytest.raises(ValueError, match="form must be 'auto', 'gram' or 'feature'"):
        cka_matrix(a, b, impl="cpp", form="svd")
    with pytest.raises(ValueError, match="max_bytes must be at least 1 MiB"):
        cka_matrix(a, b, impl="cpp", max_bytes=10)
    with pytest.raises(ValueError, match="impl must be"):
        cka_matrix(a, b, impl="cuda")


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from fastcd.tokenizer import build_word_tokenizer

    return build_word_tokenizer()


def _inputs(tok, teacher, student, n=24):
    task = EntityTracking(n_boxes=3)
    pairs = task.pairs(n, seed=0, split="val")
    clean = task.encode([p.clean for p in pairs], tok)
    ref = task.encode([p.corrupt for p in pairs], tok)
    circuit = Circuit([CircuitHead(Head(1, 2), "value_fetcher", "last", -0.5),
                       CircuitHead(Head(1, 0), "value_fetcher", "last", -0.3),
                       CircuitHead(Head(0, 3), "position_detector", "query_label", -0.2)], "entity-tracking", 2, 4)
    return MatchInputs(teacher, student, circuit, clean, clean, ref, ref)


def test_cka_matching_recovers_identity_when_student_is_teacher(tok):
    teacher = make_tiny("llama", vocab_size=len(tok))
    inp = _inputs(tok, teacher, teacher)
    m = match(inp, "cka")
    assert [(p.teacher, p.student) for p in m.pairs] == [(p.teacher, p.teacher) for p in m.pairs]
    assert all(p.scores["cka"] == pytest.approx(1.0, abs=1e-6) for p in m.pairs)
    assert len({p.student for p in m.pairs}) == len(m.pairs)  # one-to-one
    assert {p.position for p in m.pairs} == {"last", "query_label"}


def test_ablation_matching_rule(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("gpt2", vocab_size=len(tok), seed=2)
    inp = _inputs(tok, teacher, student)
    from fastcd.match import ablation_scores

    sc = ablation_scores(inp)
    m = match_ablation(inp, k=4, scores=sc)
    assert len(m) == 4 and m.meta["k"] == 4
    t_drop = dict(zip([h for h, _, _ in sc["teacher_heads"]], sc["teacher_drop"]))
    s_drop = dict(zip(sc["student_heads"], sc["student_drop"]))
    # candidates are the 4 student heads with the largest drop
    kth = sorted(sc["student_drop"], reverse=True)[3]
    for p in m.pairs:
        assert s_drop[p.student] >= kth
        best = min(abs(s_drop[p.student] - v) for v in t_drop.values())
        assert p.scores["d_abl"] == pytest.approx(best)  # Eq. 5: the nearest teacher drop
    # Eq. 4: teacher drop measured against the student's baseline
    assert sc["teacher_drop"][0] == pytest.approx(sc["student_base"] - sc["teacher_ablated"][0])
    back = match_ablation(inp, direction="teacher_to_student", scores=sc)
    assert [p.teacher for p in back.pairs] == [Head(1, 2), Head(1, 0), Head(0, 3)]
    assert m.to_json() == match_ablation(inp, k=4, scores=sc).to_json()  # deterministic
    with pytest.raises(ValueError, match=r"k must be in 1\.\.8"):
        match_ablation(inp, k=9, scores=sc)
    with pytest.raises(ValueError, match="direction must be"):
        match_ablation(inp, direction="both", scores=sc)
    # each model's own baseline: the teacher's drops against its own P, the student's unchanged
    own = ablation_scores(inp, baseline="own")
    assert own["student_drop"] == sc["student_drop"] and own["teacher_ablated"] == sc["teacher_ablated"]
    assert own["teacher_drop"] == pytest.approx([own["teacher_base"] - a for a in own["teacher_ablated"]])
    assert match_ablation(inp, k=4, scores=own).meta["baseline"] == "own" and m.meta["baseline"] == "student"
    with pytest.raises(ValueError, match=r"baseline must be one of \('student', 'own'\), got 'teacher'"):
        ablation_scores(inp, baseline="teacher")


def test_combined_and_random(tok):
    teacher = make_tiny("llama", vocab_size=len(tok), seed=1)
    student = make_tiny("llama", vocab_size=len(tok), seed=3)
    inp = _inputs(tok, teacher, student)
    c = match(inp, "combined", weight=0.7)
    assert len({p.student for p in c.pairs}) == 3
    assert all(p.scores["cost"] == pytest.approx(0.7 * (1 - p.scores["cka"]) + 0.3 * p.scores["d_abl"])
               for p in c.pairs)
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        match(inp, "combined", weight=2.0)
    r1, r2, r3 = (match_random(inp.circuit, student, seed=s) for s in (0, 0, 1))
    assert r1.to_json() == r2.to_json() and r1.to_json() != r3.to_json()
    assert len({p.student for p in r1.pairs}) == 3
    with pytest.raises(ValueError, match="method must be one of"):
        match(inp, "hungarian")


def test_ablation_accuracies_equal_one_ablated_forward_per_head(tok):
    """The batched ablation accuracies (layer skipping, last-position logits) equal one plain forward per head
    with :func:`fastcd.ablate`."""
    from fastcd import ablate, load_model, mean_z
    from fastcd.match import ablation_accuracies
    from fastcd.pretrain import shipped_checkpoint

    model = load_model(shipped_checkpoint("et-student"))  # a trained model: accuracies spread over 0.3-1.0
    task = EntityTracking(n_boxes=3)
    pairs = task.pairs(24, seed=0, split="val")
    clean = task.encode([p.clean for p in pairs], tok)
    corrupt = task.encode([p.corrupt for p in pairs], tok)
    means = mean_z(model, corrupt.input_ids)
    heads = [(Head(0, 1), "all"), (Head(1, 2), "last"), (Head(1, 0), "query_label"), (Head(0, 3), "all")]
    base, got = ablation_accuracies(model, clean, heads, means, max_batch=16)
    with torch.no_grad():
        ref_base = (model(clean.input_ids).logits[:, -1].argmax(-1) == clean.answer_ids).float().mean()
        assert base == pytest.approx(float(ref_base), abs=1e-6)
        for (h, role), g in zip(heads, got):
            pos = None if role == "all" else clean.positions[role][:, None]
            with ablate(model, [h], means=means, positions=pos):
                acc = (model(clean.input_ids).logits[:, -1].argmax(-1) == clean.answer_ids).float().mean()
            assert g == pytest.approx(float(acc), abs=1e-6), (h, role)
    assert min(got) < 0.5 < base  # the check is not vacuous


def test_ablation_rule_on_a_continuous_metric_recovers_the_identity(tok):
    """A model matched to itself: with p(answer) as the ablation metric the rule maps every circuit head to
    itself (distinct heads have distinct drops); the metric is recorded in the matching."""
    from fastcd import load_model
    from fastcd.pretrain import shipped_checkpoint

    model = load_model(shipped_checkpoint("et-teacher"))
    task = EntityTracking(n_boxes=7)
    pairs = task.pairs(64, seed=0, split="val")
    clean = task.encode([p.clean for p in pairs], tok)
    corrupt = task.encode([p.corrupt for p in pairs], tok)
    heads = [Head(0, 2), Head(1, 1), Head(1, 3)]
    circuit = Circuit([CircuitHead(h, "heads", "all", 0.0) for h in heads], "entity-tracking", 2, 4)
    inp = MatchInputs(model, model, circuit, clean, clean, corrupt, corrupt)
    m = match_ablation(inp, metric="prob", direction="teacher_to_student", k=8)  # every student head a candidate
    assert m.meta["metric"] == "prob"
    assert [(p.teacher, p.student) for p in m.pairs] == [(h, h) for h in heads]
    with pytest.raises(ValueError, match="metric must be 'accuracy'"):
        match_ablation(inp, metric="logit")


def test_role_wise_ablation_matching_recovers_the_identity_at_each_role(tok):
    """Role-wise units (a head at two roles) matched to the model itself with student_position='roles' and
    p(answer): every unit pairs with its own head at its own role; each pair's student drop is the drop of that
    head ablated at that role (checked against ablation_accuracies at that role alone)."""
    from fastcd import load_model, mean_z
    from fastcd.match import ablation_accuracies, ablation_scores
    from fastcd.pretrain import shipped_checkpoint

    model = load_model(shipped_checkpoint("et-teacher"))
    task = EntityTracking(n_boxes=7)
    pairs = task.pairs(64, seed=0, split="val")
    clean = task.encode([p.clean for p in pairs], tok)
    corrupt = task.encode([p.corrupt for p in pairs], tok)
    # distinct drops at each role (p(answer), these 64 prompts): L0H2 0.89 and L1H2 0.80 at the last token, L0H2
    # 0.11 and L0H3 0.45 at the queried box's label; L0H2 is a unit at both roles
    units = [(Head(0, 2), "last"), (Head(1, 2), "last"), (Head(0, 2), "box_label"), (Head(0, 3), "box_label")]
    circuit = Circuit([CircuitHead(h, r, r, 0.0) for h, r in units], "entity-tracking", 2, 4)
    inp = MatchInputs(model, model, circuit, clean, clean, corrupt, corrupt)
    sc = ablation_scores(inp, student_position="roles", metric="prob")
    assert sc["student_roles"] == ["last", "box_label"] and len(sc["student_drop"]) == 2 * 8
    m = match_ablation(inp, metric="prob", direction="teacher_to_student", k=8, student_position="roles", scores=sc)
    assert [(p.teacher, p.student, p.position) for p in m.pairs] == [(h, h, r) for h, r in units]
    base, abl = ablation_accuracies(model, clean, [(Head(0, 2), "box_label")], mean_z(model, corrupt.input_ids),
                                    metric="prob")
    obj = next(p for p in m.pairs if p.position == "box_label" and p.student == Head(0, 2))
    assert obj.scores["student_drop"] == pytest.approx(base - abl[0], abs=1e-6)
    assert m.meta["student_position"] == "roles"
    fwd = match_ablation(inp, metric="prob", student_position="roles", scores=sc)  # k: units per role
    assert sorted(p.position for p in fwd.pairs) == ["box_label", "box_label", "last", "last"]
    assert all(p.student in {h for h, r in units if r == p.position} for p in fwd.pairs)  # candidates at its role


def test_cka_matching_states_its_noise_floor_and_warns_within_it(tok):
    """At m = 4 prompts and d_head 8, two unrelated random heads already score about 8/12 with the biased CKA: the
    matching of two unrelated models warns, and its meta carries the Gaussian null and the count within it; the
    identity matching (CKA 1) is far above it and does not warn."""
    import warnings

    from fastcd.match import cka_null

    teacher, student = make_tiny("llama", vocab_size=len(tok), seed=1), make_tiny("llama", vocab_size=len(tok), seed=2)
    with pytest.warns(UserWarning, match=r"pairs score at or below .* at m=4 activation rows \(d_head 8/8"):
        m = match(_inputs(tok, teacher, student, n=4), "cka")
    nf = m.meta["noise_floor"]
    assert nf["m"] == 4 and nf["null_mean"] == pytest.approx(cka_null(4, 8, 8)[0])
    assert 0.5 < nf["null_mean"] < 0.85  # about d / (m + d) = 0.67
    assert nf["pairs_within_null"] == sum(p.scores["cka"] <= nf["null_p95"] for p in m.pairs) >= 1
    from fastcd.card import model_card
    from fastcd.config import DistillConfig
    from fastcd.pipeline import DistillResult

    card = model_card(DistillResult(student, m, None, {}), DistillConfig())  # the saved student's card says so
    assert f"Caveat: {nf['pairs_within_null']} of 3 pairs score at or below" in card
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = match(_inputs(tok, teacher, teacher, n=64), "cka")
    assert same.meta["noise_floor"]["pairs_within_null"] == 0 and same.meta["noise_floor"]["null_mean"] < 0.2

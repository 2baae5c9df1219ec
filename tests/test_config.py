"""fastcd.config: every bad DistillConfig field is one line naming it; the compute precision each width resolves to."""

import pytest

from fastcd.config import DistillConfig


@pytest.mark.parametrize("field, value, message", [
    ("log_every", 0, r"log_every must be an integer >= 1, got 0"),
    ("lam", float("nan"), r"lam must be a finite number, got nan"),
    ("steps", 2.5, r"steps must be an integer >= 1, got 2.5"),
    ("lr", float("inf"), r"lr must be a finite number, got inf"),
    ("save_every", -1, r"save_every must be an integer >= 0, got -1"),
    ("eval_every", -5, r"eval_every must be an integer >= 0, got -5"),
    ("n_discovery", 1, r"n_discovery must be an integer >= 2, got 1"),
    ("eps", 0.0, r"eps must be > 0"),
    ("batch_size", 2, r"batch_size must be >= 3 for 'ce\+cka'.*CKA is identically 1"),
])
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**{field: value}).validate()
    assert DistillConfig(method="circuit-ce", batch_size=2).validate()  # no CKA term: m=2 is fine


def test_precision_auto_is_bf16_for_real_widths_on_the_cpu_only():
    from fastcd.config import resolve_precision

    assert resolve_precision("auto", 896) == "bf16" and resolve_precision("auto", 576) == "bf16"
    assert resolve_precision("auto", 64) == "float32"  # the shipped toy checkpoints
    assert resolve_precision("auto", 896, "cuda") == "float32"  # on a GPU mixed_precision says it
    assert resolve_precision("float32", 896) == "float32" and resolve_precision("bf16", 64) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", 64)

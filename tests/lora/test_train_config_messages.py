"""TrainConfig's refusals name the field at fault and its value, one field at a time."""

from __future__ import annotations

import pytest

from spectra.errors import ConfigError
from spectra.lora.train import TrainConfig


@pytest.mark.parametrize("kwargs, said", [
    (dict(eval_fraction=2.0), "eval_fraction must lie in [0, 1), got 2.0."),
    (dict(eval_fraction=-0.1), "eval_fraction must lie in [0, 1), got -0.1."),
    (dict(eval_fraction=float("nan")), "eval_fraction must lie in [0, 1), got nan."),
    (dict(warmup_ratio=1.0), "warmup_ratio must lie in [0, 1), got 1.0."),
])
def test_eval_fraction_and_warmup_ratio_are_refused_each_by_name_with_its_value(kwargs, said):
    """"eval_fraction and warmup_ratio must lie in [0, 1)": neither the field at fault nor the value was named."""
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**kwargs)
    assert str(exc.value) == said
    TrainConfig(eval_fraction=0.0, warmup_ratio=0.5)  # negative control: in range, taken

"""PositionLimit.learned is true of a table of trained weights only: it was true of Marian's, Pegasus's, CTRL's and
RoFormer's fixed sinusoidal tables too (``positions == "learned"``). PositionLimit.table is true of both, and is what
refuses a longer length. The reference is transformers' model built from config on tiny sizes: whether its tensors of
positions are trainable parameters (learned) or a frozen embedding or buffer (fixed); both fail past their 32 rows."""

from __future__ import annotations

import pytest

from spectra.checkpoints.positions import position_limit, resolve_max_length
from spectra.errors import ConfigError
from tests.checkpoints.test_positions_fixed import _config, _model, _position_tensors, _runs


@pytest.mark.parametrize("family", ["marian", "ctrl", "roformer", "bert", "gpt2", "bart"])
def test_learned_is_true_of_trained_tables_only_and_table_of_both(family):
    model = _model(family)
    tensors = _position_tensors(model)
    trained = all(tensors.values())
    assert tensors and (trained or not any(tensors.values())), tensors  # one kind or the other, as the model has it
    assert _runs(model, 32) and not _runs(model, 40)  # both are tables: no row past the 32nd
    limit = position_limit(_config(family).to_dict())
    assert limit.learned is trained  # True for Marian's fixed sinusoid before the fix
    assert limit.table is True
    with pytest.raises(ConfigError, match="40 is more than the model can take"):
        resolve_max_length(40, _config(family).to_dict())


def test_positions_that_run_past_are_neither():
    """Negative control: rotary positions are no table, learned or fixed, and a longer length is kept."""
    limit = position_limit({"model_type": "llama", "max_position_embeddings": 32, "rope_theta": 10000.0})
    assert (limit.positions, limit.learned, limit.table) == ("rotary", False, False)
    assert resolve_max_length(40, {"model_type": "llama", "max_position_embeddings": 32, "rope_theta": 1e4}) == 40

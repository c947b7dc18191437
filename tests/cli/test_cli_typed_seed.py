"""bench make-pair draws each tensor from a generator seeded by the seed's number, so --seed 007 is --seed 7: the
CLI's int options print as typed (options.TypedInt), and make_pair hashed the seed's text."""

from __future__ import annotations

import torch

from spectra.bench.make_pair import _generator
from spectra.cli.options import _typed_int


def _draw(seed) -> torch.Tensor:
    return torch.randn(8, generator=_generator(seed, "model.norm.weight", "base"))


def test_a_seed_typed_otherwise_draws_as_its_number():
    for typed in ("7", "007", "+7", "0_7"):
        assert torch.equal(_draw(_typed_int(typed)), _draw(7)), typed
    assert not torch.equal(_draw(_typed_int("8")), _draw(7))  # negative control: another seed, another draw

"""`spectra extract` passes on the pairing's provenance note: a PEFT adapter as TUNED that records another base."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from spectra.cli import app
from tests.checkpoints.test_recorded_base import NOTE, models  # noqa: F401  (the module fixture)


def test_extract_says_the_adapter_records_another_base(models, tmp_path):  # noqa: F811
    for base, noted in ((models["mistral"], True), (models["llama"], False)):  # negative control: its own base
        out = tmp_path / base.name
        result = CliRunner().invoke(app, ["extract", str(base), str(models["dora"]), "--rank", "2", "-o", str(out)],
                                    env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        assert (NOTE in result.output) == noted, result.output
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 2

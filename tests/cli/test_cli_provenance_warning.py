"""`spectra analyze` and `show` print the pairing's provenance note as a warning (once), not as a note."""

from __future__ import annotations

from typer.testing import CliRunner

from spectra.cli import app
from tests.checkpoints.test_recorded_base import ARCHITECTURES, NOTE, models  # noqa: F401  (the module fixture)
from tests.models import build_model, save


def test_provenance_is_a_warning(models, tmp_path):  # noqa: F811
    qwen2 = save(build_model("qwen2"), tmp_path / "qwen2", "safetensors")
    for tuned, said in ((models["dora"], NOTE), (qwen2, ARCHITECTURES)):
        out = tmp_path / f"r-{tuned.name}"
        run = CliRunner().invoke(app, ["analyze", str(models["mistral"]), str(tuned), "-o", str(out), "--no-cache"],
                                 env={"COLUMNS": "1000"})
        assert run.exit_code == 0, run.output
        for output in (run.output, CliRunner().invoke(app, ["show", str(out)], env={"COLUMNS": "1000"}).output):
            assert f"warning: {'adapter' if said == NOTE else 'BASE and TUNED'}" in output, output
            assert output.count(said) == 1 and f"note: {said}" not in output
    control = CliRunner().invoke(app, ["analyze", str(models["llama"]), str(models["llama2"]), "-o",
                                       str(tmp_path / "control"), "--no-cache"], env={"COLUMNS": "1000"})
    assert control.exit_code == 0 and NOTE not in control.output and ARCHITECTURES not in control.output

"""verify's stages as modules: the per-module measures are math on tensors, and verify still exports them."""

import subprocess
import sys


def _loaded(module: str) -> set[str]:
    """The spectra, checkpoint-reading and model-library modules a fresh interpreter loads with `module`."""
    code = (f"import sys, {module}; print(' '.join(m for m in sys.modules if m.split('.')[0] in "
            "('spectra', 'transformers', 'peft', 'bitsandbytes', 'safetensors')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_measures_read_no_file_and_load_no_model_library():
    loaded = _loaded("spectra.lora.verify_measures")
    assert not {m for m in loaded if m.split(".")[0] in ("transformers", "peft", "bitsandbytes", "safetensors")}
    assert not {m for m in loaded if m.startswith("spectra.checkpoints")}
    assert "spectra.lora.verify" not in loaded  # no cycle back to the pipeline that calls it
    # negative control: the pipeline reads checkpoints, so the check above can see them
    assert "spectra.checkpoints.pairing" in _loaded("spectra.lora.verify")


def test_verify_exports_the_moved_functions_as_the_same_objects():
    import spectra.lora.verify as verify
    import spectra.lora.verify_measures as measures

    for name in ("module_measures", "measure_module", "delta_decomposition"):
        assert getattr(verify, name) is getattr(measures, name), name

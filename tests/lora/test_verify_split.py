"""verify's stages as modules: the per-module measures are math on tensors, QLoRA's W₀ loads bitsandbytes and
transformers only when asked, and verify still exports the moved names."""

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


def test_qlora_base_loads_bitsandbytes_and_transformers_only_when_asked():
    loaded = _loaded("spectra.lora.qlora_base")
    assert not {m for m in loaded if m.split(".")[0] in ("transformers", "peft", "bitsandbytes")}
    assert "spectra.lora.verify" not in loaded and "spectra.lora.train" not in loaded


def test_verify_exports_the_moved_functions_as_the_same_objects():
    import spectra.lora.qlora_base as qlora_base
    import spectra.lora.verify as verify
    import spectra.lora.verify_measures as measures

    for name in ("module_measures", "measure_module", "delta_decomposition"):
        assert getattr(verify, name) is getattr(measures, name), name
    for name in ("nf4_round_trip", "bnb_4bit_modules"):
        assert getattr(verify, name) is getattr(qlora_base, name), name

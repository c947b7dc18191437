"""The public API: every name resolves, and importing spectra loads no torch."""

import subprocess
import sys

import spectra


def test_every_public_name_resolves():
    for name in spectra.__all__:
        assert getattr(spectra, name) is not None, name


def test_import_is_light():
    code = "import sys, spectra; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

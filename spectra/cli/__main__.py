"""``python -m spectra.cli``: the ``spectra`` command, as the console script runs it."""

from spectra.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()

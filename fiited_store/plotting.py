"""Plots are optional: matplotlib comes with the ``plot`` extra (``pip install "fiited-store[plot]"``).

Every plot asks :func:`pyplot` for matplotlib, which names the extra when it is missing;
callers check :func:`available` before long work whose end is a plot.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .errors import ConfigError

INSTALL_HINT = "plots need matplotlib: pip install 'fiited-store[plot]' (or pip install matplotlib)"


class PlottingUnavailableError(ConfigError):
    """A plot was asked for and matplotlib is not installed."""


def available() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or :class:`PlottingUnavailableError`."""
    try:
        import matplotlib
    except ImportError:
        raise PlottingUnavailableError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

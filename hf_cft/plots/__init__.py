"""Plots: loss and accuracy along linear paths between solutions (MergeTune's three paths), from Python or
``python -m hf_cft.plots curves.json out.png``."""

from hf_cft.plots.paths import interpolation_curves, plot_paths

__all__ = ["interpolation_curves", "plot_paths"]

"""Plots: loss and accuracy along linear paths between solutions (MergeTune's three paths), from Python or
``python -m hf_cft.plots curves.json out.png``; accuracy-matrix heatmaps of continual runs."""

from hf_cft.plots.matrix import accuracy_matrix_figure, plot_accuracy_matrix
from hf_cft.plots.paths import interpolation_curves, plot_paths

__all__ = ["accuracy_matrix_figure", "interpolation_curves", "plot_accuracy_matrix", "plot_paths"]

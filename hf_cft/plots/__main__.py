"""python -m hf_cft.plots CURVES.json OUT.png [--title TEXT]"""

import argparse

from hf_cft.plots.paths import plot_paths

parser = argparse.ArgumentParser(prog="python -m hf_cft.plots", description="Plot loss/accuracy along linear paths.")
parser.add_argument("curves", help="JSON written by interpolation_curves (or a dict of them per split)")
parser.add_argument("out", help="PNG to write")
parser.add_argument("--title", default="")
a = parser.parse_args()
print(plot_paths(a.curves, a.out, a.title))

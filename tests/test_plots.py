import json

import pytest
import torch
import torch.nn.functional as F

from hf_cft.plots import interpolation_curves, plot_paths


def test_interpolation_curves_endpoints_and_barrier(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    a = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    b = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    c = interpolation_curves(feats, labels, {"A": a, "B": b}, [("A", "B")], scale=5.0, points=5)
    p = c["paths"]["A → B"]
    assert c["t"] == [0.0, 0.25, 0.5, 0.75, 1.0] and len(p["loss"]) == 5
    f = F.normalize(feats, dim=-1)
    torch.testing.assert_close(torch.tensor(p["loss"][0]), F.cross_entropy(5.0 * f @ a.t(), labels))
    torch.testing.assert_close(torch.tensor(p["loss"][-1]), F.cross_entropy(5.0 * f @ b.t(), labels))
    assert p["barrier"] == max(p["loss"]) - (p["loss"][0] + p["loss"][-1]) / 2
    heads = {"W1": (a * 3, torch.zeros(3)), "W2": (b * 3, torch.ones(3))}
    h = interpolation_curves(feats, labels, heads, [("W1", "W2")], points=3)
    torch.testing.assert_close(
        torch.tensor(h["paths"]["W1 → W2"]["loss"][1]), F.cross_entropy(f @ (1.5 * (a + b)).t() + 0.5, labels)
    )
    (tmp_path / "c.json").write_text(json.dumps({"base": c, "novel": c}))
    png = plot_paths(tmp_path / "c.json", tmp_path / "p.png", "t")
    assert png.stat().st_size > 1000


def test_plot_command(tmp_path):
    import subprocess
    import sys

    c = {"t": [0, 1], "paths": {"A → B": {"loss": [1.0, 2.0], "accuracy": [50.0, 40.0], "barrier": 0.5}}}
    (tmp_path / "c.json").write_text(json.dumps(c))
    out = subprocess.run(
        [sys.executable, "-m", "hf_cft.plots", str(tmp_path / "c.json"), str(tmp_path / "o.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("tasks", [2, 11])
def test_accuracy_matrix_title_is_never_cut_off(tasks):
    """A long title (strategy, protocol, order) plus the metrics line stays inside the figure, wrapped."""
    import matplotlib.pyplot as plt
    import numpy as np

    from hf_cft.plots.matrix import accuracy_matrix_figure

    values = np.tril(np.full((tasks, tasks), 55.0)) + np.triu(np.full((tasks, tasks), 20.0), 1)
    names = [f"dataset_{i}" for i in range(tasks)]
    title = "ConDU (fine-tuned experts, lora_merge=factors), Protocol B, MTIL-mini order I, seed 0 of 3, 200 steps"
    metrics = {"transfer": 61.23, "average": 70.12, "last": 80.55, "bwt": -1.25}
    fig = accuracy_matrix_figure(values, names, title, metrics)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box, page = fig.axes[0].title.get_window_extent(renderer), fig.bbox
        assert box.x0 >= page.x0 and box.x1 <= page.x1 and box.y1 <= page.y1, (box, page)
        text = fig.axes[0].get_title().replace("\u00a0", " ")
        assert "\n" in text and text.replace("\n", " ").startswith(title[:40])
        assert "Transfer 61.2" in text and "BWT -1.2" in text
    finally:
        plt.close(fig)

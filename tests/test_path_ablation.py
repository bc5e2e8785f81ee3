"""The path-term ablation (``benchmarks/path_ablation.py``) on a tiny CLIP with synthetic features: every variant is
measured, its options reach MergeTune, and the chord excess is what its docstring says."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tests_helpers import load_benchmark

from hf_cft.models import build_zeroshot_classifier
from hf_cft.testing import tiny_clip

CLASSES = ["cat", "dog", "sea lion", "owl", "fox", "eel"]
HP = {"optimizer": "adamw", "lr": 0.01, "epochs": 2, "batch_size": 16, "lam": 8.0, "beta": 0.5, "tau": 0.3}


@pytest.fixture(scope="module")
def ablation():
    return load_benchmark("path_ablation")


@pytest.fixture(scope="module")
def setup(ablation):
    from tests.conftest import ToyTokenizer

    tok, model = ToyTokenizer(), tiny_clip()
    with torch.no_grad():
        text = build_zeroshot_classifier(model, tok, CLASSES, ["a photo of a {}."]).float()
    g = torch.Generator().manual_seed(0)

    def feats(n):
        y = torch.arange(len(CLASSES)).repeat_interleave(n)
        return F.normalize(text[y] + 0.05 * torch.randn(len(y), text.shape[1], generator=g), dim=-1), y

    down_f, down_y = feats(20)
    test_f, test_y = feats(5)
    task = SimpleNamespace(name="toy", classnames=CLASSES, templates=["a photo of a {}."], num_classes=len(CLASSES))
    data = {"down_f": down_f, "down_y": down_y, "test_f": test_f, "test_y": test_y}
    variants = ["default", "beta0", "N1", "tau1", "epochs20"]
    out = ablation.run_dataset(model, tok, task, data, [1], HP, variants, log=lambda m: None)
    return SimpleNamespace(out=out, variants=variants, model=model)


def test_every_variant_is_measured(setup):
    assert set(setup.out) == {"zs_single", "coop", *setup.variants}
    for name in setup.variants:
        (r,) = setup.out[name]
        assert {"base", "novel", "hm", "excess_shots", "excess_test", "dist_ft", "dist_zs"} <= set(r)
        assert 0.0 <= r["base"] <= 100.0 and 0.0 <= r["novel"] <= 100.0 and r["dist_ft"] >= 0.0
    # different options give different solutions (each reaches the loss)
    assert len({setup.out[n][0]["dist_ft"] for n in setup.variants}) == len(setup.variants)


def test_fit_mergetune_passes_num_alphas(monkeypatch):
    import b2n

    from hf_cft.trainers import feature_training

    seen = {}

    def fake(*args, **kw):
        seen.update(kw)

    monkeypatch.setattr(feature_training, "train_mergetune_on_features", fake)
    monkeypatch.setattr(feature_training, "coop_context_init", lambda *a, **k: None)
    ctx = SimpleNamespace(set=lambda c: None, get=lambda: "ctx", peft=None)
    b2n.fit_mergetune(ctx, None, [], None, None, 1, HP, None, None, None)
    assert seen["num_alphas"] == 5 and seen["anchor_weight"] == 8.0 and seen["path_weight"] == 0.5
    b2n.fit_mergetune(ctx, None, [], None, None, 1, HP, None, None, None, num_alphas=10, path_weight=0.0)
    assert seen["num_alphas"] == 10 and seen["path_weight"] == 0.0


def test_chord_excess(ablation):
    torch.manual_seed(0)
    f = F.normalize(torch.randn(40, 8), dim=-1)
    y = torch.randint(0, 3, (40,))
    a, b = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    # by hand: the largest gap between the path's loss and the chord of its end points
    ts = [i / 10 for i in range(11)]
    losses = [float(F.cross_entropy(5.0 * f @ F.normalize((1 - t) * a + t * b, dim=-1).t(), y)) for t in ts]
    want = max(loss - ((1 - t) * losses[0] + t * losses[-1]) for t, loss in zip(ts, losses))
    assert ablation.chord_excess(f, y, a, b, 5.0) == pytest.approx(want, abs=1e-6)
    assert ablation.chord_excess(f, y, a, a, 5.0) == pytest.approx(0.0, abs=1e-6)  # a point: no path


def test_summary_and_markdown(ablation, setup):
    per = {"toy": setup.out, "toy2": setup.out}
    summary = ablation.summarise(per)
    r = setup.out["default"][0]
    assert summary["default"]["base"] == pytest.approx(r["base"]) and summary["default"]["hm_std"] == 0.0
    assert summary["default"]["excess_shots"] == pytest.approx(r["excess_shots"])
    assert "excess_shots" not in summary["coop"]
    text = "\n".join(ablation.markdown(summary, ["toy", "toy2"], HP))
    assert "| beta0 | no path term |" in text and "| coop | CoOp ŵ2 |" in text

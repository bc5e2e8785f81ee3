"""Protocol E (``benchmarks/robust.py``) end to end on a tiny CLIP with synthetic images (one seed, one or two
epochs): every family and row is measured on ID and on each shift, γ is chosen on the ID validation images, and
the rows are what they say (an identity shift is the ID set, WiSE-FT at its γ is the interpolated model, the E2E
zero-shot row is the LP one)."""

from types import SimpleNamespace

import pytest
import torch
from tests_helpers import load_benchmark

from hf_cft.testing import tiny_clip

CLASSES = ["cat", "dog", "owl", "fox"]
HP = {"optimizer": "adamw", "lr": 0.01, "epochs": 2, "batch_size": 16, "lam": 8.0, "beta": 0.5, "tau": 0.3}
E2E = {"epochs": 1, "mt_epochs": 1, "batch_size": 8}


@pytest.fixture(scope="module")
def robust():
    return load_benchmark("robust")


def _images(n_per_class: int, g: torch.Generator):
    """uint8 images [N, 3, 16, 16] whose class sets the mean colour, and their labels."""
    y = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=torch.float)
    im = colours[y][:, :, None, None] + 30 * torch.randn(len(y), 3, 16, 16, generator=g)
    return im.clamp(0, 255).to(torch.uint8), y


@pytest.fixture(scope="module")
def setup(robust):
    from hf_cft.data.image_pool import normalize_batch
    from hf_cft.models import image_features
    from tests.conftest import ToyTokenizer

    tok, model = ToyTokenizer(), tiny_clip(image_size=16, patch_size=4)
    g = torch.Generator().manual_seed(0)
    down_im, down_y = _images(10, g)
    test_im, test_y = _images(5, g)
    with torch.no_grad():
        feats = {k: image_features(model, normalize_batch(im)) for k, im in (("down", down_im), ("test", test_im))}
    data = {"down_im": down_im, "down_y": down_y, "test_im": test_im, "test_y": test_y,
            "down_f": feats["down"], "test_f": feats["test"]}  # fmt: skip
    source = SimpleNamespace(name="toy", classnames=CLASSES, templates=["a photo of a {}.", "a {}."], num_classes=4)
    gray = test_im.float().mean(1, keepdim=True).expand(-1, 3, -1, -1).to(torch.uint8).contiguous()
    with torch.no_grad():
        shifted = {"identity": (test_im.clone(), feats["test"].clone()),
                   "gray": (gray, image_features(model, normalize_batch(gray)))}  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs = []
    out = robust.run(model, tok, source, data, shifted, [1], HP, log=logs.append, e2e_hp=E2E)
    return SimpleNamespace(out=out, model=model, tok=tok, data=data, shifted=shifted, before=before, logs=logs,
                           source=source)  # fmt: skip


def test_every_family_and_row_is_measured_on_id_and_each_shift(robust, setup):
    (seed,) = setup.out["per_seed"]
    assert setup.out["seeds"] == [1] and setup.out["e2e"]["epochs"] == 1 and setup.out["e2e"]["lr"] == 1e-4
    for fam in robust.FAMILIES:
        for row in robust.ROWS:
            r = seed[fam][row]
            assert {"id", "identity", "gray"} <= set(r), (fam, row)
            assert all(0.0 <= r[k] <= 100.0 for k in ("id", "identity", "gray"))
            # an unshifted copy of the test set is the test set, through every row's own image tower and head
            assert r["identity"] == r["id"], (fam, row)
        assert seed[fam]["wise"]["gamma"] in robust.GAMMAS
        assert seed[fam]["mergetune_ensemble"]["gamma"] in robust.GAMMAS
    # the zero-shot rows of both families are the same model and head
    assert {k: seed["e2e"]["zeroshot"][k] for k in ("id", "gray")} == {
        k: seed["lp"]["zeroshot"][k] for k in ("id", "gray")
    }
    assert seed["lp"]["lr"] in robust.HEAD_LRS
    assert seed["e2e"]["distance_ft"] > 0 and seed["e2e"]["distance_mt"] > 0
    assert any("LP:" in m for m in setup.logs) and any("E2E:" in m for m in setup.logs)


def test_the_shared_model_is_not_modified(setup):
    after = setup.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in setup.before.items())


def test_interpolation_and_gamma_choice(robust, setup):
    model = tiny_clip(image_size=16, patch_size=4)
    keys = robust._vision_keys(model)
    assert keys and all(k.startswith(("vision_model.", "visual_projection.")) for k in keys)
    zs = {k: v.clone() for k, v in model.state_dict().items() if k in keys}
    other = {k: v + 1.0 for k, v in zs.items()}
    robust._interpolate(model, zs, other, 0.3)
    state = model.state_dict()
    assert all(torch.allclose(state[k], zs[k] + 0.3) for k in keys)
    robust._interpolate(model, zs, other, 0.0)
    assert all(torch.equal(model.state_dict()[k], zs[k]) for k in keys)
    # the best validation score wins; ties go to the smaller γ (nearer zero-shot)
    assert robust._best_gamma(lambda g: -abs(g - 0.7)) == 0.7
    assert robust._best_gamma(lambda g: 1.0 if g >= 0.4 else 0.0) == 0.4
    robust._set_trainable(model, keys)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(keys)


def test_summary_and_markdown(robust, setup):
    shifts = ["identity", "gray"]
    summary = robust.summarise(setup.out, shifts)
    for fam in robust.FAMILIES:
        for row in robust.ROWS:
            s = summary[fam][row]
            r = setup.out["per_seed"][0][fam][row]
            assert s["id"] == (r["id"], 0.0)
            assert s["shift_avg"][0] == pytest.approx((r["identity"] + r["gray"]) / 2)
            assert s["cost"] == (2 if (fam, row) == ("e2e", "output_ensemble") else 1)
    lines = robust.markdown(summary, shifts, HP, setup.out["e2e"])
    text = "\n".join(lines)
    assert text.count("| MergeTune + weight ensemble") == 2 and "| identity | gray |" in text
    assert "lr 0.0001" in text and "MergeTune 1 epochs" in text

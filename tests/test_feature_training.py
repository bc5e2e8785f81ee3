import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from hf_cft import CoOpConfig
from hf_cft.testing import tiny_clip
from hf_cft.trainers import fit_linear_probe, train_coop_on_features


def _blobs(n_per=20, dim=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    x = torch.cat([centers[c] + torch.randn(n_per, dim, generator=g) for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per)
    return x, y


def test_linear_probe_separates_blobs_and_picks_weight_decay():
    x, y = _blobs()
    w, b, info = fit_linear_probe(x, y, 3, weight_decays=(1e-3, 1e-1), seed=0)
    assert w.shape == (3, 16) and b.shape == (3,)
    acc = ((torch.nn.functional.normalize(x, dim=-1) @ w.t() + b).argmax(-1) == y).float().mean()
    assert acc > 0.95
    assert info["weight_decay"] in (1e-3, 1e-1) and set(info["val_accuracy"]) == {1e-3, 1e-1}


def test_coop_on_features_lowers_the_loss(toy_tokenizer):
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4).set_tokenizer(toy_tokenizer))
    x, y = _blobs(dim=16)
    before = model.base_model.model.text_model.embeddings.coop_ctx["default"].detach().clone()
    history = train_coop_on_features(model, toy_tokenizer, ["cat", "dog", "car"], x, y, epochs=15, lr=0.5, seed=0)
    after = model.base_model.model.text_model.embeddings.coop_ctx["default"].detach()
    assert len(history) == 15 and history[-1] < history[0]
    assert not torch.equal(before, after)
    assert all(p.grad is None or not p.requires_grad for n, p in model.named_parameters() if "coop" not in n)


def _mergetune_setup(tok):
    import torch.nn.functional as F

    from hf_cft.models import build_zeroshot_classifier

    names = ["cat", "dog", "car"]
    ft = get_peft_model(tiny_clip(), CoOpConfig(ctx_init="a photo of a").set_tokenizer(tok))
    with torch.no_grad():
        ctx_ft = ft.base_model.model.text_model.embeddings.coop_ctx["default"]
        ctx_ft.add_(torch.randn(ctx_ft.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
        t2 = ft.class_text_features(tok, names)
    model = get_peft_model(tiny_clip(), CoOpConfig(ctx_init="a photo of a").set_tokenizer(tok))
    with torch.no_grad(), model.disable_adapter():
        t1 = build_zeroshot_classifier(model, tok, names, ["a photo of a {}."])
    x, y = _blobs(dim=16)
    return names, ctx_ft.detach().clone(), t1, t2, model, F.normalize(x, dim=-1), y


def test_coop_context_init_interpolates_from_the_hand_crafted_prompt(toy_tokenizer):
    from hf_cft.trainers.feature_training import coop_context_init

    _, ctx_ft, _, _, model, _, _ = _mergetune_setup(toy_tokenizer)
    ctx = model.base_model.model.text_model.embeddings.coop_ctx["default"]
    e0 = ctx.detach().clone()  # ctx_init="a photo of a" starts at the prompt's token embeddings
    coop_context_init(model, toy_tokenizer, ctx_ft, "a photo of a", tau=0.3)
    torch.testing.assert_close(ctx.detach(), 0.7 * e0 + 0.3 * ctx_ft)


def test_mergetune_on_features_loss_matches_the_formula(toy_tokenizer):
    """With lr 0 the first epoch's recorded loss is the loss at the start, which must equal the §4 formula."""
    import torch.nn.functional as F

    from hf_cft.trainers.feature_training import train_mergetune_on_features

    names, _, t1, t2, model, x, y = _mergetune_setup(toy_tokenizer)
    with torch.no_grad():
        tw = model.class_text_features(toy_tokenizer, names)
    s = model.get_base_model().logit_scale.exp()
    task = F.cross_entropy(s * x @ tw.t(), y)
    anchor = 1 - F.cosine_similarity(tw, t1, dim=-1).mean()
    path = sum(
        F.cross_entropy(s * x @ F.normalize(t2 + a * (tw - t2), dim=-1).t(), y) for a in (0.1, 0.3, 0.5, 0.7, 0.9)
    )
    expected = task + 8.0 * anchor + 0.5 * path / 5
    hist = train_mergetune_on_features(model, toy_tokenizer, names, x, y, t1, t2, epochs=1, lr=0.0, batch_size=len(y))
    assert abs(hist[0]["loss"] - float(expected)) < 1e-4
    assert abs(hist[0]["anchor"] - float(anchor)) < 1e-5 and abs(hist[0]["path"] - float(path / 5)) < 1e-4
    # the Fisher form with F = 1 is the cosine form
    fisher = torch.ones_like(t1)
    hist_f = train_mergetune_on_features(
        model, toy_tokenizer, names, x, y, t1, t2, anchor="fisher", fisher=fisher, epochs=1, lr=0.0, batch_size=len(y)
    )
    assert abs(hist_f[0]["anchor"] - float(anchor)) < 1e-5


def test_mergetune_anchor_weight_pulls_toward_zero_shot(toy_tokenizer):
    import torch.nn.functional as F

    from hf_cft.trainers.feature_training import train_mergetune_on_features

    dist = {}
    for lam in (0.0, 50.0):
        names, ctx_ft, t1, t2, model, x, y = _mergetune_setup(toy_tokenizer)
        train_mergetune_on_features(
            model, toy_tokenizer, names, x, y, t1, t2, anchor_weight=lam, epochs=10, lr=0.05, optimizer="adamw"
        )
        with torch.no_grad():
            tw = model.class_text_features(toy_tokenizer, names)
        dist[lam] = float(1 - F.cosine_similarity(tw, t1, dim=-1).mean())
    assert dist[50.0] < dist[0.0]


def test_head_on_features_first_step_loss_matches_the_formula():
    """train_head_on_features with one batch and lr 0: the logged loss is CE + λ·Σ(sV−sV_zs)² + β·mean_k CE at
    V_ft + α_k(V − V_ft), computed here by hand; with lr 0 the head does not move."""
    from hf_cft.trainers import train_head_on_features

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    v0, vzs, vft = (F.normalize(torch.randn(4, 5, generator=g), dim=-1) for _ in range(3))
    fisher = torch.rand(4, 5, generator=g) + 0.5
    lam, beta, s = 3.0, 0.7, 10.0
    for anchor in ("sq_l2", "fisher"):
        v, hist = train_head_on_features(
            v0,
            x,
            y,
            s,
            weight_zs=vzs,
            weight_ft=vft,
            anchor_weight=lam,
            path_weight=beta,
            anchor=anchor,
            fisher=fisher,
            epochs=1,
            lr=0.0,
            batch_size=6,
            optimizer="sgd",
        )
        xn = F.normalize(x, dim=-1)
        task = F.cross_entropy(s * xn @ v0.t(), y)
        sq = (v0 - vzs) ** 2
        d = (sq if anchor == "sq_l2" else fisher * sq).sum() * s**2  # the head anchor on W = s·V
        alphas = [(2 * k + 1) / 10 for k in range(5)]  # the midpoint grid of N = 5
        path = sum(F.cross_entropy(s * xn @ (vft + a * (v0 - vft)).t(), y) for a in alphas) / 5
        assert hist[0]["task"] == pytest.approx(float(task), rel=1e-5)
        assert hist[0]["anchor"] == pytest.approx(float(d), rel=1e-5)
        assert hist[0]["path"] == pytest.approx(float(path), rel=1e-5)
        assert hist[0]["loss"] == pytest.approx(float(task + lam * d + beta * path), rel=1e-5)
        assert torch.equal(v, v0)


def test_head_on_features_fits_and_the_anchor_pulls_back():
    from hf_cft.trainers import train_head_on_features

    g = torch.Generator().manual_seed(1)
    centers = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    y = torch.arange(3).repeat(20)
    x = centers[y] + 0.3 * torch.randn(60, 8, generator=g)
    vzs = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    acc = lambda v: float(((x @ v.t()).argmax(-1) == y).float().mean())  # noqa: E731
    lp, _ = train_head_on_features(vzs, x, y, 10.0, epochs=30, lr=0.05, batch_size=16)
    assert acc(lp) > max(acc(vzs), 0.9)
    pulled, _ = train_head_on_features(vzs, x, y, 10.0, weight_zs=vzs, anchor_weight=10.0, epochs=30, lr=0.05)
    assert (pulled - vzs).norm() < 0.2 * (lp - vzs).norm()
    with pytest.raises(ValueError, match="weight_zs"):
        train_head_on_features(vzs, x, y, 10.0, anchor_weight=1.0)
    with pytest.raises(ValueError, match="weight_ft"):
        train_head_on_features(vzs, x, y, 10.0, path_weight=1.0)

import math

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


def _start_terms(model, tok, names, x, y, t1):
    """At the current context: the class features T, the logit scale s, CE(s·x̂·Tᵀ) and 1 − mean cos(T, T1)."""
    with torch.no_grad():
        tw = model.class_text_features(tok, names)
    s = model.get_base_model().logit_scale.exp()
    return tw, s, F.cross_entropy(s * x @ tw.t(), y), 1 - F.cosine_similarity(tw, t1, dim=-1).mean()


def test_mergetune_on_features_loss_matches_the_formula(toy_tokenizer):
    """With lr 0 the first epoch's recorded loss is the loss at the start, which must equal the §4 formula."""
    import torch.nn.functional as F

    from hf_cft.trainers.feature_training import train_mergetune_on_features

    names, _, t1, t2, model, x, y = _mergetune_setup(toy_tokenizer)
    tw, s, task, anchor = _start_terms(model, toy_tokenizer, names, x, y, t1)
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


# ------------------------------------------------------------------------------------------------ pinned rules
# Each test below fails on a small plausible change that the tests above let through (mutation testing,
# scripts/mutation.py).


def _perturbed_setup(tok):
    """The MergeTune setup with the context moved off the hand-crafted prompt, so that the anchors are not zero."""
    names, ctx_ft, t1, t2, model, x, y = _mergetune_setup(tok)
    with torch.no_grad():
        ctx = model.base_model.model.text_model.embeddings.coop_ctx["default"]
        ctx.add_(torch.randn(ctx.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    return names, ctx_ft, t1, t2, model, x, y


def test_minibatch_loop_is_sgd_with_momentum_or_adamw_under_a_cosine_schedule_with_seeded_batches():
    """The shared loop against a hand-written one: SGD (momentum 0.9) or AdamW (β = 0.9, 0.999, ε = 1e-8, no weight
    decay), learning rate lr·(1 + cos(π·t/T))/2 over T = epochs·⌈n/b⌉ steps, batches from one
    ``torch.Generator`` seeded ``seed`` (a fresh permutation per epoch, whatever the global RNG does); the history is
    each term's per-epoch mean weighted by batch size."""
    from hf_cft.trainers.feature_training import _minibatch_epochs

    epochs, lr, seed = 3, 0.1, 5

    def reference(optimizer, n, batch, targets):
        p, buf, m, v = torch.zeros(()), None, torch.zeros(()), torch.zeros(())
        g = torch.Generator().manual_seed(seed)
        steps, t, hist = epochs * math.ceil(n / batch), 0, []
        for _ in range(epochs):
            perm, total = torch.randperm(n, generator=g), 0.0
            for i in range(0, n, batch):
                idx = perm[i : i + batch]
                total += float(((p - targets[idx]) ** 2).sum()) * len(idx)
                grad = (2 * (p - targets[idx])).sum()
                rate = lr * (1 + math.cos(math.pi * t / steps)) / 2
                t += 1
                if optimizer == "sgd":
                    buf = grad if buf is None else 0.9 * buf + grad
                    p = p - rate * buf
                else:
                    m = 0.9 * m + 0.1 * grad
                    v = 0.999 * v + 0.001 * grad**2
                    p = p - rate * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
            hist.append(total / n)
        return float(p), hist

    for optimizer, n, batch in (("sgd", 10, 4), ("adamw", 10, 4), ("sgd", 3, 4)):  # n ≤ b: one step per epoch
        targets = torch.linspace(-1.0, 2.0, n)
        param = torch.zeros((), requires_grad=True)
        torch.manual_seed(123)  # the global RNG must not matter
        hist = _minibatch_epochs(
            [param],
            n,
            lambda idx, param=param, targets=targets: {"loss": ((param - targets[idx]) ** 2).sum()},
            epochs,
            lr,
            batch,
            optimizer,
            seed,
        )
        want_p, want_hist = reference(optimizer, n, batch, targets)
        assert float(param.detach()) == pytest.approx(want_p, rel=1e-5, abs=1e-6), optimizer
        assert [h["loss"] for h in hist] == pytest.approx(want_hist, rel=1e-5, abs=1e-6), optimizer
    with pytest.raises(ValueError, match=r"^optimizer must be one of \('sgd', 'adamw'\), got 'SGD'$"):
        _minibatch_epochs([torch.zeros((), requires_grad=True)], 4, None, 1, lr, 2, "SGD", seed)


def test_the_documented_defaults_of_the_feature_trainers(toy_tokenizer, monkeypatch):
    """The loop settings each trainer passes by default (CoOp and MergeTune: 50 epochs, lr 2e-3, batch 32, SGD,
    seed 0; the head: AdamW at lr 1e-2, batch 128), seen by a stand-in for the shared loop; the probe's default
    hold-out seed is 0."""
    from hf_cft.trainers import feature_training as ft

    seen = []

    def loop(params, n, step_losses, epochs, lr, batch_size, optimizer, seed):
        seen.append((epochs, lr, batch_size, optimizer, seed))
        return []

    monkeypatch.setattr(ft, "_minibatch_epochs", loop)
    names, _, t1, t2, model, x, y = _mergetune_setup(toy_tokenizer)
    ft.train_coop_on_features(model, toy_tokenizer, names, x, y)
    ft.train_mergetune_on_features(model, toy_tokenizer, names, x, y, t1, t2)
    ft.train_head_on_features(t1, x, y, 10.0)
    assert seen == [(50, 2e-3, 32, "sgd", 0), (50, 2e-3, 32, "sgd", 0), (50, 1e-2, 128, "adamw", 0)]
    monkeypatch.undo()
    px, py = _overlapping(seed=2)  # a data set where the hold-outs of seeds 0 and 1 score differently
    default = fit_linear_probe(px, py, 3, weight_decays=(1e-4, 30.0))
    zero = fit_linear_probe(px, py, 3, weight_decays=(1e-4, 30.0), seed=0)
    assert default[2] == zero[2] and torch.equal(default[0], zero[0])
    assert fit_linear_probe(px, py, 3, weight_decays=(1e-4, 30.0), seed=1)[2] != zero[2]


def test_mergetune_on_features_terms_off_the_zero_shot_point_with_a_fisher(toy_tokenizer):
    """Away from the zero-shot context the anchors are not zero: the cosine anchor 1 − mean cos(T, T1), the Fisher
    anchor Σ F⊙(T − T1)² / (2C) with a non-uniform F, and every logged term, with lr 0 and one batch."""
    from hf_cft.trainers.feature_training import train_mergetune_on_features

    names, _, t1, t2, model, x, y = _perturbed_setup(toy_tokenizer)
    tw, s, task, cos_anchor = _start_terms(model, toy_tokenizer, names, x, y, t1)
    fisher = torch.rand(t1.shape, generator=torch.Generator().manual_seed(3)) + 0.2
    fisher_anchor = (fisher * (tw - t1) ** 2).sum() / (2 * len(names))
    alphas = (1 / 6, 1 / 2, 5 / 6)  # N = 3, the midpoint grid
    path = sum(F.cross_entropy(s * x @ F.normalize(t2 + a * (tw - t2), dim=-1).t(), y) for a in alphas) / 3
    assert float(cos_anchor) > 1e-3 and abs(float(fisher_anchor) - float(cos_anchor)) > 1e-4
    for anchor, d in (("cosine", cos_anchor), ("fisher", fisher_anchor)):
        hist = train_mergetune_on_features(
            model, toy_tokenizer, names, x, y, t1, t2, anchor_weight=3.0, path_weight=0.7, num_alphas=3,
            anchor=anchor, fisher=fisher, epochs=1, lr=0.0, batch_size=len(y),
        )  # fmt: skip
        assert hist[0]["task"] == pytest.approx(float(task), rel=1e-5)
        assert hist[0]["anchor"] == pytest.approx(float(d), rel=1e-4, abs=1e-7)
        assert hist[0]["path"] == pytest.approx(float(path), rel=1e-5)
        assert hist[0]["loss"] == pytest.approx(float(task + 3.0 * d + 0.7 * path), rel=1e-5)
    five = sum(
        F.cross_entropy(s * x @ F.normalize(t2 + a * (tw - t2), dim=-1).t(), y) for a in (0.1, 0.3, 0.5, 0.7, 0.9)
    )
    hist = train_mergetune_on_features(model, toy_tokenizer, names, x, y, t1, t2, epochs=1, lr=0.0, batch_size=len(y))
    assert hist[0]["loss"] == pytest.approx(float(task + 8.0 * cos_anchor + 0.5 * five / 5), rel=1e-5)  # defaults
    with pytest.raises(ValueError, match=r"^anchor='fisher' needs the fisher tensor$"):
        train_mergetune_on_features(model, toy_tokenizer, names, x, y, t1, t2, anchor="fisher", epochs=1)
    with pytest.raises(ValueError, match=r"^anchor must be 'cosine' or 'fisher', got 'sq_l2'$"):
        train_mergetune_on_features(model, toy_tokenizer, names, x, y, t1, t2, anchor="sq_l2", epochs=1)


def test_coop_and_kgcoop_on_features_first_loss_is_the_formula(toy_tokenizer):
    """CoOp on features logs CE(s·x̂·Tᵀ) (x̂ the row-normalised features, whatever their scale); KgCoOp adds
    λ·(1 − mean cos(T, kg_text)); kg_weight without kg_text is refused by name."""
    names, _, t1, _, model, x, y = _perturbed_setup(toy_tokenizer)
    raw = x * torch.linspace(0.5, 3.0, len(y)).unsqueeze(1)  # rows of different norms: only their direction counts
    with torch.no_grad():
        tw = model.class_text_features(toy_tokenizer, names)
    s = model.get_base_model().logit_scale.exp()
    task = F.cross_entropy(s * x @ tw.t(), y)
    kg = 1 - F.cosine_similarity(tw, t1, dim=-1).mean()
    assert float(kg) > 1e-3
    plain = train_coop_on_features(model, toy_tokenizer, names, raw, y, epochs=1, lr=0.0, batch_size=len(y))
    assert plain[0] == pytest.approx(float(task), rel=1e-5)
    both = train_coop_on_features(
        model, toy_tokenizer, names, raw, y, epochs=1, lr=0.0, batch_size=len(y), kg_weight=4.0, kg_text=t1
    )
    assert both[0] == pytest.approx(float(task + 4.0 * kg), rel=1e-5)
    message = r"^kg_weight > 0 \(KgCoOp\) needs kg_text, the hand-crafted zero-shot class features$"
    with pytest.raises(ValueError, match=message):
        train_coop_on_features(model, toy_tokenizer, names, raw, y, epochs=1, kg_weight=1.0)


def test_head_on_features_refuses_bad_anchors_by_name():
    from hf_cft.trainers import train_head_on_features

    v = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    cases = [
        ({"anchor": "l2"}, r"^anchor must be 'sq_l2' or 'fisher', got 'l2'$"),
        ({"anchor_weight": 1.0}, r"^anchor_weight > 0 needs weight_zs$"),
        ({"path_weight": 1.0}, r"^path_weight > 0 needs weight_ft$"),
        ({"anchor": "fisher", "anchor_weight": 1.0, "weight_zs": v}, r"^anchor='fisher' needs the fisher tensor$"),
        ({"optimizer": "Adam"}, r"^optimizer must be one of \('sgd', 'adamw'\), got 'Adam'$"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            train_head_on_features(v, x, y, 10.0, epochs=1, **kwargs)


def _overlapping(n_per=(40, 10, 25), dim=6, seed=0, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(len(n_per), dim, generator=g)
    x = torch.cat([centers[c] + spread * torch.randn(k, dim, generator=g) for c, k in enumerate(n_per)])
    y = torch.cat([torch.full((k,), c) for c, k in enumerate(n_per)])
    return x, y


def test_linear_probe_minimises_its_objective_in_w_and_b():
    """The probe (W, b) is the minimiser of CE(x̂·Wᵀ + b) + wd·‖W‖²/s² (s = 10, the logit scale of the fitted
    w = W/s, x̂ the row-normalised features): the gradient there is ~0 in W and in b (b ≠ 0 for unbalanced classes);
    scaling a feature row leaves (W, b) unchanged."""
    x, y = _overlapping()
    wd = 1e-2
    w, b, info = fit_linear_probe(x, y, 3, weight_decays=(wd,), seed=0)
    assert info == {"weight_decay": wd, "val_accuracy": {}}  # one candidate: no selection run
    W, B = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    xn = F.normalize(x, dim=-1)
    objective = F.cross_entropy(xn @ W.t() + B, y) + wd * (W**2).sum() / 100.0
    objective.backward()
    assert W.grad.abs().max() < 1e-4 and B.grad.abs().max() < 1e-4
    assert B.abs().max() > 0.05
    w2, b2, _ = fit_linear_probe(x * torch.linspace(0.2, 5.0, len(y)).unsqueeze(1), y, 3, weight_decays=(wd,))
    torch.testing.assert_close(w2, w, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b2, b, rtol=1e-3, atol=1e-3)


def test_linear_probe_selects_weight_decay_by_validation_accuracy_then_the_larger_on_ties():
    """Each candidate is scored by its accuracy (%) on the seeded per-class hold-out, fitted on the rest; the best
    score wins, the larger weight decay on a tie; without a hold-out the first candidate is used unscored."""
    from hf_cft.data.sampling import split_per_class_indices

    x, y = _overlapping(seed=1)
    wds = (1e-4, 30.0)
    w, b, info = fit_linear_probe(x, y, 3, weight_decays=wds, seed=4)
    val, train = split_per_class_indices(y.numpy(), 0.2, 4)
    xn = F.normalize(x, dim=-1)
    for wd in wds:
        wt, bt, _ = fit_linear_probe(x[train], y[train], 3, weight_decays=(wd,))
        acc = float(((xn[val] @ wt.t() + bt).argmax(-1) == y[val]).float().mean() * 100)
        assert info["val_accuracy"][wd] == pytest.approx(acc)
    assert info["val_accuracy"][1e-4] > info["val_accuracy"][30.0]  # heavy decay underfits
    assert info["weight_decay"] == 1e-4
    again = fit_linear_probe(x, y, 3, weight_decays=wds, seed=4)
    assert again[2] == info and torch.equal(again[0], w)  # the hold-out is the seeded one
    bx, by = _blobs()
    _, _, tied = fit_linear_probe(bx, by, 3, weight_decays=(1e-3, 1e-2), seed=0)
    assert tied["val_accuracy"] == {1e-3: 100.0, 1e-2: 100.0} and tied["weight_decay"] == 1e-2
    _, _, none = fit_linear_probe(x, y, 3, weight_decays=(1e-2, 1e-3), val_fraction=0.0)
    assert none == {"weight_decay": 1e-2, "val_accuracy": {}}

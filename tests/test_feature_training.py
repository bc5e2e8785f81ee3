import torch
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

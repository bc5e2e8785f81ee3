"""Hand-computed cases that tell each core rule from its nearest wrong variant.

Each test here was written against a bug planted in the core that the rest of the suite did not catch (issue 20):
the comment above it names the planted bug it kills.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

import hf_cft  # noqa: F401  (registers the method types)
from hf_cft import CoOpConfig
from hf_cft.merging.baselines import emr
from hf_cft.merging.condu import decouple, unify
from hf_cft.models import text_features, tokenize_prompts
from hf_cft.peft.coop import CoOpLayer
from hf_cft.testing import tiny_clip
from hf_cft.trainers.mergetune_losses import path_loss_head, path_loss_prompts
from hf_cft.utils import atomic_path, atomic_write_bytes

# ----------------------------------------------------------------------------------- unify: u over agreeing tasks


def _three_task_case():
    """σ = sign(3 − 2 − 2) = −1: task 0 disagrees with the elected sign, so u must come from tasks 1 and 2 only."""
    return [{"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([-2.0, 4.0])}, {"w": torch.tensor([-2.0, -1.0])}]


# planted bug: u = σ·max over *all* |δⁱ| (not only the tasks that agree with σ) -> u[0] = −3, λ = 2/3 for task 1
def test_condu_unify_takes_u_from_the_agreeing_tasks_only():
    res = unify(_three_task_case())
    # entry 0: σ = −1, agreeing tasks 1 and 2 (|δ| = 2, 2) -> u = −2; entry 1: σ = +1 (1 + 4 − 1), agreeing 0, 1 -> u = 4
    assert res.unified["w"].tolist() == [-2.0, 4.0]
    assert [m["w"].tolist() for m in res.masks] == [[False, True], [True, True], [True, False]]
    # λ^i = mean|δ^i| / mean|M^i ⊙ u|: task 0: 4/4, task 1: 6/6, task 2: 3/2
    assert res.lambdas == pytest.approx([1.0, 1.0, 1.5], abs=1e-12)
    assert decouple(res, 2)["w"].tolist() == [-3.0, 0.0]


def test_condu_unify_with_one_task_against_two_is_not_scaled_by_the_loser():
    res = unify([{"w": torch.tensor([3.0])}, {"w": torch.tensor([-2.0])}, {"w": torch.tensor([-2.0])}])
    assert res.unified["w"].tolist() == [-2.0]
    assert res.lambdas == pytest.approx([0.0, 1.0, 1.0], abs=1e-12)
    assert res.collapsed == [True, False, False]


# planted bug (the same in EMR): ε over all tasks instead of the agreeing ones
def test_emr_epsilon_is_the_largest_agreeing_magnitude():
    res = emr(_three_task_case())
    assert res.unified["w"].tolist() == [-2.0, 4.0]
    # global sums: task 0: Σ|δ| = 4, Σ|M⊙u| = 4; task 1: 6 / 6; task 2: 3 / 2
    assert res.rescalers == pytest.approx([1.0, 1.0, 1.5], abs=1e-12)
    assert res.task_delta(0)["w"].tolist() == [0.0, 4.0]


# ----------------------------------------------------------------------------------- MergeTune path: orientation


def _path_inputs():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text_w = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    text_ft = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    return image, text_w, text_ft, labels, torch.tensor(20.0)


# planted bug: the path's endpoints swapped (α ↔ 1 − α); every earlier reference used a symmetric α set
@pytest.mark.parametrize("alphas", [[0.1], [0.2, 0.3], [0.9]])
def test_path_loss_prompts_runs_from_the_finetuned_end(alphas):
    image, text_w, text_ft, labels, scale = _path_inputs()
    want = torch.stack(
        [
            F.cross_entropy(scale * image @ F.normalize((1 - a) * text_ft + a * text_w, dim=-1).t(), labels)
            for a in alphas
        ]
    ).mean()
    got = path_loss_prompts(image, text_w, text_ft, labels, scale, torch.tensor(alphas, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    swapped = path_loss_prompts(image, text_ft, text_w, labels, scale, torch.tensor(alphas, dtype=torch.float64))
    assert abs(float(swapped) - float(want)) > 1e-3  # the case does tell the orientations apart


def test_path_loss_head_runs_from_the_finetuned_end():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(5, 4, generator=g)
    w, w_ft = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    b, b_ft = torch.randn(3, generator=g), torch.randn(3, generator=g)
    labels = torch.tensor([0, 1, 2, 1, 0])
    a = 0.2
    want = F.cross_entropy(image @ (w_ft + a * (w - w_ft)).t() + b_ft + a * (b - b_ft), labels)
    got = path_loss_head(image, w, b, w_ft, b_ft, labels, [a])
    torch.testing.assert_close(got, want)
    assert abs(float(path_loss_head(image, w_ft, b_ft, w, b, labels, [a])) - float(want)) > 1e-3


# ----------------------------------------------------------------------------------- CoOp: context scope and order

CLASSES = ["cat", "dog", "sea lion"]


def _plain_features(model, tok, prompts_shape):
    """Features of ordinary prompts (the bare class names, shorter than the CoOp prompts) padded to the CoOp
    prompts' shape, so a stale context mask of that shape would apply to them."""
    enc = tokenize_prompts(tok, CLASSES, model)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pad = prompts_shape[1] - ids.shape[1]
    assert pad > 0
    pad_id = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else int(ids[0, -1])
    ids = F.pad(ids, (0, pad), value=pad_id)
    mask = F.pad(mask, (0, pad), value=0)
    assert tuple(ids.shape) == prompts_shape
    with torch.no_grad():
        return text_features(model, ids, mask)


# planted bug: prompt_context does not restore the previous (empty) mask on exit
def test_coop_context_mask_does_not_outlive_its_block(toy_tokenizer):
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=4, classnames=CLASSES).set_tokenizer(toy_tokenizer))
    layer = next(m for m in model.modules() if isinstance(m, CoOpLayer))
    with torch.no_grad():
        layer.coop_ctx["default"].add_(torch.randn(layer.coop_ctx["default"].shape) * 2.0)
    shape = tuple(model.build_prompts(toy_tokenizer, CLASSES)["input_ids"].shape)
    before = _plain_features(model, toy_tokenizer, shape)
    model.class_text_features(toy_tokenizer)
    after = _plain_features(model, toy_tokenizer, shape)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with model.disable_adapter():
        base = _plain_features(model, toy_tokenizer, shape)
    torch.testing.assert_close(after, base, rtol=0, atol=1e-6)


# planted bug: class-specific contexts assigned in reversed order (the older test perturbed the middle class only)
@pytest.mark.parametrize("which", [0, 2])
def test_coop_class_specific_context_row_belongs_to_its_class(toy_tokenizer, which):
    cfg = CoOpConfig(n_ctx=3, class_specific=True, classnames=CLASSES).set_tokenizer(toy_tokenizer)
    model = get_peft_model(tiny_clip(), cfg)
    layer = next(m for m in model.modules() if isinstance(m, CoOpLayer))
    before = model.class_text_features(toy_tokenizer).detach()
    with torch.no_grad():
        layer.coop_ctx["default"][which].add_(1.0)
    after = model.class_text_features(toy_tokenizer).detach()
    changed = ((after - before).abs().sum(1) > 1e-6).tolist()
    assert changed == [i == which for i in range(3)]


# ----------------------------------------------------------------------------------- atomic writes, not mocked


class _Boom(RuntimeError):
    pass


# planted bugs: no temp-file cleanup on error; writing in place instead of temp + os.replace
def test_atomic_path_keeps_the_old_file_and_leaves_no_temp_on_error(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(_Boom), atomic_path(target) as tmp:
        Path(tmp).write_bytes(b"half-written")
        assert target.read_bytes() == b"old"  # the writer never touches the target before it commits
        raise _Boom
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_atomic_path_commits_by_rename(tmp_path):
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    old_inode = os.stat(target).st_ino
    with atomic_path(target) as tmp:
        assert Path(tmp).parent == tmp_path and Path(tmp) != target
        Path(tmp).write_bytes(b"new")
        tmp_inode = os.stat(tmp).st_ino
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new"
    assert os.stat(target).st_ino == tmp_inode != old_inode  # the temp file itself became the target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_bytes_interrupted_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_bytes(b"old")
    real_fsync = os.fsync

    def interrupted(fd):  # the process is interrupted after the data was written, before the commit
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# ----------------------------------------------------------------------------------- MergeTune loss terms (mutmut survivors)


def test_fisher_anchor_divides_by_its_normalizer():
    from hf_cft.trainers.mergetune_losses import fisher_anchor

    p, a, f = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.5])
    # Σ F (w − ŵ1)² = 2·1 + 0.5·4 = 4, over normalizer 4 -> 1
    assert float(fisher_anchor([p], [a], [f], normalizer=4.0)) == pytest.approx(1.0)


@pytest.mark.parametrize("scaling", [0.5, 3.0])
def test_lora_sq_norm_is_the_dense_update_norm(scaling):
    from hf_cft.trainers.mergetune_losses import lora_delta, lora_sq_norm

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g)
    want = (lora_delta(a, b, scaling) ** 2).sum()
    torch.testing.assert_close(lora_sq_norm(a, b, scaling), want, rtol=1e-5, atol=1e-6)


def test_normalize_fisher_rescales_to_mean_one_and_refuses_degenerate_estimates():
    from hf_cft.trainers.mergetune_losses import normalize_fisher

    out = normalize_fisher([torch.tensor([1.0, 3.0]), torch.tensor([4.0, 0.0])], damping=0.25)
    assert [t.tolist() for t in out] == [[0.75, 1.75], [2.25, 0.25]]  # mean 2 -> F/2 + 0.25
    for bad in ([torch.zeros(3)], [torch.tensor([1.0, float("nan")])], [torch.tensor([1.0, float("inf")])]):
        with pytest.raises(
            ValueError, match=r"^the estimated Fisher is zero or not finite \(degenerate zero-shot predictions\?\)$"
        ):
            normalize_fisher(bad, damping=0.0)


def test_head_anchor_default_kind_and_errors():
    from hf_cft.trainers.mergetune_losses import head_anchor

    w, w0 = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert float(head_anchor([w], [w0])) == pytest.approx(5.0)  # sq_l2 by default
    assert float(head_anchor([w], [w0], "fisher", [torch.tensor([[2.0, 0.5]])])) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="^the Fisher head anchor needs the Fisher tensors$"):
        head_anchor([w], [w0], "fisher")
    with pytest.raises(ValueError, match=r"^unknown head anchor 'l1' \(sq_l2 or fisher\)$"):
        head_anchor([w], [w0], "l1")


def test_path_loss_head_applies_label_smoothing():
    g = torch.Generator().manual_seed(2)
    image, w, w_ft = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 1, 0])
    wa = w_ft + 0.5 * (w - w_ft)
    want = F.cross_entropy(image @ wa.t(), labels, label_smoothing=0.2)
    got = path_loss_head(image, w, None, w_ft, None, labels, [0.5], 0.2)
    torch.testing.assert_close(got, want)
    assert abs(float(got) - float(path_loss_head(image, w, None, w_ft, None, labels, [0.5]))) > 1e-4


def test_alpha_grid_errors_and_dtypes():
    from hf_cft.trainers.mergetune_losses import alpha_grid

    with pytest.raises(ValueError, match="^num must be >= 1, got 0$"):
        alpha_grid(0)
    with pytest.raises(ValueError, match="^unknown alpha grid 'uniform'$"):
        alpha_grid(3, "uniform")
    for kind in ("midpoint", "official", "random"):
        assert alpha_grid(4, kind, torch.Generator().manual_seed(0)).dtype == torch.float64


# ----------------------------------------------------------------------------------- metrics and masks (mutmut survivors)


def test_per_class_accuracy_from_logits_and_empty_classes():
    import warnings

    from hf_cft.metrics.classification import per_class_accuracy

    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.2, 0.1], [0.0, 0.0, 1.0]])
    labels = torch.tensor([1, 0, 0, 1])  # predictions 1, 0, 1, 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a class without examples is NaN by rule, not by a mean over nothing
        out = per_class_accuracy(logits, labels, num_classes=4)
    assert out[:2] == [50.0, 50.0] and all(v != v for v in out[2:])


def test_harmonic_mean_edges():
    from hf_cft.metrics.classification import base_novel_summary, harmonic_mean

    assert harmonic_mean(50.0, 50.0) == 50.0
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(80.0, 40.0) == pytest.approx(2 * 80 * 40 / 120)
    for base, novel in ((-1.0, 50.0), (50.0, -1.0)):
        with pytest.raises(ValueError, match=rf"^accuracies must be non-negative, got base={base}, novel={novel}$"):
            harmonic_mean(base, novel)
    assert base_novel_summary(80.0, 40.0)["hm"] == pytest.approx(160 / 3)
    assert base_novel_summary([70.0, 90.0], [30.0, 50.0]) == pytest.approx(
        {"base": 80.0, "novel": 40.0, "hm": 160 / 3}
    )


def test_packed_masks_are_equal_only_with_equal_bits_and_shape():
    from hf_cft.merging.masks import pack_mask

    a = pack_mask(torch.tensor([True, False, True, False]))
    assert a == pack_mask(torch.tensor([True, False, True, False]))
    assert a != pack_mask(torch.tensor([True, True, True, False]))  # same shape, other bits
    assert a != pack_mask(torch.tensor([[True, False], [True, False]]))  # same bits, other shape
    assert a != "not a mask"
    assert a.count() == 2


# ----------------------------------------------------------------------------------- utils (mutmut survivors)


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_exchange_swaps_two_folders_atomically(tmp_path):
    from hf_cft.utils import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "which").write_text("a")
    (b / "which").write_text("b")
    assert _exchange(a, b) is True
    assert (a / "which").read_text() == "b" and (b / "which").read_text() == "a"


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_exchange_raises_the_systems_error_with_its_errno(tmp_path):
    """A failure other than "this file system cannot exchange" is raised with the errno the call set (read
    through ctypes' saved errno): a missing path is FileNotFoundError naming it."""
    import ctypes

    from hf_cft.utils import _exchange

    (tmp_path / "b").mkdir()
    ctypes.set_errno(0)  # ctypes' saved errno, which only a call made with use_errno=True refreshes
    with pytest.raises(FileNotFoundError) as err:
        _exchange(tmp_path / "missing", tmp_path / "b")
    assert err.value.errno == 2 and err.value.filename == str(tmp_path / "b")


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_exchange_resolves_relative_paths_from_the_working_directory(tmp_path, monkeypatch):
    from hf_cft.utils import _exchange

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "which").write_text(name)
    monkeypatch.chdir(tmp_path)  # relative names: the directory fds (AT_FDCWD) decide where they are looked up
    assert _exchange(Path("a"), Path("b")) is True
    assert (tmp_path / "a" / "which").read_text() == "b"


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_exchange_with_a_missing_path_raises_enoent_naming_it(tmp_path):
    import errno

    from hf_cft.utils import _exchange

    (tmp_path / "a").mkdir()
    missing = tmp_path / "missing"
    with pytest.raises(OSError) as info:
        _exchange(tmp_path / "a", missing)
    assert info.value.errno == errno.ENOENT
    assert info.value.strerror == os.strerror(errno.ENOENT)
    assert info.value.filename == str(missing)


def test_stale_staging_lists_only_this_outputs_leftovers(tmp_path):
    from hf_cft.utils import _OLD_TAG, _STAGING_TAG, stale_staging

    out = tmp_path / "merged"
    out.mkdir()
    mine = [tmp_path / f".merged{_STAGING_TAG}1", tmp_path / f".merged{_OLD_TAG}2"]
    for p in [*mine, tmp_path / f".other{_STAGING_TAG}3", tmp_path / "merged-2"]:
        p.mkdir()
    assert sorted(p.name for p in stale_staging(out)) == sorted(p.name for p in mine)
    assert stale_staging(tmp_path / "no-such-parent" / "x") == []


def test_fsync_tree_reads_every_regular_file_and_skips_symlinks(tmp_path, monkeypatch):
    from hf_cft import utils

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"1")
    (tmp_path / "sub" / "b.bin").write_bytes(b"2")
    (tmp_path / "link").symlink_to(tmp_path / "a.bin")
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    utils._fsync_tree(tmp_path)
    if os.path.exists("/proc/self/fd"):
        assert sorted(Path(p).name for p in synced) == ["a.bin", "b.bin"]
    else:
        assert len(synced) == 2


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"^manifest: '{path}' does not exist\.$"),
        ("{not json", r"^manifest: '{path}' is not valid JSON \(.+\)\.$"),
        ("[1, 2]", r"^manifest: '{path}' must hold a JSON object, got list\.$"),
    ],
)
def test_read_json_object_errors_name_the_file(tmp_path, content, message):
    import re

    from hf_cft.errors import BundleError
    from hf_cft.utils import read_json_object

    path = tmp_path / "m.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(BundleError, match=message.format(path=re.escape(str(path)))):
        read_json_object(path, BundleError, "manifest")


def test_read_json_object_reads_utf8(tmp_path):
    from hf_cft.errors import BundleError
    from hf_cft.utils import read_json_object

    path = tmp_path / "m.json"
    path.write_bytes('{"name": "café ☕"}'.encode())
    assert read_json_object(path, BundleError, "manifest") == {"name": "café ☕"}


def test_base_novel_hm_alias_warns_at_the_callers_line_and_returns_the_summary():
    import warnings

    from hf_cft.metrics.classification import base_novel_hm

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = base_novel_hm(80.0, 40.0)
    assert out == pytest.approx({"base": 80.0, "novel": 40.0, "hm": 160 / 3})
    (w,) = caught
    # the user's line, not ours (hf_cft.utils.user_stacklevel skips every hf_cft frame, mutmut's trampolines too)
    assert w.category is FutureWarning and w.filename == __file__
    assert str(w.message) == (
        "hf_cft.metrics.base_novel_hm is renamed base_novel_summary (it returns a dict); use harmonic_mean(base, "
        "novel) for the number. The old name goes in the next release."
    )


def test_user_stacklevel_steps_over_decorators_around_the_outermost_library_call():
    """A warning raised deep in hf_cft is attributed to the user's line, also when the hf_cft function the user
    called is wrapped by ``torch.no_grad()``, ``torch.inference_mode()`` or a ``contextlib.ContextDecorator`` (their
    frames lie between the user and hf_cft)."""
    import contextlib
    import inspect
    import os
    import warnings

    # two frames whose code lives in hf_cft's folder stand in for the library's entry point and the inner function
    # that warns
    source = (
        "import warnings\n"
        "from hf_cft.utils import user_stacklevel\n\n\n"
        "def library_entry():\n    return _inner()\n\n\n"
        "def _inner():\n    warnings.warn('deep', UserWarning, stacklevel=user_stacklevel())\n"
    )
    simulated = {}
    exec(compile(source, os.path.join(os.path.dirname(hf_cft.__file__), "_simulated.py"), "exec"), simulated)

    class Quiet(contextlib.ContextDecorator):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    for wrap in (lambda f: f, torch.no_grad(), torch.inference_mode(), Quiet()):
        entry = wrap(simulated["library_entry"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1
            entry()  # the user's line
        assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)], wrap


def test_library_warnings_point_at_the_users_call():
    """Warnings from few-shot sampling (through few_shot or few_shot_indices directly), class-name validation and a collapsed ConDU
    trigger are attributed to the user's line, however deep in hf_cft they are raised."""
    import inspect
    import warnings

    import datasets
    import numpy as np

    from hf_cft.data.sampling import few_shot, few_shot_indices
    from hf_cft.data.templates import validate_classnames
    from hf_cft.merging.condu import DeltaFusionMerger

    ds = datasets.Dataset.from_dict(
        {"x": [0, 1, 2], "label": [0, 0, 1]},
        features=datasets.Features({"x": datasets.Value("int64"), "label": datasets.ClassLabel(names=["cat", "dog"])}),
    )
    merger = DeltaFusionMerger()
    calls = [
        lambda: few_shot(ds, 2, on_short="take_all"),
        lambda: few_shot_indices(np.array([0, 0, 1]), 2, on_short="take_all"),  # one hf_cft frame less
        lambda: validate_classnames(["cat", "cat"], duplicates="warn"),
        lambda: merger.add_task({"w": torch.zeros(2, 2)}, "empty"),
    ]
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1
            call()
        assert caught and all(w.filename == __file__ for w in caught), [(w.filename, str(w.message)) for w in caught]
        assert {w.lineno for w in caught} <= {line, call.__code__.co_firstlineno}, caught
    assert np.unique(few_shot(ds, 1)["label"]).tolist() == [0, 1]


def test_cache_dir_stale_temps_and_atomic_save_pretrained(tmp_path, monkeypatch):
    """hf_cft_cache_dir: $HF_CFT_CACHE (user-expanded) else ~/.cache/hf_cft, parts joined below; remove_stale_temps
    removes exactly the ``.<name>.*.tmp`` files beside ``path`` (not other files, folders or symlinks) and returns
    them; save_pretrained_atomic writes the artefact's files, keeps the old folder's Markdown card over a generated
    one, drops the old folder's other files, and leaves the old folder untouched when the save fails."""
    from hf_cft.utils import hf_cft_cache_dir, remove_stale_temps, save_pretrained_atomic

    monkeypatch.setenv("HF_CFT_CACHE", str(tmp_path / "cache"))
    assert hf_cft_cache_dir() == tmp_path / "cache" and hf_cft_cache_dir("a", "b") == tmp_path / "cache" / "a" / "b"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_CFT_CACHE", "~/elsewhere")
    assert hf_cft_cache_dir("x") == tmp_path / "home" / "elsewhere" / "x"
    monkeypatch.setenv("HF_CFT_CACHE", "")  # empty means unset
    assert hf_cft_cache_dir("decoded") == tmp_path / "home" / ".cache" / "hf_cft" / "decoded"
    monkeypatch.delenv("HF_CFT_CACHE")
    assert hf_cft_cache_dir() == tmp_path / "home" / ".cache" / "hf_cft"

    out = tmp_path / "out"
    out.mkdir()
    target = out / "model.safetensors"
    stale = [out / ".model.safetensors.abc.tmp", out / ".model.safetensors.x1.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    keep = [out / ".other.safetensors.abc.tmp", out / "model.safetensors.abc.tmp", out / ".model.safetensors.abc"]
    for p in keep:
        p.write_bytes(b"keep")
    (out / ".model.safetensors.dir.tmp").mkdir()
    (out / ".model.safetensors.link.tmp").symlink_to(keep[0])
    assert sorted(remove_stale_temps(target)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert (out / ".model.safetensors.dir.tmp").is_dir() and (out / ".model.safetensors.link.tmp").is_symlink()
    assert remove_stale_temps(tmp_path / "missing" / "model.safetensors") == []

    class Artefact:
        def __init__(self, files, fail=False):
            self.files, self.fail = files, fail

        def save_pretrained(self, folder, **kwargs):
            for name, text in self.files.items():
                (Path(folder) / name).write_text(text + kwargs.get("suffix", ""))
            if self.fail:
                raise OSError("disk full")

    folder = tmp_path / "saved"
    assert save_pretrained_atomic(Artefact({"config.json": "{}", "README.md": "generated"}), folder) == folder
    assert (folder / "README.md").read_text() == "generated"
    (folder / "README.md").write_text("my card")
    (folder / "notes.txt").write_text("old")
    save_pretrained_atomic(Artefact({"config.json": "{1}", "README.md": "generated"}), folder, suffix="!")
    assert {p.name for p in folder.iterdir()} == {"config.json", "README.md"}
    assert (folder / "config.json").read_text() == "{1}!" and (folder / "README.md").read_text() == "my card"
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(Artefact({"config.json": "{2}"}, fail=True), folder)
    assert (folder / "config.json").read_text() == "{1}!" and {p.name for p in folder.iterdir()} == {
        "config.json",
        "README.md",
    }
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".saved")] == []  # no staging leftovers


_SIMULATED_SOURCE = (
    "import warnings\nfrom hf_cft.utils import user_stacklevel\n"
    "def library_entry():\n    return _inner()\n"
    "def _inner():\n    warnings.warn('deep', UserWarning, stacklevel=user_stacklevel())\n"
)


def _simulated_library() -> dict:
    """A library entry point whose inner function warns with ``user_stacklevel()``, compiled as a file inside the
    hf_cft package (so its frames count as the library's)."""
    ns = {}
    exec(compile(_SIMULATED_SOURCE, os.path.join(os.path.dirname(hf_cft.__file__), "_simulated.py"), "exec"), ns)
    return ns


def _script_warning(script, entry: str) -> tuple[list[str], list[str]]:
    """Run ``script``, a file that builds the simulated library and calls ``entry`` (an expression over its namespace
    ``ns``) at its top level, in a fresh interpreter: (the warning's file and line it prints, the script and the line
    of that call)."""
    import subprocess
    import sys

    lines = [
        "import os",
        "import warnings",
        "import torch",
        "import hf_cft",
        f"source = {_SIMULATED_SOURCE!r}",
        "ns = {}",
        "exec(compile(source, os.path.join(os.path.dirname(hf_cft.__file__), '_simulated.py'), 'exec'), ns)",
        f"entry = {entry}",
        "warnings.simplefilter('always')",
        "with warnings.catch_warnings(record=True) as caught:",
        "    entry()",
        "print(caught[0].filename, caught[0].lineno)",
    ]
    script.write_text("\n".join(lines) + "\n")
    root = os.path.dirname(os.path.dirname(hf_cft.__file__))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split(), [str(script), str(lines.index("    entry()") + 1)]


def _warned_line(entry) -> tuple[str, int]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entry()
    return caught[0].filename, caught[0].lineno


def test_user_stacklevel_from_a_scripts_top_level_through_a_decorator(tmp_path):
    """A script that calls a ``torch.no_grad()``-decorated hf_cft entry point at its top level (the decorator's frame
    is then the second-to-last frame of the stack) gets the warning at its own line."""
    # in this process first (a call from a test function, the decorator's frame in torch): the warning is the line in
    # _warned_line that calls the entry point (this also tells mutmut that the test covers user_stacklevel)
    entry = torch.no_grad()(_simulated_library()["library_entry"])
    assert _warned_line(entry) == (__file__, _warned_line.__code__.co_firstlineno + 5)
    got, want = _script_warning(tmp_path / "script.py", "torch.no_grad()(ns['library_entry'])")
    assert got == want


def test_user_stacklevel_steps_over_installed_packages_that_call_the_library():
    """A warning raised in hf_cft code that an installed package calls (transformers' Trainer running an hf_cft
    callback) belongs to the user's line that called that package."""
    for packages in ("site-packages", "dist-packages"):  # pip's folder, and Debian's for system packages
        _warning_through_an_installed_package(packages)


def _warning_through_an_installed_package(packages):
    import inspect
    import warnings

    site = os.path.join(os.sep, "opt", "venv", "lib", "python3", packages, "trainerlib", "loop.py")
    simulated, runner = {}, {}
    exec(
        compile(
            "import warnings\nfrom hf_cft.utils import user_stacklevel\n\n\n"
            "def callback():\n    warnings.warn('deep', UserWarning, stacklevel=user_stacklevel())\n",
            os.path.join(os.path.dirname(hf_cft.__file__), "_simulated.py"),
            "exec",
        ),
        simulated,
    )
    exec(
        compile(
            "def train(callback):\n    return _step(callback)\n\n\ndef _step(callback):\n    callback()\n",
            site,
            "exec",
        ),
        runner,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        runner["train"](simulated["callback"])  # the user's line
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


def test_release_freed_memory_loads_libc_once_and_trims_only_where_it_can(monkeypatch):
    """On Linux the C library (ctypes.util.find_library("c"), else "libc.so.6") is loaded once and malloc_trim(0) is
    called on every release; a libc without malloc_trim, a libc that cannot be loaded, or another platform make it a
    no-op that does not retry the load."""
    import ctypes
    import ctypes.util
    import sys

    import hf_cft.utils as utils

    loads, trims = [], []

    class Libc:
        def malloc_trim(self, pad):
            trims.append(pad)

    def cdll(name, *args, **kwargs):
        loads.append(name)
        return libc

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(sys, "platform", "linux")
    for found, want in (("libc.so.6-found", "libc.so.6-found"), (None, "libc.so.6")):
        monkeypatch.setattr(ctypes.util, "find_library", lambda name, found=found: found if name == "c" else "wrong")
        libc, loads[:], trims[:] = Libc(), [], []
        monkeypatch.setattr(utils, "_LIBC", None)
        utils.release_freed_memory()
        utils.release_freed_memory()
        assert loads == [want] and trims == [0, 0]
    libc, loads[:], trims[:] = object(), [], []  # no malloc_trim
    monkeypatch.setattr(utils, "_LIBC", None)
    utils.release_freed_memory()
    utils.release_freed_memory()
    assert loads == ["libc.so.6"] and utils._LIBC is False

    def broken(name, *args, **kwargs):
        loads.append(name)
        raise OSError("no libc")

    monkeypatch.setattr(ctypes, "CDLL", broken)
    loads[:] = []
    monkeypatch.setattr(utils, "_LIBC", None)
    utils.release_freed_memory()
    utils.release_freed_memory()
    assert loads == ["libc.so.6"] and utils._LIBC is False
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(sys, "platform", "darwin")
    loads[:], trims[:] = [], []
    monkeypatch.setattr(utils, "_LIBC", None)
    utils.release_freed_memory()
    assert loads == [] and trims == [] and utils._LIBC is False


def test_atomic_write_json_writes_indented_json_in_the_given_key_order(tmp_path):
    from hf_cft.utils import atomic_write_json

    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, "é"]})
    assert (tmp_path / "a.json").read_bytes() == b'{\n  "b": 1,\n  "a": [\n    1,\n    "\\u00e9"\n  ]\n}\n'
    atomic_write_json(tmp_path / "b.json", {"z": 0}, indent=None)
    assert (tmp_path / "b.json").read_text() == '{"z": 0}\n'


def test_user_stacklevel_of_a_call_from_an_installed_packages_top_level_is_that_line(tmp_path):
    """When every frame outside hf_cft is an installed package's (here a script that lives in a site-packages folder
    and calls the library at its top level: its module frame is the last of the stack), the warning goes to the
    outermost frame, the script's line, never past the end of the stack."""
    # in this process first (a call from a test function): the warning is the line in _warned_line that calls the
    # entry point (this also tells mutmut that the test covers user_stacklevel)
    entry = _simulated_library()["library_entry"]
    assert _warned_line(entry) == (__file__, _warned_line.__code__.co_firstlineno + 5)
    (tmp_path / "site-packages").mkdir()
    got, want = _script_warning(tmp_path / "site-packages" / "tool.py", "ns['library_entry']")
    assert got == want

"""PAM in the continual driver (pam.md §2–§5, §7): G is the merge of the task adapters, alignment and its
misalignment log, the deployed dense delta, merge-only / post-hoc TIES / sequential LoRA, exact resume."""

import json

import numpy as np
import pytest
import torch
from conftest import ToyTokenizer
from test_continual import _config, _crash_in_learn, _runner, _tasks

from hf_cft.continual import PAMStrategy, lora_factor_delta, make_strategy
from hf_cft.continual.training import build_training_model, lora_scaling
from hf_cft.continual.weights import lora_dense_delta
from hf_cft.errors import AdapterError, BundleError
from hf_cft.merging.baselines import ties
from hf_cft.merging.pam import PAMState, adapter_state, pam_merge, sign_misalignment
from hf_cft.testing import tiny_clip

LORA = dict(finetune="lora", max_steps=3, learning_rate=0.05)
PAM_OPTIONS = dict(top_p=1.0, align_every=1)  # align after every step on all of G's entries: resets happen


def _recording(strategy):
    """Keep L_t (before the merge) and G (after it) of every task."""
    strategy.adapters, strategy.globals = [], []
    learn = strategy.learn

    def wrapped(task, index):
        learn(task, index)
        strategy.adapters.append({k: v.clone() for k, v in strategy.last_task_state.items()})
        strategy.globals.append({k: v.clone() for k, v in strategy.state.global_state.items()})

    strategy.learn = wrapped
    return strategy


def _equal(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, options in (("pam", PAM_OPTIONS), ("merge_only", {})):
        strategy = _recording(make_strategy(name, **options))
        root = tmp_path_factory.mktemp(name)
        out[name] = (_runner(strategy, root, ToyTokenizer(), **LORA).run(), strategy, root)
    return out


def test_global_adapter_is_the_pam_merge_of_the_task_adapters(runs, tmp_path):
    result, pam, root = runs["pam"]
    L, G = pam.adapters, pam.globals
    assert _equal(G[0], L[0])  # first task: G ← L_1 (pam.md §2)
    for t in (1, 2):
        assert _equal(G[t], pam_merge(G[t - 1], L[t], t + 1, "half"))  # G ← ½G + ½L_t (§4)
        assert not _equal(G[t], G[t - 1])
    assert _equal(pam.state.global_state, G[2]) and pam.state.num_tasks == 3
    # the deployed model is θ⁰ + s·B^G·A^G after each task, for every dataset (no task id, §5)
    runner = _runner(PAMStrategy(), tmp_path, ToyTokenizer(), **LORA)
    ev, tasks = runner.evaluator, runner.eval_tasks
    s = lora_scaling(_config(**LORA))
    for t in range(3):
        assert result.matrix.values[t].tolist() == [ev.accuracy(x, lora_factor_delta(G[t], s)) for x in tasks]
    # alignment ran from the second task on, every step, and reset entries (§3); the first task is not aligned
    hist = result.history
    assert hist[0]["alignment_steps"] == 0 and "misalignment_top_p" not in hist[0]
    assert [h["alignment_steps"] for h in hist[1:]] == [3, 3] and all(h["reset_entries"] > 0 for h in hist[1:])
    # the misalignment of G vs L_t before each merge is logged (§7); the last step aligned, so top-p is 0 here
    for t in (1, 2):
        want = sign_misalignment(G[t - 1], L[t], top_p=1.0)
        assert hist[t]["misalignment_top_p"] == want["top_p"] == 0.0
        assert hist[t]["misalignment_all_B"] == want["all/B"]
        assert 0.0 < hist[t]["mean_step_misalignment"] <= 1.0
        assert pam.state.history[t]["misalignment"]["layers"]  # per layer in the state (pam_state.json)
    assert all(0.0 <= h["task_adapter_accuracy"] <= 100.0 for h in hist)
    assert len({h["adapter_params"] for h in hist}) == 1  # one adapter of constant size (§1, §7)
    assert [m["name"] for m in pam.misalignment()] == ["a", "b", "c"]
    saved = json.loads((root / "accuracy_matrix.json").read_text())
    assert saved["history"][1]["reset_entries"] == hist[1]["reset_entries"]
    assert saved["metrics"]["plasticity"] == pytest.approx(np.diag(result.matrix.values).mean())
    # the checkpoint is a regular LoRA folder plus the PAM state
    state = PAMState.from_pretrained(root / "checkpoint" / "pam")
    assert _equal(state.global_state, G[2]) and state.num_tasks == 3


def test_merge_only_is_pam_without_alignment(runs):
    pam, mo = runs["pam"][1], runs["merge_only"][1]
    hist = runs["merge_only"][0].history
    assert all(h["alignment_steps"] == 0 and h["reset_entries"] == 0 for h in hist)
    assert _equal(mo.globals[0], pam.globals[0])  # task 1 is never aligned: identical
    assert _equal(mo.globals[1], pam_merge(mo.globals[0], mo.adapters[1], 2))
    assert not _equal(mo.adapters[1], pam.adapters[1]) and not _equal(mo.globals[1], pam.globals[1])
    # unconstrained training leaves sign conflicts with G that PAM's alignment removed
    assert hist[1]["misalignment_all"] > 0.0
    assert mo.settings()["align"] is False and pam.settings()["align"] is True


def test_lora_factor_delta_is_peft_dense_delta(runs):
    G = runs["pam"][1].globals[-1]
    config = _config(**LORA)
    model = build_training_model(tiny_clip(image_size=12, patch_size=4), config, adapter_name="global")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in G.items():
            params[key.replace(".weight", ".global.weight")].copy_(value)
    peft = lora_dense_delta(model, "global")
    ours = lora_factor_delta(G, lora_scaling(config))
    assert sorted(peft) == sorted(ours) and all(torch.allclose(peft[k], ours[k], rtol=1e-6, atol=0) for k in peft)
    with pytest.raises(AdapterError, match="B factor"):
        lora_factor_delta({k: v for k, v in G.items() if "lora_B" not in k}, 1.0)


def test_pam_resumes_exactly_after_a_crash(runs, tmp_path):
    reference, ref, _ = runs["pam"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _runner(_crash_in_learn(make_strategy("pam", **PAM_OPTIONS), 2), tmp_path, ToyTokenizer(), **LORA).run()
    strategy = make_strategy("pam", **PAM_OPTIONS)
    result = _runner(strategy, tmp_path, ToyTokenizer(), **LORA).run()
    assert result.resumed_at == 2 and strategy.learned == ["a", "b", "c"]
    np.testing.assert_array_equal(result.matrix.values, reference.matrix.values)
    assert _equal(strategy.state.global_state, ref.state.global_state)
    drop = ("learn_s", "eval_s", "train_s", "task_adapter_eval_s")
    strip = lambda h: {k: v for k, v in h.items() if k not in drop}  # noqa: E731
    assert [strip(h) for h in result.history] == [strip(h) for h in reference.history]
    # another PAM config cannot load this checkpoint
    with pytest.raises(BundleError, match="PAM config"):
        PAMStrategy(top_p=0.3).load_checkpoint(tmp_path / "checkpoint")


def test_pam_ties_merges_the_factor_pair_with_ties(tmp_path):
    strategy = _recording(make_strategy("pam_ties"))
    result = _runner(strategy, tmp_path, ToyTokenizer(), tasks=_tasks()[:2], **LORA).run()
    (L1, L2), (G1, G2) = strategy.adapters, strategy.globals
    assert _equal(G1, L1)
    assert _equal(G2, ties([G1, L2], k=1.0, lam=1.0))  # elect sign(G + L), disjoint mean
    conflicts = sum(int(((G1[k] * L2[k]) < 0).sum()) for k in G1)
    rec = strategy.state.history[1]
    assert rec["merge"] == "ties" and rec["ties_conflicts"] == conflicts > 0
    assert not _equal(G2, pam_merge(G1, L2, 2))  # the conflicts are resolved, not averaged
    assert result.history[1]["alignment_steps"] == 0  # post-hoc only (the §8 row)
    assert strategy.settings()["ties_k"] == 1.0


def test_sequential_lora_trains_one_adapter_on_and_on(tmp_path):
    strategy = _recording(make_strategy("sequential_lora"))
    result = _runner(strategy, tmp_path, ToyTokenizer(), tasks=_tasks()[:2], **LORA).run()
    (L1, L2), (G1, G2) = strategy.adapters, strategy.globals
    assert _equal(G1, L1) and _equal(G2, L2) and not _equal(L1, L2)  # the adapter itself is deployed
    assert [h["merge_weight"] for h in result.history] == [1.0, 1.0]
    assert "task_adapter_accuracy" not in result.history[1]  # equals A[t, t] here


def test_sequential_lora_continues_from_the_previous_adapter(tmp_path):
    """With a learning rate of 0 in the second task, L_2 is exactly L_1 (copied, then not moved)."""
    strategy = _recording(make_strategy("sequential_lora"))
    _runner(strategy, tmp_path, ToyTokenizer(), tasks=_tasks()[:2], learning_rates=[0.05, 0.0], **LORA).run()
    assert _equal(strategy.adapters[1], strategy.adapters[0])
    model = build_training_model(tiny_clip(image_size=12, patch_size=4), _config(**LORA), adapter_name="global")
    fresh = adapter_state(model, "global")
    assert not _equal(fresh, strategy.adapters[0])  # trained in task 1: not the initial adapter

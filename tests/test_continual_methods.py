"""Issue 18's methods as continual strategies: the merge after each task is the one-shot method over the experts so
far (checked on fixed deltas, no training), SLERP's continual form, TALL's and PAM + TALL's task-aware answers
(end to end on the toy colour stream), resume, and option errors."""

import math

import numpy as np
import pytest
import torch
from conftest import ToyTokenizer
from test_continual import _crash_in_learn, _runner, _tasks

from hf_cft.continual import STRATEGIES, DeltaMergeStrategy, PAMTallStrategy, TALLStrategy, make_strategy
from hf_cft.continual.pam_strategy import lora_factor_delta
from hf_cft.errors import ContinualError
from hf_cft.merging import ContinualSLERP, breadcrumbs, consensus, dare, della, iso_c, iso_cts, model_stock, tsv_m
from hf_cft.merging.baselines import tall_masks


def deltas(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"m.weight": torch.randn(6, 4, generator=g), "m.bias": torch.randn(6, generator=g)} for _ in range(n)]


def same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


ONE_SHOT = {
    "dare": (dict(rho=0.5, seed=3), lambda ds: dare(ds, rho=0.5, seed=3)),
    "consensus": (dict(k=2), lambda ds: consensus(ds, k=min(2, len(ds)))),
    "tsv_m": (dict(alpha=0.9), lambda ds: tsv_m(ds, alpha=0.9)),
    "iso_c": (dict(), lambda ds: iso_c(ds)),
    "iso_cts": (dict(common_fraction=0.5), lambda ds: iso_cts(ds, common_fraction=0.5)),
    "breadcrumbs": (dict(density=0.5, gamma=0.1), lambda ds: breadcrumbs(ds, density=0.5, gamma=0.1)),
    "della": (dict(density=0.5, epsilon=0.2, seed=1), lambda ds: della(ds, density=0.5, epsilon=0.2, seed=1)),
    "model_stock": (dict(), lambda ds: model_stock(ds) if len(ds) > 1 else ds[0]),
}


@pytest.mark.parametrize("name", sorted(ONE_SHOT))
def test_strategy_merges_the_experts_so_far_with_the_one_shot_method(name):
    options, reference = ONE_SHOT[name]
    strategy = make_strategy(name, **options)
    assert isinstance(strategy, DeltaMergeStrategy) and strategy.merge_fn is not None
    assert name in STRATEGIES and strategy.settings()["merge"] == "function"
    ds = deltas(3, seed=len(name))
    for t in (1, 2, 3):
        got = strategy.merge_fn(ds[:t])
        want = reference(ds[:t])
        assert sorted(got) == sorted(want)
        for k in got:
            torch.testing.assert_close(got[k], want[k].float())
    if name == "consensus":  # one task: the consensus of one mask keeps the whole delta (not θ⁰)
        torch.testing.assert_close(strategy.merge_fn(ds[:1])["m.weight"], 0.3 * ds[0]["m.weight"])


def test_slerp_strategy_is_the_continual_slerp():
    strategy = make_strategy("slerp")
    merger = strategy.merger_factory()
    assert isinstance(merger, ContinualSLERP)
    ds = deltas(3, seed=1)
    ref = ContinualSLERP()
    for d in ds:
        assert same(merger.add(d), ref.add(d))


@pytest.mark.parametrize(
    "name, options, needle",
    [
        ("dare", {"rho": 1.0}, "rho"),
        ("consensus", {"k": 0}, "k"),
        ("breadcrumbs", {"density": 0.95, "gamma": 0.1}, "density \\+ gamma"),
        ("della", {"density": 0.1, "epsilon": 0.5}, "epsilon"),
        ("della", {"rank_scope": "layer"}, "rank_scope"),
        ("model_stock", {"average": "median"}, "average"),
        ("iso_cts", {"common_fraction": 2.0}, "common_fraction"),
        ("tall", {"lambdas": -1.0}, "lambdas"),
        ("pam_tall", {"tall_lambda": "x"}, "tall_lambda"),
        ("tsv_m", {"rank": 3}, "rank"),
        ("fisher", {"labels": "true"}, "labels"),
        ("fisher", {"floor": -1.0}, "floor"),
        ("fisher", {"max_batches": 0}, "max_batches"),
        ("fisher", {"normalize": 1}, "normalize"),
    ],
)
def test_bad_options_raise_continual_errors_naming_them(name, options, needle):
    with pytest.raises(ContinualError, match=needle):
        make_strategy(name, **options)


@pytest.mark.slow
def test_tsv_m_strategy_end_to_end_resumes_exactly(tmp_path):
    ref = make_strategy("tsv_m")
    result = _runner(ref, tmp_path / "ref", ToyTokenizer()).run()
    experts = [ref.store.load(k) for k in ref.experts]
    assert same(ref.merged, tsv_m(experts))
    with pytest.raises(RuntimeError, match="simulated crash"):
        _runner(_crash_in_learn(make_strategy("tsv_m"), 2), tmp_path / "crash", ToyTokenizer()).run()
    resumed = make_strategy("tsv_m")
    again = _runner(resumed, tmp_path / "crash", ToyTokenizer()).run()
    assert again.resumed_at == 2
    np.testing.assert_array_equal(again.matrix.values, result.matrix.values)


@pytest.mark.slow
def test_tall_answers_each_learned_task_with_its_mask_of_the_task_sum(tmp_path):
    strategy = make_strategy("tall", lambdas=0.4)
    assert isinstance(strategy, TALLStrategy)
    result = _runner(strategy, tmp_path, ToyTokenizer()).run()
    experts = [strategy.store.load(k) for k in strategy.experts]
    ref = tall_masks(experts, lambdas=0.4)
    for i, name in enumerate("abc"):
        assert same(strategy.task_delta(name), ref.task_delta(i))
    zero = _runner(make_strategy("zeroshot"), tmp_path / "zs", ToyTokenizer()).run().matrix.values
    np.testing.assert_array_equal(np.triu(result.matrix.values, 1), np.triu(zero, 1))  # not learned yet: θ⁰
    ev = _runner(make_strategy("zeroshot"), tmp_path / "ev", ToyTokenizer())
    assert result.matrix.values[2].tolist() == [
        ev.evaluator.accuracy(t, ref.task_delta(i)) for i, t in enumerate(ev.eval_tasks)
    ]
    assert all(0.0 < result.history[-1][f"mask_density/{n}"] <= 1.0 for n in "abc")
    again = make_strategy("tall", lambdas=0.4)
    assert _runner(again, tmp_path, ToyTokenizer()).run().resumed_at == 3
    assert same(again.task_delta("b"), strategy.task_delta("b"))
    with pytest.raises(ContinualError, match="'z'"):
        strategy.task_delta("z")


@pytest.mark.slow
def test_pam_tall_masks_the_global_adapter_with_each_tasks_adapter(tmp_path):
    two = _tasks()[:2]
    lora = dict(finetune="lora", max_steps=3, learning_rate=0.05)
    strategy = make_strategy("pam_tall", tall_lambda=0.4)
    assert isinstance(strategy, PAMTallStrategy) and strategy.settings()["tall_lambda"] == 0.4
    result = _runner(strategy, tmp_path, ToyTokenizer(), tasks=two, **lora).run()
    pam = make_strategy("pam")
    pam_result = _runner(pam, tmp_path / "pam", ToyTokenizer(), tasks=two, **lora).run()
    assert same(strategy.deployed, pam.deployed)  # the same PAM training and merge
    # transfer (task b before it is learned) is PAM's deployed model
    assert result.matrix.values[0, 1] == pam_result.matrix.values[0, 1]
    g = strategy.deployed
    own = lora_factor_delta(strategy.adapter_store.load("000"), strategy.scaling())
    want = {k: (own[k].abs() > 0.4 * (g[k] - own[k]).abs()).float() * g[k] for k in g}
    assert same(strategy.task_delta("a"), want)
    ev = _runner(make_strategy("zeroshot"), tmp_path / "ev", ToyTokenizer(), tasks=two)
    assert result.matrix.values[1, 0] == ev.evaluator.accuracy(ev.eval_tasks[0], want)
    again = make_strategy("pam_tall", tall_lambda=0.4)
    assert _runner(again, tmp_path, ToyTokenizer(), tasks=two, **lora).run().resumed_at == 2
    assert same(again.task_delta("a"), want)


@pytest.mark.slow
def test_regmean_strategy_is_regmean_over_the_experts_so_far(tmp_path, monkeypatch):
    from hf_cft.merging import data_dependent, regmean

    seen = []
    real = data_dependent.linear_input_grams

    def spy(*args, **kwargs):  # the Gram matrices the strategy gathered on each task's (transformed) train data
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(data_dependent, "linear_input_grams", spy)
    two = _tasks()[:2]
    strategy = make_strategy("regmean", alpha=0.6, max_batches=2)
    result = _runner(strategy, tmp_path, ToyTokenizer(), tasks=two).run()
    experts = [strategy.store.load(k) for k in ("000", "001")]
    assert len(seen) == 2 and any(k.startswith("vision_model.") for k in seen[0])
    want = regmean(experts, seen, alpha=0.6)
    assert sorted(strategy.merged) == sorted(want)
    for k in want:
        torch.testing.assert_close(strategy.merged[k], want[k], atol=1e-5, rtol=1e-4)
    again = make_strategy("regmean", alpha=0.6, max_batches=2)
    assert _runner(again, tmp_path, ToyTokenizer(), tasks=two).run().resumed_at == 2
    for k in want:
        torch.testing.assert_close(again.merged[k], strategy.merged[k])
    assert result.matrix.values.shape == (2, 2)


def _fixed_experts(model, n, scale=0.02):
    """Stand-ins for trained experts: seeded random deltas over every parameter of θ⁰ (both towers)."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        out.append({k: scale * torch.randn(p.shape, generator=g) for k, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_fisher_strategy_after_each_task_is_one_shot_fisher_merging_and_resumes(tmp_path, monkeypatch, normalize):
    """The continual Fisher merge (running sums) after task t equals fisher_merging over the t experts with their
    Fishers, each gathered as the paper defines it on the task's own data (θ⁰ + τ_i, the head of the task's classes);
    a run interrupted after task 1 resumes to the same merges and the same matrix."""
    from test_continual import _model

    from hf_cft.continual import task_seed
    from hf_cft.merging import clip_log_probs, fisher_diagonal, fisher_merging

    model = _model()
    experts = _fixed_experts(model, 3)
    options = dict(labels="sample", floor=1e-6, normalize=normalize, seed=3, max_batches=2)

    def build(log):
        strategy = make_strategy("fisher", **options)
        monkeypatch.setattr(strategy, "train_expert", lambda task, index: experts[index], raising=False)
        real = strategy.learn

        def learn(task, index):
            real(task, index)
            log.append({k: v.clone() for k, v in strategy.merged.items()})

        strategy.learn = learn
        return strategy

    merges = []
    strategy = build(merges)
    runner = _runner(strategy, tmp_path / "ref", ToyTokenizer(), model=model)
    result = runner.run()
    assert len(merges) == 3 and strategy.learned == ["a", "b", "c"]
    # the reference: each expert's Fisher on its own task's (model-ready) train rows, then the one-shot merge
    fishers = []
    for i, raw in enumerate(runner.tasks):
        task = runner._prepare(raw, task_seed(runner.config.seed, i))  # the train rows the runner gave learn()
        fn = clip_log_probs(ToyTokenizer(), task.classnames, task.templates)
        loader = runner.evaluator.loader(task.train)
        fishers.append(
            fisher_diagonal(model, loader, fn, keys=list(experts[i]), delta=experts[i], seed=3, max_batches=2)
        )
    assert any(bool(f["vision_model.encoder.layers.0.mlp.fc1.weight"].gt(0).any()) for f in fishers)
    for t in (1, 2, 3):
        want = fisher_merging(experts[:t], fishers[:t], floor=1e-6, normalize=normalize)
        assert sorted(merges[t - 1]) == sorted(want)
        for k in want:
            torch.testing.assert_close(merges[t - 1][k], want[k], rtol=1e-5, atol=1e-8)
    # the text tower has no Fisher (the head is built without gradients): every task weighs it by the floor alone,
    # so its merge is the plain mean, or with normalize=True the mean weighted by 1/(‖F_t‖ + floor) (FusionBench)
    text = "text_model.encoder.layers.0.mlp.fc1.weight"
    if normalize:
        w = [
            1.0 / (math.sqrt(sum(float(f[k].double().pow(2).sum()) for k in e)) + 1e-6)
            for f, e in zip(fishers, experts)
        ]
    else:
        w = [1.0, 1.0, 1.0]
    want_text = sum(wi * e[text].double() for wi, e in zip(w, experts)) / sum(w)
    torch.testing.assert_close(merges[2][text], want_text.float(), rtol=1e-5, atol=1e-7)
    # resume: a crash in task 2 (0-based) restarts from the checkpoint of tasks a, b to the same state and matrix
    with pytest.raises(RuntimeError, match="simulated crash"):
        _runner(_crash_in_learn(build([]), 2), tmp_path / "crash", ToyTokenizer(), model=model).run()
    again_log = []
    again = build(again_log)
    resumed = _runner(again, tmp_path / "crash", ToyTokenizer(), model=model).run()
    assert resumed.resumed_at == 2 and len(again_log) == 1
    np.testing.assert_array_equal(resumed.matrix.values, result.matrix.values)
    for k in merges[2]:
        torch.testing.assert_close(again.merged[k], merges[2][k], rtol=0, atol=0)
    tensors, meta = again.state_dict()
    ref_tensors, ref_meta = strategy.state_dict()
    assert meta == ref_meta and sorted(tensors) == sorted(ref_tensors)
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors) and tensors[
        text.join(["num.", ""])
    ].dtype == (torch.float64)
    with pytest.raises(ContinualError, match="other settings|settings"):
        _runner(make_strategy("fisher", **{**options, "seed": 4}), tmp_path / "ref", ToyTokenizer(), model=model).run()


def test_fisher_strategy_refuses_a_nan_fisher_naming_the_task():
    from hf_cft.errors import NonFiniteError

    strategy = make_strategy("fisher")
    d = deltas(1)[0]
    fisher = {k: torch.ones_like(v) for k, v in d.items()}
    fisher["m.bias"][0] = float("nan")
    with pytest.raises(NonFiniteError, match="'m.bias' on task 'dtd'"):
        strategy.add(d, fisher, "dtd")
    with pytest.raises(ContinualError, match="no Fisher for key 'm.weight'"):
        strategy.add(d, {"m.bias": torch.ones(6)}, "dtd")
    assert not strategy.learned and not strategy.num


@pytest.mark.slow
def test_fisher_strategy_end_to_end_is_fisher_merging_of_its_trained_experts(tmp_path, monkeypatch):
    """With real training (the toy colour stream): the deployed delta is fisher_merging over the stored experts and
    the Fishers the strategy gathered on each task's transformed train rows; a rerun resumes with the same merge."""
    from hf_cft.merging import data_dependent, fisher_merging

    seen = []
    real = data_dependent.fisher_diagonal

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(data_dependent, "fisher_diagonal", spy)
    two = _tasks()[:2]
    strategy = make_strategy("fisher", max_batches=1)
    result = _runner(strategy, tmp_path, ToyTokenizer(), tasks=two).run()
    experts = [strategy.store.load(k) for k in ("000", "001")]
    assert len(seen) == 2 and all(set(f) == set(e) for f, e in zip(seen, experts))
    want = fisher_merging(experts, seen)
    assert sorted(strategy.merged) == sorted(want)
    for k in want:
        torch.testing.assert_close(strategy.merged[k], want[k], rtol=1e-5, atol=1e-8)
    again = make_strategy("fisher", max_batches=1)
    assert _runner(again, tmp_path, ToyTokenizer(), tasks=two).run().resumed_at == 2
    for k in want:
        torch.testing.assert_close(again.merged[k], strategy.merged[k], rtol=0, atol=0)
    assert result.matrix.values.shape == (2, 2)

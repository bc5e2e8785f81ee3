"""The merging baselines as continual strategies (pam.md §9): experts, merges and evaluation as defined, the
sequential chain of MagMax / WiSE-FT, EMR's task-aware evaluation, exact resume, the strategy registry's errors,
and the real-MTIL stream builder against a mocked loader."""

import json

import numpy as np
import pytest
import torch
from conftest import ToyTokenizer
from test_continual import _crash_in_learn, _runner, _tasks

from hf_cft.continual import (
    STRATEGIES,
    DeltaMergeStrategy,
    EMRStrategy,
    IndependentExperts,
    PAMStrategy,
    ZeroShotStrategy,
    make_strategy,
    mtil_tasks,
    register_strategy,
)
from hf_cft.errors import BundleError, ContinualError
from hf_cft.merging.baselines import OPCMMerger, RunningMean, emr, magmax, ties, wise_ft


@pytest.fixture(scope="module")
def independent(tmp_path_factory):
    """Independent experts from θ⁰ on the three colour tasks: what every from-θ⁰ baseline must train too."""
    strategy = IndependentExperts()
    result = _runner(strategy, tmp_path_factory.mktemp("ind"), ToyTokenizer()).run()
    return result, strategy


@pytest.fixture(scope="module")
def zero_shot(tmp_path_factory):
    return _runner(ZeroShotStrategy(), tmp_path_factory.mktemp("zs"), ToyTokenizer()).run().matrix.values


def _equal(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _evaluator(tmp_path, tasks):
    runner = _runner(ZeroShotStrategy(), tmp_path / "ev", ToyTokenizer(), tasks=tasks)
    return runner.evaluator, runner.eval_tasks


def _spy_starts(strategy):
    """Record the ``start`` delta each expert's training was given."""
    strategy.starts = []
    original = strategy.train_expert

    def train_expert(task, index, start=None):
        strategy.starts.append(None if start is None else {k: v.clone() for k, v in start.items()})
        return original(task, index, start=start)

    strategy.train_expert = train_expert
    return strategy


# --------------------------------------------------------------------------- from-θ⁰ merges


@pytest.mark.parametrize(
    "name, expected",
    [
        ("task_arithmetic", lambda a, b: {k: 0.3 * (a[k] + b[k]) for k in a}),
        ("ties", lambda a, b: ties([a, b], k=0.2, lam=1.0)),
        ("running_mean", None),
        ("opcm", None),
    ],
)
def test_merge_baselines_merge_independent_experts_and_answer_every_task(name, expected, independent, tmp_path):
    two = _tasks()[:2]
    strategy = make_strategy(name)
    result = _runner(strategy, tmp_path / name, ToyTokenizer(), tasks=two).run()
    ind = independent[1]
    a, b = (strategy.store.load(k) for k in strategy.experts)
    assert _equal(a, ind.expert_delta("a")) and _equal(b, ind.expert_delta("b"))  # trained from θ⁰, same seeds
    if name == "running_mean":
        want = {k: (a[k] + b[k]) / 2 for k in a}
        assert all(torch.allclose(strategy.merged[k], want[k], rtol=0, atol=1e-7) for k in want)
        assert isinstance(strategy.merger, RunningMean)
    else:
        if name == "opcm":
            merger = OPCMMerger(alpha=0.5)
            merger.add(a)
            want = merger.add(b)
        else:
            want = expected(a, b)
        assert _equal(strategy.merged, want)
    # task-agnostic: one merged model answers both datasets
    ev, tasks = _evaluator(tmp_path, two)
    assert result.matrix.values[1].tolist() == [ev.accuracy(t, want) for t in tasks]
    assert "start_from" not in strategy.settings()
    saved = json.loads((tmp_path / name / "accuracy_matrix.json").read_text())
    assert saved["metrics"]["plasticity"] == pytest.approx(np.diag(result.matrix.values).mean())


# --------------------------------------------------------------------------- sequential chains


def test_magmax_trains_sequentially_merges_by_magnitude_and_resumes_exactly(independent, tmp_path):
    reference = _spy_starts(make_strategy("magmax"))
    ref = _runner(reference, tmp_path / "ref", ToyTokenizer()).run()
    taus = [reference.store.load(k) for k in reference.experts]
    # θ_t starts from θ_{t−1}: task t's start is exactly the stored (cumulative) τ_{t−1}; the first starts at θ⁰
    assert reference.starts[0] is None
    for t in (1, 2):
        assert _equal(reference.starts[t], taus[t - 1])
    assert not _equal(taus[1], independent[1].expert_delta("b"))  # not an expert from θ⁰
    assert taus[0].keys() == taus[1].keys()
    assert _equal(reference.merged, magmax(taus, lam=0.5))
    assert reference.settings() == {"merge": "stateful", "lam": 0.5, "tie_break": "later", "start_from": "previous"}

    with pytest.raises(RuntimeError, match="simulated crash"):
        _runner(_crash_in_learn(make_strategy("magmax"), 2), tmp_path / "crash", ToyTokenizer()).run()
    resumed = _spy_starts(make_strategy("magmax"))
    result = _runner(resumed, tmp_path / "crash", ToyTokenizer()).run()
    assert result.resumed_at == 2
    assert _equal(resumed.starts[0], taus[1])  # the chain continues from the last stored expert
    np.testing.assert_array_equal(result.matrix.values, ref.matrix.values)
    assert _equal(resumed.merged, reference.merged)
    assert _equal(resumed.store.load(resumed.experts[2]), taus[2])


def test_wise_interpolates_the_sequential_model_with_theta0(tmp_path):
    two = _tasks()[:2]
    strategy = _spy_starts(make_strategy("wise", alpha=0.5))
    result = _runner(strategy, tmp_path, ToyTokenizer(), tasks=two).run()
    taus = [strategy.store.load(k) for k in strategy.experts]
    assert strategy.starts[0] is None and _equal(strategy.starts[1], taus[0])
    assert _equal(strategy.merged, wise_ft(taus[1], 0.5))  # (1−α)θ⁰ + αθ_2, θ_2 fine-tuned from θ_1
    ev, tasks = _evaluator(tmp_path, two)
    assert result.matrix.values[0].tolist() == [ev.accuracy(t, wise_ft(taus[0], 0.5)) for t in tasks]


# --------------------------------------------------------------------------- EMR (task id)


def test_emr_answers_each_learned_task_with_its_own_masked_delta(independent, zero_shot, tmp_path):
    strategy = make_strategy("emr")
    assert isinstance(strategy, EMRStrategy)
    result = _runner(strategy, tmp_path, ToyTokenizer()).run()
    ind_result, ind = independent
    taus = [ind.expert_delta(n) for n in "abc"]
    A = result.matrix.values
    # one task: λ = 1, M = (τ ≠ 0), the task delta is the expert itself
    assert A[0, 0] == ind_result.matrix.values[0, 0]
    np.testing.assert_array_equal(np.triu(A, 1), np.triu(zero_shot, 1))  # not learned yet: θ⁰ (Transfer)
    full = emr(taus)
    ev, tasks = _evaluator(tmp_path, _tasks())
    assert A[2].tolist() == [ev.accuracy(t, full.task_delta(i)) for i, t in enumerate(tasks)]
    assert [result.history[-1][f"rescaler/{n}"] for n in "abc"] == pytest.approx(full.rescalers)
    # a finished run resumes by recomputing EMR from the stored experts; changed experts are refused
    again = make_strategy("emr")
    assert _runner(again, tmp_path, ToyTokenizer()).run().resumed_at == 3
    assert again.result.rescalers == strategy.result.rescalers
    store = again.store
    store.save("000", {k: 2 * v for k, v in store.load("000").items()})
    with pytest.raises(BundleError, match="stored experts changed"):
        _runner(make_strategy("emr"), tmp_path, ToyTokenizer()).run()


# --------------------------------------------------------------------------- registry and errors


@pytest.mark.parametrize(
    "name, options, needle",
    [
        ("no_such_method", {}, "unknown strategy 'no_such_method'"),
        ("magmax", {"alpha": 0.5}, r"strategy 'magmax' has no option\(s\) \['alpha'\]"),
        ("ties", {"k": 0.0}, "option k must be"),
        ("task_arithmetic", {"lam": float("nan")}, "option lam must be"),
        ("opcm", {"alpha": 1.5}, "option alpha must be"),
        ("wise", {"alpha": "half"}, "option alpha must be"),
        ("pam", {"top_p": 1.5}, "top_p"),
        ("pam", {"reset": "mean"}, "reset"),
        ("pam", {"merge_weight": "average"}, "merge_weight"),
        ("pam_ties", {"ties_k": 0.0}, "option ties_k must be"),
        ("pam_ties", {"align": "yes"}, "option align must be"),
        ("sequential_lora", {"merge_weight": 0.5}, r"no option\(s\) \['merge_weight'\]"),
        ("merge_only", {"align_every": 3}, r"no option\(s\) \['align_every'\]"),
    ],
)
def test_bad_strategy_names_and_options_raise_continual_errors(name, options, needle):
    with pytest.raises(ContinualError, match=needle):
        make_strategy(name, **options)


def test_registry_and_constructor_errors(tmp_path):
    expected = {"task_arithmetic", "ties", "magmax", "opcm", "running_mean", "wise", "emr"}
    expected |= {"pam", "merge_only", "pam_ties", "sequential_lora"}
    assert expected <= set(STRATEGIES)
    assert make_strategy("merge_only").name == "merge_only" and make_strategy("pam_ties").post_hoc == "ties"
    with pytest.raises(ContinualError, match="'ties' is already registered"):
        register_strategy("ties", lambda: None)
    with pytest.raises(ContinualError, match="start_from"):
        DeltaMergeStrategy.from_merger("x", RunningMean, start_from="last")
    with pytest.raises(ContinualError, match="post_hoc"):
        PAMStrategy(post_hoc="dare")
    with pytest.raises(ContinualError, match="finetune='lora'"):  # refused before any training
        _runner(PAMStrategy(), tmp_path, ToyTokenizer(), tasks=_tasks()[:1]).run()
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- the real MTIL stream (mocked Hub)


def _fake_mtil_loader(calls, wrong_names=()):
    from datasets import ClassLabel, Dataset, DatasetDict, Features

    from hf_cft.data import get_spec
    from hf_cft.data.loading import ClassificationDataset

    def loader(name):
        calls.append(name)
        spec = get_spec(f"mtil/{name}")
        n = spec.num_classes
        feats = Features({"label": ClassLabel(num_classes=n)})
        split = lambda rows: Dataset.from_dict({"label": [i % n for i in range(rows)]}, features=feats)  # noqa: E731
        classnames = list(spec.classnames)
        if name in wrong_names:
            classnames = classnames[::-1]
        return ClassificationDataset(name, DatasetDict(train=split(2 * n), test=split(n + 3)), classnames, ["{}"])

    return loader


def test_mtil_tasks_build_the_real_stream_from_the_specs():
    from hf_cft.data import get_spec
    from hf_cft.data.specs import benchmark_order

    calls = []
    tasks = mtil_tasks("I", loader=_fake_mtil_loader(calls))
    assert [t.name for t in tasks] == list(benchmark_order("mtil", "order_i")) == calls and len(tasks) == 11
    for t in tasks:
        spec = get_spec(f"mtil/{t.name}")
        assert t.classnames == list(spec.classnames) and t.templates == list(spec.templates)  # ZSCL's, not the Hub's
        assert len(t.train) == 2 * spec.num_classes and t.meta["hub_id"] == spec.hub_id
    two = mtil_tasks(["mnist", "dtd"], shots=1, max_test=4, loader=_fake_mtil_loader([]))
    assert [len(t.train) for t in two] == [10, 47] and two[0].meta["shots"] == 1
    assert [len(t.test) for t in two] == [4, 4]
    again = mtil_tasks(["mnist"], max_test=4, loader=_fake_mtil_loader([]))[0]
    assert again.test["label"] == two[0].test["label"]  # the seeded subset repeats
    assert [t.name for t in mtil_tasks("II", loader=_fake_mtil_loader([]))][:2] == ["stanford_cars", "food"]


def test_mtil_tasks_errors_name_the_problem():
    with pytest.raises(ContinualError, match="unknown MTIL order 'III'"):
        mtil_tasks("III", loader=_fake_mtil_loader([]))
    with pytest.raises(ContinualError, match=r"unknown MTIL dataset\(s\) \['imagenet'\]"):
        mtil_tasks(["mnist", "imagenet"], loader=_fake_mtil_loader([]))
    with pytest.raises(ContinualError, match="'dtd' was loaded with 47 class names that differ"):
        mtil_tasks(["mnist", "dtd"], loader=_fake_mtil_loader([], wrong_names=("dtd",)))

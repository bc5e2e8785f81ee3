"""Continual driver: matrix filling, metrics, checkpoints and exact resume, strategies (zero-shot, sequential,
independent, delta merges, ConDU against a fake merger with the hf_cft.merging contract), outputs and errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Image
from safetensors.torch import load_file, save_file

from hf_cft.continual import (
    ConDUStrategy,
    ContinualConfig,
    ContinualRunner,
    DeltaMergeStrategy,
    IndependentExperts,
    SequentialFineTuning,
    Strategy,
    TaskSpec,
    ZeroShotStrategy,
    call_with_delta,
    class_split_tasks,
    matrix_markdown,
    task_seed,
    train_expert,
)
from hf_cft.continual.runner import model_fingerprint
from hf_cft.data import ImageTransform, from_arrays
from hf_cft.errors import BundleError, ContinualError, DeltaError, TaskError
from hf_cft.metrics import AccuracyMatrix
from hf_cft.models import build_zeroshot_classifier, image_features
from hf_cft.testing import tiny_clip

SIZE = 12
TEMPLATES = ["a photo of a {}.", "a {} picture."]


def _colour_task(name, perm, classnames, seed, n=12):
    """Raw image/label rows whose dominant channel, permuted per task, is the class."""
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for i in range(n):
        img = rng.integers(0, 60, (SIZE, SIZE, 3)).astype(np.uint8)
        img[..., perm[i % 3]] += 150
        imgs.append(img)
        labels.append(i % 3)
    ds = from_arrays(imgs, labels, classnames, TEMPLATES, name=name)["train"]
    return TaskSpec(name, ds, ds.select(range(9)), classnames, TEMPLATES)


def _tasks():
    return [
        _colour_task("a", [0, 1, 2], ["cat", "dog", "fox"], 0),
        _colour_task("b", [2, 0, 1], ["car", "bus", "van"], 1),
        _colour_task("c", [1, 2, 0], ["oak", "elm", "ash"], 2),
    ]


def _model():
    return tiny_clip(image_size=SIZE, patch_size=4)


def _config(**kw):
    base = dict(
        max_steps=2,
        per_device_train_batch_size=6,
        learning_rate=0.05,
        optim="sgd",
        warmup_steps=0,
        lr_scheduler_type="constant",
        label_smoothing=0.0,
        use_cpu=True,
        lora_r=2,
        eval_batch_size=16,
        seed=3,
        logging_steps=1,  # result-neutral; gives every task a logged (process-averaged) training loss
    )
    base.update(kw)
    return ContinualConfig(**base)


def _runner(strategy, out, tokenizer, model=None, tasks=None, **cfg):
    return ContinualRunner(
        strategy,
        tasks or _tasks(),
        model or _model(),
        tokenizer,
        out,
        _config(**cfg),
        transform=ImageTransform(size=SIZE, crop_size=SIZE),
        plot=False,
    )


class Scripted(Strategy):
    """A deterministic fake: A[r, c] = 10·r + c (+ 0.5 when c is learned), with a log of every call."""

    name = "scripted"

    def __init__(self, names, fail_at=None, spy=None):
        super().__init__()
        self.names, self.fail_at, self.spy = names, fail_at, spy
        self.learned = 0
        self.calls = []

    def learn(self, task, index):
        if self.spy is not None:
            self.spy(task, index)
        if index == self.fail_at:
            raise RuntimeError(f"simulated crash in task {index}")
        self.calls.append(("learn", task.name, index))
        self.learned += 1

    def evaluate(self, task, learned):
        self.calls.append(("eval", task.name, learned))
        return 10.0 * (self.learned - 1) + self.names.index(task.name) + (0.5 if learned else 0.0)

    def state_dict(self):
        return {"learned": torch.tensor([self.learned])}, {"calls": len(self.calls)}

    def load_state_dict(self, tensors, metadata):
        self.learned = int(tensors["learned"][0])


def _list_tasks(names):
    return [TaskSpec(n, [0], [0], ["x", "y"], ["a {}."]) for n in names]


NAMES = ["t0", "t1", "t2", "t3"]


def _scripted_run(tmp_path, toy_tokenizer, strategy=None, names=NAMES, plot=False, **cfg):
    strategy = strategy or Scripted(names)
    runner = ContinualRunner(
        strategy, _list_tasks(names), _model(), toy_tokenizer, tmp_path, _config(**cfg), plot=plot
    )
    return runner.run()


# --------------------------------------------------------------------------- runner mechanics (fake strategy)


def test_runner_fills_each_row_after_learning_its_task(tmp_path, toy_tokenizer):
    s = Scripted(NAMES)
    result = _scripted_run(tmp_path, toy_tokenizer, s)
    expected = np.array([[10.0 * r + c + (0.5 if c <= r else 0.0) for c in range(4)] for r in range(4)])
    np.testing.assert_array_equal(result.matrix.values, expected)
    # learn task r, then evaluate every task with learned = (c <= r)
    for r in range(4):
        block = s.calls[r * 5 : (r + 1) * 5]
        assert block[0] == ("learn", NAMES[r], r)
        assert block[1:] == [("eval", NAMES[c], c <= r) for c in range(4)]
    assert result.resumed_at == 0 and result.strategy == "scripted"


def test_written_metrics_equal_hand_computation(tmp_path, toy_tokenizer):
    result = _scripted_run(tmp_path, toy_tokenizer, plot=True)
    A = result.matrix.values
    T = 4
    transfer = np.mean([np.mean([A[r, c] for r in range(c)]) for c in range(1, T)])
    average = np.mean([np.mean([A[r, c] for r in range(T)]) for c in range(T)])
    last = np.mean([A[T - 1, c] for c in range(T)])
    bwt = np.mean([A[T - 1, c] - A[c, c] for c in range(T - 1)])
    saved = json.loads((tmp_path / "accuracy_matrix.json").read_text())
    for key, value in {"transfer": transfer, "average": average, "last": last, "bwt": bwt}.items():
        assert saved["metrics"][key] == pytest.approx(value, abs=1e-12)
        assert result.metrics[key] == pytest.approx(value, abs=1e-12)
    # hand values: column c before learning: 10r + c for r < c
    assert transfer == pytest.approx(np.mean([c + 10 * (c - 1) / 2 for c in range(1, 4)]))
    assert bwt == pytest.approx(30.0 - np.mean([10.0 * c for c in range(3)]))
    assert saved["names"] == NAMES and saved["complete"] is True
    md = (tmp_path / "accuracy_matrix.md").read_text()
    assert "| t3 | 30.5 | 31.5 | 32.5 | 33.5 |" in md and f"| {np.round(transfer, 1):.1f} |" in md
    assert (tmp_path / "accuracy_matrix.png").stat().st_size > 1000


def test_checkpoint_is_written_after_every_task(tmp_path, toy_tokenizer):
    seen = []

    def spy(task, index):
        manifest = tmp_path / "checkpoint" / "manifest.json"
        if index == 0:
            assert not manifest.exists()
            return
        m = json.loads(manifest.read_text())
        seen.append(m["completed"])
        assert m["completed"] == index
        rows = np.array([[np.nan if v is None else v for v in row] for row in m["matrix"]])
        assert np.isfinite(rows[:index]).all() and np.isnan(rows[index:]).all()
        assert m["seeds"]["task_seeds"][index] == task_seed(3, index)

    _scripted_run(tmp_path, toy_tokenizer, Scripted(NAMES, spy=spy))
    assert seen == [1, 2, 3]
    assert not list(tmp_path.glob(".checkpoint-*")) and not (tmp_path / "checkpoint.old").exists()


def test_crash_then_rerun_resumes_after_the_last_finished_task(tmp_path, toy_tokenizer):
    with pytest.raises(RuntimeError, match="simulated crash in task 2"):
        _scripted_run(tmp_path, toy_tokenizer, Scripted(NAMES, fail_at=2))
    s = Scripted(NAMES)
    result = _scripted_run(tmp_path, toy_tokenizer, s)
    assert result.resumed_at == 2
    assert [c for c in s.calls if c[0] == "learn"] == [("learn", "t2", 2), ("learn", "t3", 3)]
    assert s.learned == 4  # state restored (2) + 2 new tasks
    np.testing.assert_array_equal(result.matrix.values, _scripted_run(tmp_path / "fresh", toy_tokenizer).matrix.values)
    # a finished run re-run: nothing trained, same outputs
    s2 = Scripted(NAMES)
    again = _scripted_run(tmp_path, toy_tokenizer, s2)
    assert s2.calls == [] and again.resumed_at == 4
    np.testing.assert_array_equal(again.matrix.values, result.matrix.values)


def test_a_checkpoint_left_between_two_renames_is_found(tmp_path, toy_tokenizer):
    with pytest.raises(RuntimeError):
        _scripted_run(tmp_path, toy_tokenizer, Scripted(NAMES, fail_at=3))
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # crash after the first rename
    (tmp_path / ".checkpoint-torn").mkdir()
    result = _scripted_run(tmp_path, toy_tokenizer)
    assert result.resumed_at == 3 and not (tmp_path / ".checkpoint-torn").exists()


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"cfg": {"learning_rate": 0.01}}, "learning_rate=0.05 there, 0.01 here"),
        ({"cfg": {"seed": 4}}, "seed=3 there, 4 here"),
        ({"names": ["t0", "t1", "tX", "t3"]}, "task stream"),
        ({"strategy": ZeroShotStrategy()}, "strategy 'scripted' there, 'zeroshot' here"),
        ({"model": 1}, "base model"),
    ],
)
def test_resuming_another_run_is_refused_naming_the_difference(tmp_path, toy_tokenizer, change, needle):
    with pytest.raises(RuntimeError):
        _scripted_run(tmp_path, toy_tokenizer, Scripted(NAMES, fail_at=2))
    names = change.get("names", NAMES)
    strategy = change.get("strategy", Scripted(names))
    model = tiny_clip(seed=1, image_size=SIZE, patch_size=4) if "model" in change else _model()
    runner = ContinualRunner(
        strategy, _list_tasks(names), model, toy_tokenizer, tmp_path, _config(**change.get("cfg", {}))
    )
    with pytest.raises(ContinualError, match=needle):
        runner.run()


def test_result_neutral_settings_may_change_on_resume(tmp_path, toy_tokenizer):
    with pytest.raises(RuntimeError):
        _scripted_run(tmp_path, toy_tokenizer, Scripted(NAMES, fail_at=1))
    assert _scripted_run(tmp_path, toy_tokenizer, logging_steps=7).resumed_at == 1


def test_resume_false_and_other_task_data_are_refused(tmp_path, toy_tokenizer):
    _scripted_run(tmp_path, toy_tokenizer)
    runner = ContinualRunner(Scripted(NAMES), _list_tasks(NAMES), _model(), toy_tokenizer, tmp_path, _config())
    runner.resume = False
    with pytest.raises(ContinualError, match="already holds a checkpoint"):
        runner.run()
    tasks = _list_tasks(NAMES)
    tasks[1] = TaskSpec("t1", [0], [0], ["x", "z"], ["a {}."])
    with pytest.raises(ContinualError, match="task 't1' has other data"):
        ContinualRunner(Scripted(NAMES), tasks, _model(), toy_tokenizer, tmp_path, _config()).run()


def test_bad_streams_and_settings_raise_continual_errors(tmp_path, toy_tokenizer):
    with pytest.raises(ContinualError, match="empty"):
        ContinualRunner(Scripted([]), [], _model(), toy_tokenizer, tmp_path)
    with pytest.raises(ContinualError, match="'t1' appears twice"):
        ContinualRunner(Scripted(NAMES), _list_tasks(["t0", "t1", "t1"]), _model(), toy_tokenizer, tmp_path)
    with pytest.raises(ContinualError, match="empty test dataset"):
        TaskSpec("e", [0], [], ["x"], ["a {}."])
    with pytest.raises(ContinualError, match="finetune"):
        ContinualConfig(finetune="prompt")
    with pytest.raises(ContinualError, match="learning_rates has 2 entries; task position 2"):
        ContinualConfig(learning_rates=[1e-3, 2e-3]).learning_rate_for(2)
    with pytest.raises(ContinualError, match="Strategy"):
        ContinualRunner(object(), _list_tasks(NAMES), _model(), toy_tokenizer, tmp_path)
    with pytest.raises(ContinualError, match="lora_merge must be one of"):
        ConDUStrategy(lora_merge="bogus")


def test_class_split_tasks_relabel_disjoint_classes():
    from hf_cft.data import load_digits_dataset

    tasks = class_split_tasks(load_digits_dataset(image_size=8), [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert [t.name for t in tasks] == ["digits-0-3", "digits-4-6", "digits-7-9"]
    assert tasks[1].classnames == ["four", "five", "six"]
    assert sorted(set(tasks[1].train["label"])) == [0, 1, 2] and len(tasks[2].test) > 0
    with pytest.raises(ContinualError, match="overlap"):
        class_split_tasks(load_digits_dataset(image_size=8), [[0, 1], [1, 2]])


@pytest.mark.data
def test_mtil_mini_tasks_train_on_the_downstream_pool(shared_data):
    from hf_cft.continual import MTIL_MINI_ORDERS, mtil_mini_tasks
    from hf_cft.data import load_classification_dataset, split_per_class

    assert sorted(MTIL_MINI_ORDERS["I"]) == sorted(MTIL_MINI_ORDERS["II"]) and len(MTIL_MINI_ORDERS["I"]) == 8
    tasks = mtil_mini_tasks(["dtd10", "flowers5"], data_dir=str(shared_data), max_test=50)
    ds = load_classification_dataset("dtd10", data_dir=str(shared_data))
    pretrain, pool = split_per_class(ds["train"], 0.7, seed=0)
    dtd = tasks[0]
    assert dtd.name == "dtd10" and len(dtd.train) == len(pool) == len(ds["train"]) - len(pretrain)
    paths = lambda d: {r["path"] for r in d.cast_column("image", Image(decode=False))["image"]}  # noqa: E731
    assert paths(dtd.train) == paths(pool) and not paths(dtd.train) & paths(pretrain)
    assert len(dtd.test) == 50 and dtd.classnames == ds.classnames and dtd.templates == ds.templates
    few = mtil_mini_tasks(["flowers5"], data_dir=str(shared_data), shots=5)[0]
    assert len(few.train) == 5 * few.num_classes and few.meta["shots"] == 5
    with pytest.raises(ContinualError, match="unknown MTIL-mini order 'III'"):
        mtil_mini_tasks("III")


# --------------------------------------------------------------------------- weights


def test_call_with_delta_matches_an_explicit_copy_and_never_touches_theta0():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    delta = {k: 0.05 * torch.randn(p.shape, generator=g) for k, p in model.named_parameters() if "fc1" in k}
    x = torch.randn(3, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        got = call_with_delta(model, delta, image_features, x)
        copy = _model()
        for k, p in copy.named_parameters():
            if k in delta:
                p.add_(delta[k])
        torch.testing.assert_close(got, image_features(copy, x), rtol=0, atol=1e-6)
        assert not torch.allclose(got, image_features(model, x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(DeltaError, match="'no.such.weight'"):
        call_with_delta(model, {"no.such.weight": torch.zeros(1)}, image_features, x)


def test_lora_expert_is_the_dense_adapter_delta(tmp_path, toy_tokenizer):
    from hf_cft.continual import build_training_model

    model = _model()
    fp = model_fingerprint(model)
    task = _runner(IndependentExperts(), tmp_path, toy_tokenizer)._prepare(_tasks()[0], 0)
    cfg = _config(finetune="lora", max_steps=3)
    delta = train_expert(model, toy_tokenizer, task, cfg, seed=0, index=0, output_dir=tmp_path / "run")
    assert model_fingerprint(model) == fp  # θ⁰ untouched
    layers = _config().lora_target_modules
    assert sorted(delta) == sorted(
        f"{tower}.encoder.layers.{i}.{m}.weight"
        for tower in ("text_model", "vision_model")
        for i in (0, 1)
        for m in layers
    )
    assert all(d.abs().sum() > 0 for d in delta.values())
    # sequential LoRA: a new adapter on θ⁰ + start; an untrained one (lr 0) returns start exactly
    frozen = _config(finetune="lora", max_steps=1, learning_rate=0.0)
    again = train_expert(model, toy_tokenizer, task, frozen, seed=0, index=0, output_dir=tmp_path / "r2", start=delta)
    assert sorted(again) == sorted(delta) and all(torch.equal(again[k], delta[k]) for k in delta)
    # an untrained adapter is exactly θ⁰ (B = 0), and A is seeded the same for every task
    a1, a2 = build_training_model(model, cfg), build_training_model(model, cfg)
    for (n1, p1), (_, p2) in zip(a1.named_parameters(), a2.named_parameters()):
        assert torch.equal(p1, p2), n1
        if "lora_B" in n1:
            assert not p1.any()


# --------------------------------------------------------------------------- real strategies on a tiny CLIP


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs of each real strategy on the three colour tasks (shared by several tests)."""
    from conftest import ToyTokenizer

    out = {}
    root = tmp_path_factory.mktemp("reference")
    for name, strategy in (
        ("zeroshot", ZeroShotStrategy()),
        ("sequential", SequentialFineTuning()),
        ("independent", IndependentExperts()),
    ):
        runner = _runner(strategy, root / name, ToyTokenizer())
        out[name] = (runner.run(), strategy)
    return out


def _crash_in_learn(strategy, index):
    original = strategy.learn

    def learn(task, i):
        if i == index:
            raise RuntimeError("simulated crash")
        return original(task, i)

    strategy.learn = learn
    return strategy


@pytest.mark.parametrize("name", ["sequential", "independent"])
def test_crash_resume_gives_the_bit_identical_matrix_and_state(name, tmp_path, toy_tokenizer, reference_runs):
    reference, ref_strategy = reference_runs[name]
    cls = type(ref_strategy)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _runner(_crash_in_learn(cls(), 2), tmp_path, toy_tokenizer).run()
    assert json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())["completed"] == 2
    strategy = cls()
    result = _runner(strategy, tmp_path, toy_tokenizer).run()
    assert result.resumed_at == 2
    np.testing.assert_array_equal(result.matrix.values, reference.matrix.values)
    tensors, meta = strategy.state_dict()
    ref_tensors, ref_meta = ref_strategy.state_dict()
    assert meta == ref_meta and sorted(tensors) == sorted(ref_tensors)
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    if name == "independent":
        for task in "abc":
            assert all(
                torch.equal(v, ref_strategy.expert_delta(task)[k]) for k, v in strategy.expert_delta(task).items()
            )


def test_zero_shot_rows_repeat_theta0(reference_runs):
    zs = reference_runs["zeroshot"][0].matrix.values
    assert (zs == zs[0]).all()
    assert zs[0].tolist() != [100.0] * 3  # a random CLIP is not perfect


def test_sequential_and_independent_behave_as_defined(reference_runs, tmp_path, toy_tokenizer):
    zs = reference_runs["zeroshot"][0].matrix.values
    seq_result, seq = reference_runs["sequential"]
    ind_result, ind = reference_runs["independent"]
    A = ind_result.matrix.values
    # independent, task id known: θ⁰ before learning (Transfer = zero-shot), its own expert after (BWT = 0)
    for r in range(3):
        for c in range(3):
            assert A[r, c] == (zs[r, c] if c > r else A[c, c])
    assert ind_result.metrics["bwt"] == 0.0
    # every expert trains from θ⁰ with its task's seed: expert of task b is what training b alone from θ⁰ gives
    runner = _runner(IndependentExperts(), tmp_path, toy_tokenizer)
    task_b = runner._prepare(_tasks()[1], task_seed(3, 1))
    metrics = {}
    alone = train_expert(
        runner.base_model, toy_tokenizer, task_b, _config(), task_seed(3, 1), 1, tmp_path / "r", metrics=metrics
    )
    assert all(torch.equal(alone[k], v) for k, v in ind.expert_delta("b").items())
    # its last logged training loss is in the run's history (the same on every process of a multi-process run)
    assert ind_result.history[1]["train_loss"] == metrics["train_loss"] > 0
    # sequential: first task identical to the independent expert, later tasks start from the previous model
    seq_state = seq.state_dict()[0]
    assert not all(torch.allclose(seq_state[k], ind.expert_delta("c")[k]) for k in seq_state)
    ev = runner.evaluator
    tasks = runner.eval_tasks
    assert seq_result.matrix.values[2].tolist() == [ev.accuracy(t, seq_state) for t in tasks]
    assert seq_result.matrix.values[0, 0] == A[0, 0]  # same expert for the first task


def test_delta_merge_strategy_function_and_stateful(reference_runs, tmp_path, toy_tokenizer):
    ind = reference_runs["independent"][1]
    experts = [ind.expert_delta(n) for n in "ab"]  # trained from θ⁰ with the same seeds as the merge's experts
    two = _tasks()[:2]

    def mean_merge(deltas):
        return {k: sum(d[k] for d in deltas) / len(deltas) for k in deltas[0]}

    fn = DeltaMergeStrategy.from_function("mean", mean_merge, weight=1.0)
    res = _runner(fn, tmp_path / "fn", toy_tokenizer, tasks=two).run()
    want = mean_merge(experts)
    assert all(torch.equal(fn.merged[k], want[k]) for k in want)
    assert fn.settings() == {"merge": "function", "weight": 1.0}
    # one merged model answers every dataset: row 1 is θ⁰ + mean(δa, δb) everywhere
    runner = _runner(ZeroShotStrategy(), tmp_path / "z", toy_tokenizer, tasks=two)
    assert res.matrix.values[1].tolist() == [runner.evaluator.accuracy(t, want) for t in runner.eval_tasks]

    class RunningSum:  # a stateful merger: .add(delta) -> merged
        def __init__(self):
            self.total = None

        def add(self, delta):
            self.total = {k: (self.total[k] if self.total else 0) + v for k, v in delta.items()}
            return {k: 0.5 * v for k, v in self.total.items()}

    st = _crash_in_learn(DeltaMergeStrategy.from_merger("sum", RunningSum), 1)
    with pytest.raises(RuntimeError):
        _runner(st, tmp_path / "st", toy_tokenizer, tasks=two).run()
    st = DeltaMergeStrategy.from_merger("sum", RunningSum)
    res_st = _runner(st, tmp_path / "st", toy_tokenizer, tasks=two).run()  # resumes: replays add() over task a
    assert res_st.resumed_at == 1
    assert all(torch.equal(st.merged[k], 0.5 * (experts[0][k] + experts[1][k])) for k in want)
    with pytest.raises(ContinualError, match="exactly one"):
        DeltaMergeStrategy("x")


# --------------------------------------------------------------------------- ConDU against the merger contract


class FakeMerger:
    """The ``DeltaFusionMerger`` contract with an identity unify (each expert rebuilt exactly)."""

    def __init__(self):
        self.deltas, self.records = {}, {}

    def add_task(self, delta, name, prototypes=None, classnames=None, templates=None, dataset=None):
        if name in self.deltas:
            raise TaskError(f"task {name!r} is already merged")
        self.deltas[name] = {k: v.clone() for k, v in delta.items()}
        self.records[name] = {"prototypes": prototypes, "classnames": classnames, "templates": templates}

    def expert_delta(self, name):
        return self.deltas[name]

    @property
    def task_names(self):
        return list(self.deltas)

    def save_pretrained(self, directory):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tasks.json").write_text(json.dumps({n: r["classnames"] for n, r in self.records.items()}))
        for i, (n, delta) in enumerate(self.deltas.items()):
            save_file(delta, str(d / f"{i}.safetensors"))
            save_file({"p": self.records[n]["prototypes"]}, str(d / f"{i}.proto.safetensors"))

    @classmethod
    def from_pretrained(cls, directory):
        d, m = Path(directory), cls()
        for i, (n, classnames) in enumerate(json.loads((d / "tasks.json").read_text()).items()):
            m.deltas[n] = load_file(str(d / f"{i}.safetensors"))
            m.records[n] = {"prototypes": load_file(str(d / f"{i}.proto.safetensors"))["p"], "classnames": classnames}
        return m


class FakeRouter:
    """Router contract; answers with θ⁰'s zero-shot logits and records which datasets were routed."""

    routed: list = []

    def __init__(self, merger, base_model, tokenizer, top_k=4, weighting="uniform", include_zero_shot=True):
        self.model, self.tokenizer, self.top_k = base_model, tokenizer, top_k
        assert merger.task_names and include_zero_shot and weighting == "uniform"

    def logits(self, pixel_values, classnames, templates):
        FakeRouter.routed.append(tuple(classnames))
        head = build_zeroshot_classifier(self.model, self.tokenizer, classnames, templates)
        return 100.0 * image_features(self.model, pixel_values) @ head.t()


def _prototypes(model, tokenizer, batches, classnames, templates):
    seen = sum(len(b["labels"]) for b in batches)  # the contract: batches of pixel_values and labels
    return torch.full((len(classnames), 4), float(seen))


def _condu(**kw):
    return ConDUStrategy(
        top_k=2,
        merger_factory=FakeMerger,
        merger_loader=FakeMerger.from_pretrained,
        router_factory=FakeRouter,
        prototype_fn=_prototypes,
        **kw,
    )


def test_condu_uses_experts_when_learned_and_routing_for_transfer(reference_runs, tmp_path, toy_tokenizer):
    zs = reference_runs["zeroshot"][0].matrix.values
    ind_result, ind = reference_runs["independent"]
    FakeRouter.routed = []
    with pytest.raises(RuntimeError):
        _runner(_crash_in_learn(_condu(), 2), tmp_path, toy_tokenizer).run()
    strategy = _condu()
    result = _runner(strategy, tmp_path, toy_tokenizer).run()  # resumed through save/from_pretrained
    assert result.resumed_at == 2 and strategy.learned == ["a", "b", "c"]
    # experts are trained from θ⁰ exactly like the independent ones and reach the merger whole
    for n in "abc":
        assert all(torch.equal(strategy.merger.expert_delta(n)[k], v) for k, v in ind.expert_delta(n).items())
        assert strategy.merger.records[n]["classnames"] == next(t.classnames for t in _tasks() if t.name == n)
        assert strategy.merger.records[n]["prototypes"].shape == (3, 4)
    assert float(strategy.merger.records["a"]["prototypes"][0, 0]) == 12.0  # computed on the training rows
    A, B = result.matrix.values, ind_result.matrix.values
    np.testing.assert_array_equal(np.tril(A), np.tril(B))  # learned: the single (here exact) expert
    np.testing.assert_array_equal(np.triu(A, 1), np.triu(zs, 1))  # Transfer: routed (the fake router = θ⁰)
    # routing was asked for exactly the Transfer entries (one batch each): after a: b and c; after b: c; after c: none
    assert FakeRouter.routed == [("car", "bus", "van"), ("oak", "elm", "ash"), ("oak", "elm", "ash")]


def test_condu_task_agnostic_routes_every_dataset(tmp_path, toy_tokenizer, reference_runs):
    zs = reference_runs["zeroshot"][0].matrix.values
    FakeRouter.routed = []
    strategy = _condu(task_agnostic=True)
    result = _runner(strategy, tmp_path, toy_tokenizer, tasks=_tasks()[:2]).run()
    assert len(FakeRouter.routed) == 4  # 2 rows × 2 datasets, all routed
    np.testing.assert_array_equal(result.matrix.values, zs[:2, :2])
    assert strategy.settings()["task_agnostic"] is True


def test_condu_checkpoint_must_hold_the_merger(tmp_path, toy_tokenizer):
    with pytest.raises(BundleError, match="merger folder"):
        _condu().load_checkpoint(tmp_path)


# --------------------------------------------------------------------------- outputs


def test_partial_matrix_markdown_and_heatmap(tmp_path):
    from hf_cft.plots import plot_accuracy_matrix

    m = AccuracyMatrix(["x", "y", "z"])
    m.set_row(0, [50.0, 20.0, 33.35])
    md = matrix_markdown(m, "partial")
    assert "| x | 50.0 | 20.0 | 33.4 |" in md and "| y | – | – | – |" in md and "1 of 3 rows" in md
    png = plot_accuracy_matrix(m.values, m.names, tmp_path / "m.png", "partial")
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="3×3"):
        plot_accuracy_matrix(np.zeros((2, 2)), ["a", "b", "c"], tmp_path / "bad.png")


# --------------------------------------------------------------------------- with the real hf_cft.merging


def _real_merging():
    import hf_cft.merging as merging

    if not hasattr(merging, "DeltaFusionMerger"):
        pytest.skip("hf_cft.merging.DeltaFusionMerger is not in this installation yet")
    return merging


def test_condu_with_the_real_merger_resumes_exactly(reference_runs, tmp_path, toy_tokenizer):
    _real_merging()
    ind_result = reference_runs["independent"][0]
    full = ConDUStrategy(top_k=2)
    reference = _runner(full, tmp_path / "full", toy_tokenizer).run()
    # one task: λ = 1 and M = (δ ≠ 0), the rebuilt expert is the expert (condu.md §8.1)
    assert reference.matrix.values[0, 0] == ind_result.matrix.values[0, 0]
    with pytest.raises(RuntimeError):
        _runner(_crash_in_learn(ConDUStrategy(top_k=2), 2), tmp_path / "resumed", toy_tokenizer).run()
    resumed = ConDUStrategy(top_k=2)
    result = _runner(resumed, tmp_path / "resumed", toy_tokenizer).run()
    assert result.resumed_at == 2
    np.testing.assert_array_equal(result.matrix.values, reference.matrix.values)
    for name in "abc":
        a, b = resumed.merger.expert_delta(name), full.merger.expert_delta(name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_condu_fidelity_tracking_logs_cosines_density_and_lambda(reference_runs, tmp_path, toy_tokenizer):
    """track_fidelity: after session s, every stored expert's cosine / relative error to its original delta, mask
    density and λ are in the history; the first session's expert is exact (condu.md §8.1); results unchanged."""
    _real_merging()
    plain = _runner(ConDUStrategy(top_k=2), tmp_path / "plain", toy_tokenizer).run()
    tracked = ConDUStrategy(top_k=2, track_fidelity=True)
    result = _runner(tracked, tmp_path / "tracked", toy_tokenizer).run()
    np.testing.assert_array_equal(result.matrix.values, plain.matrix.values)
    first = result.history[0]
    assert first["fidelity_cos/a"] == pytest.approx(1.0, abs=1e-6) and first["fidelity_rel_err/a"] < 1e-6
    assert first["lambda/a"] == pytest.approx(1.0)
    last = result.history[-1]
    for name in "abc":
        assert -1.0 <= last[f"fidelity_cos/{name}"] <= 1.0 + 1e-9
        assert 0.0 < last[f"mask_density/{name}"] <= 1.0 and last[f"lambda/{name}"] > 0
        # the logged cosine is the one of the rebuilt expert against the original kept on disk
    from hf_cft.merging import LazyDelta

    orig = LazyDelta.from_file(tracked._fidelity_store().path("000")).materialize()
    rebuilt = tracked.merger.expert_delta("a")
    dot = sum(float((orig[k].double() * rebuilt[k].double()).sum()) for k in orig)
    norms = [sum(float((d[k].double() ** 2).sum()) for k in orig) ** 0.5 for d in (orig, rebuilt)]
    assert last["fidelity_cos/a"] == pytest.approx(dot / (norms[0] * norms[1]), rel=1e-9)


def test_condu_without_the_merging_package_names_it(tmp_path, toy_tokenizer, monkeypatch):
    import hf_cft.merging as merging

    monkeypatch.delattr(merging, "DeltaFusionMerger", raising=False)
    with pytest.raises(ContinualError, match="hf_cft.merging.DeltaFusionMerger"):
        _runner(ConDUStrategy(), tmp_path, toy_tokenizer).run()


# --------------------------------------------------------------------------- recipe


def _load_recipe():
    from tests_helpers import load_recipe

    return load_recipe("condu")


@pytest.mark.slow
def test_condu_recipe_runs_the_digits_stream_end_to_end(tmp_path):
    from huggingface_hub import ModelCard

    import hf_cft.merging as merging
    from hf_cft.data import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, format_prompts
    from hf_cft.recipe_utils import demo_clip

    model, tokenizer = demo_clip(format_prompts(DIGIT_CLASSNAMES, DIGIT_TEMPLATES), image_size=16)
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    strategies = ["zeroshot", "sequential", "independent"]
    if hasattr(merging, "DeltaFusionMerger"):
        strategies.append("condu")
    rec = _load_recipe()
    argv = ["--checkpoint", str(tmp_path / "clip"), "--benchmark", "digits", "--strategy", *strategies]
    argv += ["--max_steps", "2", "--warmup_steps", "0", "--per_device_train_batch_size", "8", "--use_cpu", "true"]
    argv += ["--output_dir", str(tmp_path / "out"), "--learning_rate", "1e-3"]
    args, config = rec.parse_recipe_args(
        rec.ConDURecipeArguments, ContinualConfig, args=argv, defaults=rec.RECIPE_DEFAULTS
    )
    assert config.max_steps == 2 and config.eval_batch_size == 256  # recipe default kept, flag overrides
    summary = rec.main(args, config)
    out = tmp_path / "out"
    assert list(summary["results"]) == strategies
    assert [t["name"] for t in summary["tasks"]] == ["digits-0-3", "digits-4-6", "digits-7-9"]
    saved = json.loads((out / "results.json").read_text())
    for name in strategies:
        m = json.loads((out / name / "accuracy_matrix.json").read_text())
        assert m["complete"] and saved["results"][name]["metrics"] == pytest.approx(m["metrics"])
        assert (out / name / "accuracy_matrix.png").is_file()
        card = ModelCard.load(out / name / "README.md")
        assert "continual-learning" in card.data.tags and name in card.data.tags
        index = card.data.to_dict()["model-index"][0]["results"]
        assert [r["metrics"][0]["value"] for r in index] == [round(v, 4) for v in m["values"][-1]]
    assert saved["results"]["independent"]["metrics"]["bwt"] == 0.0
    assert "| zeroshot |" in (out / "results.md").read_text()


# --------------------------------------------------------------------------- shared expert cache


def test_expert_cache_reuses_theta0_experts_across_strategies_and_keys_every_setting(
    reference_runs, tmp_path, toy_tokenizer
):
    ind_result, ind = reference_runs["independent"]
    cache = tmp_path / "cache"
    # 1. an independent run with a cache gives the reference results and fills the cache (one expert per task)
    first = IndependentExperts()
    r1 = _runner(first, tmp_path / "first", toy_tokenizer, expert_cache=str(cache)).run()
    np.testing.assert_array_equal(r1.matrix.values, ind_result.matrix.values)
    assert len(list(cache.glob("*.safetensors"))) == 3
    assert [h.get("expert_cache_hit") for h in r1.history] == [None] * 3
    # 2. another strategy with the same settings trains nothing: it reads the experts back (train() would raise)
    import hf_cft.continual.training as training

    def no_training(*a, **k):
        raise AssertionError("the cached expert should have been reused")

    original, training.train_expert = training.train_expert, no_training
    try:
        merge = DeltaMergeStrategy.from_function(
            "mean", lambda ds: {k: sum(d[k] for d in ds) / len(ds) for k in ds[0]}
        )
        r2 = _runner(merge, tmp_path / "second", toy_tokenizer, expert_cache=str(cache)).run()
    finally:
        training.train_expert = original
    assert [h["expert_cache_hit"] for h in r2.history] == [1.0] * 3
    assert [h["train_loss"] for h in r2.history] == [h["train_loss"] for h in r1.history]
    for key, v in merge.store.load("001").items():
        assert torch.equal(v, ind.expert_delta("b")[key])
    # 3. a setting that changes training (here the learning rate) misses the cache and trains its own experts
    other = IndependentExperts()
    _runner(other, tmp_path / "third", toy_tokenizer, expert_cache=str(cache), learning_rate=0.01).run()
    assert len(list(cache.glob("*.safetensors"))) == 6
    assert not torch.equal(other.expert_delta("a")[key], ind.expert_delta("a")[key])
    # 4. a chain's experts (trained from the previous model) never touch the cache
    _runner(SequentialFineTuning(), tmp_path / "fourth", toy_tokenizer, expert_cache=str(cache)).run()
    assert len(list(cache.glob("*.safetensors"))) == 6


def test_expert_cache_entry_torn_nonfinite_or_of_another_task_is_retrained_and_replaced(
    reference_runs, tmp_path, toy_tokenizer, caplog
):
    ind_result, ind = reference_runs["independent"]
    cache = tmp_path / "cache"
    _runner(IndependentExperts(), tmp_path / "first", toy_tokenizer, expert_cache=str(cache)).run()
    entries = sorted(cache.glob("*.safetensors"), key=lambda p: p.name)
    assert [p.name.split("-")[0] for p in entries] == ["a", "b", "c"]
    torn, nonfinite, foreign = entries
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a write cut short (not via atomic_path)
    bad = load_file(str(nonfinite))
    key = next(iter(bad))
    bad[key] = torch.full_like(bad[key], float("nan"))
    save_file(bad, str(nonfinite), {"task": "b"})
    save_file(bad | {key: torch.zeros_like(bad[key])}, str(foreign), {"task": "a"})  # finite, but another task's
    with caplog.at_level("WARNING", logger="hf_cft"):
        again = IndependentExperts()
        r = _runner(again, tmp_path / "second", toy_tokenizer, expert_cache=str(cache)).run()
    for path in entries:  # each bad entry is named, trained again (the same expert) and replaced atomically
        assert any(
            str(path) in rec.getMessage() and "training the expert again" in rec.getMessage() for rec in caplog.records
        ), path
    assert [h.get("expert_cache_hit") for h in r.history] == [None] * 3
    np.testing.assert_array_equal(r.matrix.values, ind_result.matrix.values)
    for path, name in zip(entries, "abc"):
        reread = load_file(str(path))
        assert reread.keys() == ind.expert_delta(name).keys()
        assert all(torch.equal(v, ind.expert_delta(name)[k]) for k, v in reread.items())
    assert not list(cache.glob(".*"))  # no temporaries left beside the entries


def test_expert_cache_that_is_a_file_fails_before_training(tmp_path, toy_tokenizer):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("x")
    with pytest.raises(ContinualError, match="expert_cache .*cache.* is not a writable folder"):
        _runner(IndependentExperts(), tmp_path / "run", toy_tokenizer, expert_cache=str(not_a_folder)).run()
    assert not (tmp_path / "run" / "store").exists()

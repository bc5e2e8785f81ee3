"""The merging baselines of ``docs/methods/pam.md`` §9 as continual-driver strategies (Protocol B rows of
``docs/benchmarks.md``), built on :class:`~hf_cft.continual.DeltaMergeStrategy` and the mergers of
:mod:`hf_cft.merging.baselines`.

| name | experts train from | after task t, deployed model | evaluation |
|---|---|---|---|
| ``task_arithmetic`` | θ⁰ | θ⁰ + λ·Σ_{i≤t} τ_i (continual form θ ← θ + λτ_t; λ = 0.3) | task-agnostic |
| ``ties`` | θ⁰ | λ × the TIES merge of the pair (unscaled merge so far, τ_t) (k = 0.2, λ = 1) | task-agnostic |
| ``magmax`` | θ_{t−1} (sequential chain, τ_t cumulative) | θ⁰ + λ·τ_MM, per entry the largest-magnitude τ_i (λ = 0.5) | task-agnostic |
| ``opcm`` | θ⁰ | θ⁰ + S_t·mean‖τ_i‖/‖S_t‖, S_t the orthogonally projected running sum (α = 0.5) | task-agnostic |
| ``running_mean`` | θ⁰ | θ⁰ + (1/t)·Σ_{i≤t} τ_i (uniform soup) | task-agnostic |
| ``wise`` | θ_{t−1} (sequential chain) | (1−α)θ⁰ + α·θ_t, WiSE-FT of the sequential model (α = 0.5) | task-agnostic |
| ``emr`` | θ⁰ | one-shot EMR over τ_1..τ_t: θ⁰ + λ_j·M_j ⊙ τ_uni for task j | task id (like ``independent``) |
| ``tall`` | θ⁰ | TALL masks over τ_1..τ_t: θ⁰ + m_j ⊙ Σ_i τ_i for task j (λ = 0.4) | task id |
| ``dare``, ``consensus``, ``tsv_m``, ``iso_c``, ``iso_cts``, ``breadcrumbs``, ``della``, ``model_stock`` | θ⁰ | the one-shot method of :mod:`hf_cft.merging` over τ_1..τ_t, re-run after each task | task-agnostic |
| ``slerp`` | θ⁰ | m_t = slerp(m_{t−1}, τ_t, 1/t), the spherical running mean | task-agnostic |
| ``regmean`` | θ⁰ | (Σ_i τ_i G̃_i)(Σ_i G̃_i)⁻¹ per linear from running sums, G_i on task i's train data (α = 0.6) | task-agnostic |
| ``fisher`` | θ⁰ | Σ_i F̂_i τ_i / Σ_i F̂_i per entry from running sums, F_i the diagonal Fisher on task i's train data | task-agnostic |

Every strategy keeps its experts (dense deltas θ_t − θ⁰; for LoRA the dense s·B·A, pam.md §9 "merge dense deltas")
on disk in ``store/experts`` and resumes exactly: the stateful mergers are rebuilt by replaying ``add`` over the
stored experts in order (deterministic on the same device), EMR is recomputed from them, and the sequential
chains (MagMax, WiSE) continue from the last stored expert.

Example::

    from hf_cft.continual import ContinualRunner, make_strategy

    runner = ContinualRunner(make_strategy("magmax", lam=0.5), tasks, clip, tokenizer, "outputs/magmax", config)
    runner.run()
"""

from __future__ import annotations

import functools
import time

from hf_cft.continual.strategies import (
    DeltaMergeStrategy,
    Strategy,
    check_choice,
    check_number,
    register_strategy,
    save_expert,
)
from hf_cft.continual.tasks import TaskSpec
from hf_cft.continual.weights import Delta, check_finite
from hf_cft.errors import BundleError, ContinualError


class SequentialWiSE:
    """Stateful merger for WiSE-FT of a sequential chain (pam.md §9): ``add(τ_t)`` returns α·τ_t, i.e. the deployed
    model (1−α)·θ⁰ + α·θ_t. Only the newest (cumulative) delta matters; the chain itself lives in the stored
    experts."""

    def __init__(self, alpha: float = 0.5):
        self.alpha = float(alpha)

    def add(self, delta: Delta) -> Delta:
        from hf_cft.merging.baselines import wise_ft

        return wise_ft(delta, self.alpha)


def task_arithmetic_strategy(lam: float = 0.3) -> DeltaMergeStrategy:
    """Task arithmetic, continual form (pam.md §9): θ ← θ + λτ_t after each task, experts from θ⁰ (λ = 0.3, lib)."""
    from hf_cft.merging.baselines import ContinualTaskArithmetic

    lam = check_number("task_arithmetic", "lam", lam)
    return DeltaMergeStrategy.from_merger("task_arithmetic", functools.partial(ContinualTaskArithmetic, lam), lam=lam)


def ties_strategy(
    k: float = 0.2, lam: float = 1.0, trim_scope: str = "tensor", disjoint_merge: str = "mean"
) -> DeltaMergeStrategy:
    """TIES, continual form (pam.md §9): the unscaled TIES merge of the pair (merged so far, τ_t), deployed ×λ
    (k = 0.2, λ = 1, lib); ``trim_scope`` and ``disjoint_merge`` are :func:`hf_cft.merging.baselines.ties`'s
    ``trim_scope`` and ``merge``."""
    from hf_cft.merging.baselines import DISJOINT_MERGES, TRIM_SCOPES, ContinualTIES

    k = check_number("ties", "k", k, 0.0, 1.0, low_open=True)
    lam = check_number("ties", "lam", lam)
    check_choice("ties", "trim_scope", trim_scope, TRIM_SCOPES)
    check_choice("ties", "disjoint_merge", disjoint_merge, DISJOINT_MERGES)
    # trim_scope and disjoint_merge are always recorded: a checkpoint written before the λ fix (issue 17 bug 2)
    # lacks them and holds other results, so it is refused on resume instead of continued with the fixed merger
    return DeltaMergeStrategy.from_merger(
        "ties",
        functools.partial(ContinualTIES, k, lam, trim_scope, disjoint_merge),
        k=k,
        lam=lam,
        trim_scope=trim_scope,
        disjoint_merge=disjoint_merge,
    )


def magmax_strategy(lam: float = 0.5, tie_break: str = "later") -> DeltaMergeStrategy:
    """MagMax (pam.md §9): *sequential* fine-tuning (θ_t starts from θ_{t−1}, τ_t = θ_t − θ⁰ cumulative), then per
    entry the largest-magnitude τ_i seen so far (the later task on ties, as the official code), deployed as
    θ⁰ + λ·τ_MM (λ = 0.5, the repository default)."""
    from hf_cft.merging.baselines import MAGMAX_TIE_BREAKS, MagMaxMerger

    lam = check_number("magmax", "lam", lam)
    check_choice("magmax", "tie_break", tie_break, MAGMAX_TIE_BREAKS)
    return DeltaMergeStrategy.from_merger(
        "magmax", functools.partial(MagMaxMerger, lam, tie_break), start_from="previous", lam=lam, tie_break=tie_break
    )


def opcm_strategy(alpha: float = 0.5, rank_rule: str = "at_most") -> DeltaMergeStrategy:
    """OPCM (pam.md §9): experts from θ⁰, each projected off the previous merged delta's leading singular
    directions and added to the running sum, deployed rescaled to the mean task-vector norm (α = 0.5);
    ``rank_rule`` as :class:`hf_cft.merging.baselines.OPCMMerger`."""
    from hf_cft.merging.baselines import OPCMMerger

    alpha = check_number("opcm", "alpha", alpha, 0.0, 1.0)
    check_choice("opcm", "rank_rule", rank_rule, OPCMMerger.RANK_RULES)
    settings = {"alpha": alpha} if rank_rule == "at_most" else {"alpha": alpha, "rank_rule": rank_rule}
    return DeltaMergeStrategy.from_merger(
        "opcm", functools.partial(OPCMMerger, alpha, rank_rule=rank_rule), **settings
    )


def running_mean_strategy() -> DeltaMergeStrategy:
    """Running mean / uniform soup of experts trained from θ⁰ (pam.md §9)."""
    from hf_cft.merging.baselines import RunningMean

    return DeltaMergeStrategy.from_merger("running_mean", RunningMean)


def wise_strategy(alpha: float = 0.5) -> DeltaMergeStrategy:
    """WiSE-FT of the sequential model with θ⁰ (pam.md §9): the chain θ_t trains from θ_{t−1} (the fine-tuned
    model, not the interpolated one) and (1−α)θ⁰ + αθ_t is deployed (α = 0.5, lib)."""
    alpha = check_number("wise", "alpha", alpha, 0.0, 1.0)
    return DeltaMergeStrategy.from_merger(
        "wise", functools.partial(SequentialWiSE, alpha), start_from="previous", alpha=alpha
    )


def _train_and_store(strategy, task: TaskSpec, index: int) -> Delta:
    """Reset the strategy's timings, train task ``index``'s expert from θ⁰ and store it under ``"{index:03d}"``;
    returns the expert's delta."""
    strategy.timings = {}
    delta = strategy.train_expert(task, index)
    save_expert(strategy.store, f"{index:03d}", delta, {"task": task.name})
    return delta


def _store_expert_and_merge(strategy, task: TaskSpec, index: int) -> None:
    """The ``learn`` step of the strategies that keep every expert on disk and re-merge them all (EMR, TALL): train
    task ``index``'s expert, store it under ``"{index:03d}"``, then call ``strategy._merge()`` and time it."""
    _train_and_store(strategy, task, index)  # the delta is on disk: not kept in memory
    key = f"{index:03d}"
    strategy.experts.append(key)
    strategy.task_names.append(task.name)
    t0 = time.perf_counter()
    strategy._merge()
    strategy.timings["merge_s"] = time.perf_counter() - t0


class EMRStrategy(Strategy):
    """One-shot EMR-merging (pam.md §9) over every expert so far, recomputed after each task; experts train from
    θ⁰ and stay on disk.

    EMR needs the task id: a learned task j is answered by θ⁰ + λ_j·M_j ⊙ τ_uni (its mask and rescaler from the
    latest merge), a task not learned yet by θ⁰, as for :class:`~hf_cft.continual.IndependentExperts` (EMR has no
    model for a task without a mask; Transfer is therefore zero-shot). A task-aware reference, not comparable with
    the task-agnostic rows.

    It streams like ConDU: every merge reads the stored experts as :class:`~hf_cft.merging.LazyDelta` files, slice
    by slice per key, and keeps the masks bit-packed, so memory holds τ_uni, T packed masks and a few slices, never
    the T experts or T unpacked masks; an evaluation builds one task's delta at a time. ``rescaler`` and
    ``zero_sign`` as :func:`hf_cft.merging.baselines.emr` (default: the official EMR code's per-tensor mean and
    σ = −1 on exact ties).

    Example::

        runner = ContinualRunner(EMRStrategy(), tasks, clip, tokenizer, "outputs/emr", config)
    """

    name = "emr"

    def __init__(self, rescaler: str = "mean", zero_sign: int = -1):
        from hf_cft.merging.baselines import EMR_RESCALERS, EMR_ZERO_SIGNS

        super().__init__()
        check_choice("emr", "rescaler", rescaler, EMR_RESCALERS)
        check_choice("emr", "zero_sign", zero_sign, EMR_ZERO_SIGNS)
        self.rescaler, self.zero_sign = rescaler, int(zero_sign)
        self.experts: list[str] = []  # store keys in learning order
        self.task_names: list[str] = []
        self.result = None  # hf_cft.merging.baselines.EMRResult over self.experts

    def settings(self) -> dict:
        return {"rescaler": self.rescaler, "zero_sign": self.zero_sign}

    def _merge(self) -> None:
        from hf_cft.merging import LazyDelta
        from hf_cft.merging.baselines import emr

        self.result = None  # the previous merge's τ_uni is dropped before the new one is built
        experts = [LazyDelta.from_file(self.store.path(k)) for k in self.experts]
        result = emr(experts, rescaler=self.rescaler, zero_sign=self.zero_sign)
        check_finite(result.unified, f"the EMR unified delta over {self.task_names}")
        self.result = result

    def learn(self, task: TaskSpec, index: int) -> None:
        _store_expert_and_merge(self, task, index)
        self.task_metrics.update({f"rescaler/{n}": float(r) for n, r in zip(self.task_names, self.result.rescalers)})

    def task_delta(self, name: str) -> Delta:
        if self.result is None or name not in self.task_names:
            raise ContinualError(f"EMR holds no task {name!r}; learned: {self.task_names}")
        return self.result.task_delta(self.task_names.index(name))

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        ev = self.context.evaluator
        if not learned or task.name not in self.task_names:
            return ev.accuracy(task)
        return ev.accuracy(task, self.task_delta(task.name))

    def state_dict(self):
        rescalers = list(self.result.rescalers) if self.result is not None else []
        return {}, {"experts": list(self.experts), "tasks": list(self.task_names), "rescalers": rescalers}

    def load_state_dict(self, tensors, metadata):
        self.experts = list(metadata.get("experts", []))
        self.task_names = list(metadata.get("tasks", []))
        if len(self.experts) != len(self.task_names):
            raise BundleError(f"EMR checkpoint lists {len(self.experts)} experts for tasks {self.task_names}")
        self.result = None
        if not self.experts:
            return
        missing = [n for n, k in zip(self.task_names, self.experts) if k not in self.store]
        if missing:
            raise BundleError(f"expert deltas of task(s) {missing} are missing from {self.store.directory}")
        self._merge()
        if [float(r) for r in self.result.rescalers] != [float(r) for r in metadata.get("rescalers", [])]:
            raise BundleError(
                f"EMR recomputed from {self.store.directory} gives rescalers {self.result.rescalers}, the checkpoint "
                f"{metadata.get('rescalers')}: the stored experts changed"
            )


def emr_strategy(rescaler: str = "mean", zero_sign: int = -1) -> EMRStrategy:
    """One-shot EMR over all experts so far, streamed from disk, evaluated with the task id (pam.md §9)."""
    return EMRStrategy(rescaler=rescaler, zero_sign=zero_sign)


# ------------------------------------------------------------------------------------------------ issue 18 methods


def _merge_so_far(name: str, fn, **options):
    """A one-shot merge re-run over every expert so far (experts from θ⁰), named for the strategy's errors."""

    def merge(deltas):
        return fn(deltas, **options)

    merge.__name__ = f"{name}_so_far"
    return merge


def dare_strategy(
    rho: float = 0.9, seed: int = 0, then: str = "ta", lam: float | None = None, rng: str = "torch"
) -> DeltaMergeStrategy:
    """DARE over the experts so far (pam.md §9): each expert dropped with rate ρ and rescaled by 1/(1−ρ), then task
    arithmetic or TIES; re-run after every task. A task's masks depend only on (seed, key, its position), so the
    experts already merged keep their masks as tasks arrive."""
    from hf_cft.merging.baselines import DARE_RNGS, dare

    rho = check_number("dare", "rho", rho, 0.0, 1.0)
    if rho >= 1.0:
        raise ContinualError(f"strategy 'dare': option rho must be < 1 (every entry would be dropped), got {rho!r}")
    check_choice("dare", "then", then, ("ta", "ties"))
    check_choice("dare", "rng", rng, DARE_RNGS)
    lam = (0.3 if then == "ta" else 1.0) if lam is None else check_number("dare", "lam", lam)
    extra = {"rng": rng} if rng != "torch" else {}  # the default stays out of the record (older runs resume)
    fn = _merge_so_far("dare", dare, rho=rho, seed=int(seed), then=then, lam=lam, **extra)
    return DeltaMergeStrategy.from_function("dare", fn, rho=rho, seed=int(seed), then=then, lam=lam, **extra)


def consensus_strategy(lambdas: float = 0.4, k: int = 2, lam: float = 0.3) -> DeltaMergeStrategy:
    """Consensus merging over the experts so far (task-agnostic): τ_MTL kept where ≥ k TALL masks agree, ×λ. While
    fewer than k tasks are learned, k is the number learned (with one task the consensus of one mask is that task's
    whole delta), so the first tasks are not answered by θ⁰."""
    from hf_cft.merging.baselines import consensus

    lambdas = check_number("consensus", "lambdas", lambdas, 0.0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ContinualError(f"strategy 'consensus': option k must be an integer ≥ 1, got {k!r}")
    lam = check_number("consensus", "lam", lam)

    def merge(deltas):
        return consensus(deltas, lambdas=lambdas, k=min(k, len(deltas)), lam=lam)

    return DeltaMergeStrategy.from_function("consensus", merge, lambdas=lambdas, k=k, lam=lam)


def _one_shot_strategy(name: str, fn_name: str, **options) -> DeltaMergeStrategy:
    from hf_cft.merging import methods

    return DeltaMergeStrategy.from_function(name, _merge_so_far(name, getattr(methods, fn_name), **options), **options)


def tsv_m_strategy(alpha: float = 1.0) -> DeltaMergeStrategy:
    """TSV-M over the experts so far (re-run after each task; r/T singular triplets per task, T tasks so far)."""
    return _one_shot_strategy("tsv_m", "tsv_m", alpha=check_number("tsv_m", "alpha", alpha))


def iso_c_strategy(alpha: float = 1.0) -> DeltaMergeStrategy:
    """Iso-C over the experts so far."""
    return _one_shot_strategy("iso_c", "iso_c", alpha=check_number("iso_c", "alpha", alpha))


def iso_cts_strategy(alpha: float = 1.0, common_fraction: float = 0.8) -> DeltaMergeStrategy:
    """Iso-CTS over the experts so far."""
    alpha = check_number("iso_cts", "alpha", alpha)
    common_fraction = check_number("iso_cts", "common_fraction", common_fraction, 0.0, 1.0)
    return _one_shot_strategy("iso_cts", "iso_cts", alpha=alpha, common_fraction=common_fraction)


def breadcrumbs_strategy(density: float = 0.1, gamma: float = 0.01, lam: float = 0.3) -> DeltaMergeStrategy:
    """Model Breadcrumbs over the experts so far: each expert's two-tailed mask is its own, so this is the continual
    task arithmetic of the masked experts."""
    density = check_number("breadcrumbs", "density", density, 0.0, 1.0, low_open=True)
    gamma = check_number("breadcrumbs", "gamma", gamma, 0.0, 1.0)
    if density + gamma > 1.0:
        raise ContinualError(f"strategy 'breadcrumbs': density + gamma must not exceed 1, got {density} + {gamma}")
    lam = check_number("breadcrumbs", "lam", lam)
    return _one_shot_strategy("breadcrumbs", "breadcrumbs", density=density, gamma=gamma, lam=lam)


def della_strategy(
    density: float = 0.3,
    epsilon: float = 0.1,
    lam: float = 1.0,
    seed: int = 0,
    rank_scope: str = "row",
    rng: str = "torch",
) -> DeltaMergeStrategy:
    """DELLA over the experts so far (MagPrune per expert, then TIES's election and disjoint mean)."""
    from hf_cft.merging.baselines import DARE_RNGS
    from hf_cft.merging.methods import DELLA_RANK_SCOPES

    density = check_number("della", "density", density, 0.0, 1.0, low_open=True)
    epsilon = check_number("della", "epsilon", epsilon, 0.0)
    if 1.0 - density - epsilon / 2 < 0.0 or 1.0 - density + epsilon / 2 >= 1.0:
        raise ContinualError(
            f"strategy 'della': epsilon={epsilon} with density={density} gives drop probabilities outside [0, 1)"
        )
    lam = check_number("della", "lam", lam)
    check_choice("della", "rank_scope", rank_scope, DELLA_RANK_SCOPES)
    check_choice("della", "rng", rng, DARE_RNGS)
    extra = {"rng": rng} if rng != "torch" else {}  # the default stays out of the record (older runs resume)
    return _one_shot_strategy(
        "della", "della", density=density, epsilon=epsilon, lam=lam, seed=int(seed), rank_scope=rank_scope, **extra
    )


def model_stock_strategy(average: str = "cosine") -> DeltaMergeStrategy:
    """Model Stock over the experts so far; with one expert (no angle yet) the expert itself is deployed (t = 1,
    the average of one model)."""
    from hf_cft.merging.methods import MODEL_STOCK_AVERAGES, model_stock

    check_choice("model_stock", "average", average, MODEL_STOCK_AVERAGES)

    def merge(deltas):
        if len(deltas) == 1:
            return {k: v.float().clone() for k, v in deltas[0].items()}
        return model_stock(deltas, average=average)

    return DeltaMergeStrategy.from_function("model_stock", merge, average=average)


def slerp_strategy(dot_threshold: float = 0.9995) -> DeltaMergeStrategy:
    """SLERP, continual form (:class:`~hf_cft.merging.ContinualSLERP`): m_t = slerp(m_{t−1}, τ_t, 1/t)."""
    from hf_cft.merging.methods import ContinualSLERP

    dot_threshold = check_number("slerp", "dot_threshold", dot_threshold, 0.0, 1.0)
    return DeltaMergeStrategy.from_merger(
        "slerp", functools.partial(ContinualSLERP, dot_threshold), dot_threshold=dot_threshold
    )


class TALLStrategy(Strategy):
    """TALL masks (arXiv:2405.07813; pam.md §9) over every expert so far, recomputed after each task; experts train
    from θ⁰ and stay on disk. A learned task j is answered by θ⁰ + m_j ⊙ τ_MTL with τ_MTL = Σ_i τ_i and
    m_j = 1[|τ_j| > λ·|τ_MTL − τ_j|]; a task not learned yet by θ⁰. It needs the task id: a task-aware reference,
    like :class:`EMRStrategy`, not comparable with the task-agnostic rows.

    It streams: τ_MTL and the masks are built key by key from the stored experts read as
    :class:`~hf_cft.merging.LazyDelta` files, the masks kept bit-packed (1 bit per entry and task).

    Example::

        runner = ContinualRunner(TALLStrategy(lambdas=0.4), tasks, clip, tokenizer, "outputs/tall", config)
    """

    name = "tall"

    def __init__(self, lambdas: float = 0.4):
        super().__init__()
        self.lambdas = check_number("tall", "lambdas", lambdas, 0.0)
        self.experts: list[str] = []
        self.task_names: list[str] = []
        self.mtl: Delta = {}
        self.packed: list[dict] = []

    def settings(self) -> dict:
        return {"lambdas": self.lambdas}

    def _merge(self) -> None:
        import torch

        from hf_cft.merging import LazyDelta, PackedMask

        self.mtl, self.packed = {}, [{} for _ in self.experts]
        experts = [LazyDelta.from_file(self.store.path(k)) for k in self.experts]
        for key in experts[0]:
            stacked = torch.stack([e[key].float() for e in experts])
            total = stacked.sum(dim=0)
            self.mtl[key] = total
            for t in range(len(experts)):
                self.packed[t][key] = PackedMask.pack(stacked[t].abs() > self.lambdas * (total - stacked[t]).abs())
        check_finite(self.mtl, f"the TALL multi-task delta over {self.task_names}")

    def learn(self, task: TaskSpec, index: int) -> None:
        _store_expert_and_merge(self, task, index)
        self.task_metrics.update(
            {
                f"mask_density/{n}": sum(m.count() for m in self.packed[i].values())
                / max(1, sum(v.numel() for v in self.mtl.values()))
                for i, n in enumerate(self.task_names)
            }
        )

    def task_delta(self, name: str) -> Delta:
        """m_j ⊙ τ_MTL for the learned task ``name``."""
        if name not in self.task_names:
            raise ContinualError(f"TALL holds no task {name!r}; learned: {self.task_names}")
        masks = self.packed[self.task_names.index(name)]
        return {k: masks[k].unpack(v.device).to(v.dtype) * v for k, v in self.mtl.items()}

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        ev = self.context.evaluator
        if not learned or task.name not in self.task_names:
            return ev.accuracy(task)
        return ev.accuracy(task, self.task_delta(task.name))

    def state_dict(self):
        return {}, {"experts": list(self.experts), "tasks": list(self.task_names)}

    def load_state_dict(self, tensors, metadata):
        self.experts = list(metadata.get("experts", []))
        self.task_names = list(metadata.get("tasks", []))
        if len(self.experts) != len(self.task_names):
            raise BundleError(f"TALL checkpoint lists {len(self.experts)} experts for tasks {self.task_names}")
        self.mtl, self.packed = {}, []
        missing = [n for n, k in zip(self.task_names, self.experts) if k not in self.store]
        if missing:
            raise BundleError(f"expert deltas of task(s) {missing} are missing from {self.store.directory}")
        if self.experts:
            self._merge()


class RegMeanStrategy(Strategy):
    """RegMean, continual form (arXiv:2212.09849): RegMean's closed form is a ratio of sums over the tasks, so it is
    exact incrementally. After task t trains its expert τ_t from θ⁰, the Gram matrices G_t of every ``nn.Linear``'s
    inputs are gathered on ``max_batches`` batches of the task's training data (θ⁰ + τ_t, image tower) and the
    state Σ_i τ_i G̃_i, Σ_i G̃_i (and Σ_i τ_i for the other keys) is updated; the deployed delta is
    (Σ_i τ_i G̃_i)(Σ_i G̃_i)⁻¹, the mean elsewhere: :func:`~hf_cft.merging.regmean` over the experts so far, without
    keeping their data. Task-agnostic. The experts are kept on disk (``store/experts``) as for the other merges."""

    name = "regmean"

    def __init__(self, alpha: float = 0.6, max_batches: int = 4):
        super().__init__()
        self.alpha = check_number("regmean", "alpha", alpha, 0.0, 1.0)
        if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
            raise ContinualError(f"strategy 'regmean': option max_batches must be an integer ≥ 1, got {max_batches!r}")
        self.max_batches = max_batches
        self.num: Delta = {}
        self.den: Delta = {}
        self.total: Delta = {}
        self.learned: list[str] = []
        self.merged: Delta = {}

    def settings(self) -> dict:
        return {"alpha": self.alpha, "max_batches": self.max_batches}

    def _deploy(self) -> None:
        from hf_cft.merging.data_dependent import _solve_right

        n = len(self.learned)
        out = {k: (v / n).float() for k, v in self.total.items()}
        out.update({k: _solve_right(self.num[k], self.den[k]).float() for k in self.num})
        check_finite(out, f"the regmean merge after task {self.learned[-1]!r}")
        self.merged = out

    def learn(self, task: TaskSpec, index: int) -> None:
        from hf_cft.merging.data_dependent import _reduce_off_diagonal, linear_input_grams

        delta = _train_and_store(self, task, index)
        t0 = time.perf_counter()
        ctx = self.context
        grams = linear_input_grams(
            ctx.base_model, ctx.evaluator.loader(task.train), delta=delta, max_batches=self.max_batches
        )
        for key, d in delta.items():
            if key in grams and d.ndim == 2:
                g = _reduce_off_diagonal(grams[key], self.alpha)
                term = d.double().cpu() @ g
                self.num[key] = self.num[key] + term if key in self.num else term
                self.den[key] = self.den[key] + g if key in self.den else g
            else:
                v = d.double().cpu()
                self.total[key] = self.total[key] + v if key in self.total else v
        self.learned.append(task.name)
        self._deploy()
        self.timings["merge_s"] = time.perf_counter() - t0

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        return self.context.evaluator.accuracy(task, self.merged or None)

    def state_dict(self):
        tensors = {f"{name}.{k}": v for name in ("num", "den", "total") for k, v in getattr(self, name).items()}
        return tensors, {"learned": list(self.learned)}

    def load_state_dict(self, tensors, metadata):
        self.learned = list(metadata.get("learned", []))
        for name in ("num", "den", "total"):
            prefix = f"{name}."
            setattr(self, name, {k[len(prefix) :]: v.double() for k, v in tensors.items() if k.startswith(prefix)})
        if self.learned and not (self.num or self.total):
            raise BundleError(f"regmean checkpoint lists tasks {self.learned} but holds no statistics")
        self.merged = {}
        if self.learned:
            self._deploy()


class FisherStrategy(Strategy):
    """Fisher merging, continual form (Matena & Raffel, arXiv:2111.09832): the merge
    τ* = Σ_i λ_i F̂_i ⊙ τ_i / Σ_i λ_i F̂_i (F̂ = F + ``floor``) is a ratio of sums over the tasks, so it is exact
    incrementally. After task t trains its expert τ_t from θ⁰, its diagonal Fisher F_t is gathered on ``max_batches``
    batches of the task's training data (θ⁰ + τ_t, the zero-shot head of the task's class names and templates,
    :func:`~hf_cft.merging.data_dependent.fisher_diagonal`), and the state Σ_i F̂_i ⊙ τ_i, Σ_i F̂_i is updated (each
    F_i divided by its L2 norm first with ``normalize=True``); the deployed delta is their ratio:
    :func:`~hf_cft.merging.fisher_merging` over the experts so far (λ_i = 1, the paper's default), without keeping
    their data or their Fishers. Task-agnostic. The experts are kept on disk (``store/experts``) as for the other
    merges."""

    name = "fisher"

    def __init__(
        self,
        labels: str = "sample",
        floor: float = 1e-6,
        normalize: bool = False,
        seed: int = 0,
        max_batches: int = 4,
    ):
        from hf_cft.merging.data_dependent import FISHER_LABELS

        super().__init__()
        check_choice("fisher", "labels", labels, FISHER_LABELS)
        self.labels = labels
        self.floor = check_number("fisher", "floor", floor, 0.0, None)
        if not isinstance(normalize, bool):
            raise ContinualError(f"strategy 'fisher': option normalize must be true or false, got {normalize!r}")
        self.normalize = normalize
        for option, value, low in (("seed", seed, 0), ("max_batches", max_batches, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ContinualError(f"strategy 'fisher': option {option} must be an integer ≥ {low}, got {value!r}")
        self.seed = seed
        self.max_batches = max_batches
        self.num: Delta = {}
        self.den: Delta = {}
        self.learned: list[str] = []
        self.merged: Delta = {}

    def settings(self) -> dict:
        return {
            "labels": self.labels,
            "floor": self.floor,
            "normalize": self.normalize,
            "seed": self.seed,
            "max_batches": self.max_batches,
        }

    def _deploy(self) -> None:
        out = {}
        for k, num in self.num.items():
            den = self.den[k]
            if bool((den == 0).any()):
                raise ContinualError(
                    f"strategy 'fisher': the Fisher weights of key {k!r} sum to 0 somewhere (floor=0 and no task's "
                    "data touched it); use floor > 0"
                )
            out[k] = (num / den).float()
        check_finite(out, f"the fisher merge after task {self.learned[-1]!r}")
        self.merged = out

    def add(self, delta: Delta, fisher: Delta, task_name: str) -> None:
        """Add one task's expert and its diagonal Fisher to the running sums and redeploy (what :meth:`learn` does
        after training; public for merging experts trained elsewhere)."""
        import math

        import torch

        from hf_cft.errors import NonFiniteError

        missing = [k for k in delta if k not in fisher]
        if missing:
            raise ContinualError(f"strategy 'fisher': task {task_name!r} has no Fisher for key {missing[0]!r}")
        for k in delta:
            if not bool(torch.isfinite(fisher[k]).all()) or bool((fisher[k] < 0).any()):
                raise NonFiniteError(
                    f"strategy 'fisher': the Fisher of key {k!r} on task {task_name!r}'s data holds NaN, inf or "
                    "negative values"
                )
        scale = 1.0
        if self.normalize:  # fisher_merging's rule: (F + floor) / (‖F‖ + floor)
            norm = math.sqrt(sum(float(fisher[k].double().pow(2).sum()) for k in delta)) + self.floor
            scale = 1.0 / norm if norm > 0 else 1.0
        for k, d in delta.items():
            weight = scale * (fisher[k].double().cpu() + self.floor)
            term = weight * d.double().cpu()
            self.num[k] = self.num[k] + term if k in self.num else term
            self.den[k] = self.den[k] + weight if k in self.den else weight
        self.learned.append(task_name)
        self._deploy()

    def learn(self, task: TaskSpec, index: int) -> None:
        from hf_cft.merging.data_dependent import clip_log_probs, fisher_diagonal

        delta = _train_and_store(self, task, index)
        t0 = time.perf_counter()
        ctx = self.context
        fisher = fisher_diagonal(
            ctx.base_model,
            ctx.evaluator.loader(task.train),
            clip_log_probs(ctx.tokenizer, task.classnames, task.templates),
            keys=list(delta),
            labels=self.labels,
            delta=delta,
            seed=self.seed,
            max_batches=self.max_batches,
        )
        self.add(delta, fisher, task.name)
        self.timings["merge_s"] = time.perf_counter() - t0

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        return self.context.evaluator.accuracy(task, self.merged or None)

    def state_dict(self):
        tensors = {f"{name}.{k}": v for name in ("num", "den") for k, v in getattr(self, name).items()}
        return tensors, {"learned": list(self.learned)}

    def load_state_dict(self, tensors, metadata):
        self.learned = list(metadata.get("learned", []))
        for name in ("num", "den"):
            prefix = f"{name}."
            setattr(self, name, {k[len(prefix) :]: v.double() for k, v in tensors.items() if k.startswith(prefix)})
        if sorted(self.num) != sorted(self.den):
            raise BundleError("fisher checkpoint: the running sums Σ F·τ and Σ F hold different keys")
        if self.learned and not self.num:
            raise BundleError(f"fisher checkpoint lists tasks {self.learned} but holds no statistics")
        self.merged = {}
        if self.learned:
            self._deploy()


def fisher_strategy(
    labels: str = "sample", floor: float = 1e-6, normalize: bool = False, seed: int = 0, max_batches: int = 4
) -> FisherStrategy:
    """Fisher merging, continual form: running sums of F̂_t·τ_t and F̂_t, F_t on each task's training data."""
    return FisherStrategy(labels=labels, floor=floor, normalize=normalize, seed=seed, max_batches=max_batches)


def regmean_strategy(alpha: float = 0.6, max_batches: int = 4) -> RegMeanStrategy:
    """RegMean, continual form: running sums of τ_t·G̃_t and G̃_t, Gram matrices on each task's training data."""
    return RegMeanStrategy(alpha=alpha, max_batches=max_batches)


def tall_strategy(lambdas: float = 0.4) -> TALLStrategy:
    """TALL masks over all experts so far, evaluated with the task id (pam.md §9)."""
    return TALLStrategy(lambdas=lambdas)


BASELINE_STRATEGIES = {
    "task_arithmetic": task_arithmetic_strategy,
    "ties": ties_strategy,
    "magmax": magmax_strategy,
    "opcm": opcm_strategy,
    "running_mean": running_mean_strategy,
    "wise": wise_strategy,
    "emr": emr_strategy,
    "dare": dare_strategy,
    "consensus": consensus_strategy,
    "tall": tall_strategy,
    "tsv_m": tsv_m_strategy,
    "iso_c": iso_c_strategy,
    "iso_cts": iso_cts_strategy,
    "breadcrumbs": breadcrumbs_strategy,
    "della": della_strategy,
    "model_stock": model_stock_strategy,
    "slerp": slerp_strategy,
    "regmean": regmean_strategy,
    "fisher": fisher_strategy,
}

for _name, _factory in BASELINE_STRATEGIES.items():
    register_strategy(_name, _factory)

__all__ = [
    "BASELINE_STRATEGIES",
    "EMRStrategy",
    "FisherStrategy",
    "SequentialWiSE",
    "TALLStrategy",
    "emr_strategy",
    "magmax_strategy",
    "opcm_strategy",
    "running_mean_strategy",
    "task_arithmetic_strategy",
    "ties_strategy",
    "wise_strategy",
]

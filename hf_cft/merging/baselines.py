"""Baseline model-merging methods on dense task deltas (pam.md §9), one-shot and continual.

A *delta* is a ``dict[str, torch.Tensor]`` keyed by the base model's state-dict keys: τ_t = θ_t − θ0 (for LoRA,
τ_t = ΔW_t = s·B_t·A_t per layer, built by :mod:`hf_cft.merging.deltas`). Every function here takes a list of such
deltas and returns a *merged delta* τ_m, key by key, in fp32, so that the deployed model is θ = θ0 + τ_m. All
scaling coefficients (λ, α) are already applied to the returned delta.

Why dense deltas and not LoRA factors: signs, magnitudes, masks and SVDs of A or B alone are meaningless because of
the factor symmetry (B, A) → (BR⁻¹, RA) (pam.md §9). Only PAM merges factors (see :mod:`hf_cft.merging.pam`).

One-shot methods (a list of deltas → one merged delta):

=====================  ==============================================================================
:func:`task_arithmetic`  λ·Σ_t τ_t (λ = 0.3)
:func:`running_mean`     (1/T)·Σ_t τ_t, the uniform soup
:func:`wise_ft`          α·τ for one fine-tuned model (α = 0.5)
:func:`magnitude_prune`  λ·Σ_t trim_k(τ_t), task arithmetic on top-k trimmed deltas (peft's ``magnitude_prune``)
:func:`ties`             trim top-k %, elect sign, disjoint mean, ×λ (k = 0.2, λ = 1)
:func:`dare`             Bernoulli drop with rate ρ and 1/(1−ρ) rescale, then TA or TIES (ρ = 0.9)
:func:`magmax`           per entry the largest-magnitude τ_t, ×λ (λ = 0.5; τ_t cumulative)
:func:`emr`              unified vector + per-task masks and rescalers (task-aware reference)
:func:`tall_masks`       τ_MTL + per-task TALL masks (task-aware reference)
:func:`consensus`        τ_MTL kept where ≥ k TALL masks agree, ×λ (task-agnostic)
=====================  ==============================================================================

Continual forms (a stream of deltas; ``.add(delta)`` returns the merged delta after that task):
:class:`ContinualTaskArithmetic`, :class:`RunningMean`, :class:`ContinualTIES`, :class:`MagMaxMerger`,
:class:`OPCMMerger`. Their ``state_dict()`` / ``load_state_dict()`` hold everything needed to resume a stream.

Example::

    from hf_cft.merging.baselines import ties, ContinualTaskArithmetic

    merged = ties([delta_1, delta_2, delta_3], k=0.2, lam=1.0)       # {key: fp32 tensor}
    ta = ContinualTaskArithmetic(lam=0.3)
    for delta in stream:
        deployed = ta.add(delta)                                       # θ = θ0 + deployed

Bad input raises typed errors: an empty list → :class:`~hf_cft.errors.TaskError`; keys or shapes that differ
between deltas → :class:`~hf_cft.errors.DeltaError` naming the key; NaN/inf → :class:`~hf_cft.errors.NonFiniteError`
naming the key and the task index.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hf_cft.errors import DeltaError, MergeConfigError, NonFiniteError, TaskError
from hf_cft.validation import check_choice, check_int, check_number

Delta = dict[str, Tensor]

__all__ = [
    "ContinualMerger",
    "ContinualTIES",
    "ContinualTaskArithmetic",
    "EMRResult",
    "MagMaxMerger",
    "OPCMMerger",
    "RunningMean",
    "TallMasksResult",
    "consensus",
    "dare",
    "emr",
    "emr_task_delta",
    "magmax",
    "magnitude_prune",
    "running_mean",
    "task_arithmetic",
    "tall_masks",
    "ties",
    "trim_top_k",
    "wise_ft",
]


# ------------------------------------------------------------------------------------------------ validation


def _check_delta_against(delta: Mapping[str, Tensor], ref: Mapping[str, tuple], index: int) -> None:
    """Raise unless ``delta`` has exactly the keys of ``ref`` (key → shape), the same shapes and finite values."""
    if not isinstance(delta, Mapping):
        raise DeltaError(f"delta of task {index} is a {type(delta).__name__}, expected a dict of tensors.")
    for key in ref:
        if key not in delta:
            raise DeltaError(f"delta of task {index} lacks key {key!r} that the other deltas have.")
    for key in delta:
        if key not in ref:
            raise DeltaError(f"delta of task {index} has key {key!r} that the other deltas lack.")
        value = delta[key]
        if not isinstance(value, Tensor):
            raise DeltaError(f"key {key!r} of task {index} is a {type(value).__name__}, not a tensor.")
        if tuple(value.shape) != ref[key]:
            raise DeltaError(
                f"key {key!r} has shape {tuple(value.shape)} in task {index} but {ref[key]} in the other deltas."
            )
        if value.is_floating_point() or value.is_complex():
            if not bool(torch.isfinite(value).all()):
                raise NonFiniteError(f"delta of task {index} holds NaN or inf at key {key!r}.")
        elif value.dtype == torch.bool:
            raise DeltaError(f"key {key!r} of task {index} is a bool tensor, not a delta.")


def _check_deltas(deltas: Sequence[Mapping[str, Tensor]], what: str = "deltas") -> list[Mapping[str, Tensor]]:
    """Validate a non-empty list of deltas with identical keys and shapes and finite values."""
    if isinstance(deltas, Mapping):
        raise TaskError(f"{what} must be a list of deltas (dicts), got one dict; wrap it in a list.")
    deltas = list(deltas)
    if not deltas:
        raise TaskError(f"{what} is empty: at least one task delta is needed.")
    first = deltas[0]
    if not isinstance(first, Mapping):
        raise DeltaError(f"delta of task 0 is a {type(first).__name__}, expected a dict of tensors.")
    if not first:
        raise DeltaError("delta of task 0 has no keys.")
    for key, value in first.items():
        if not isinstance(value, Tensor):
            raise DeltaError(f"key {key!r} of task 0 is a {type(value).__name__}, not a tensor.")
    ref = {k: tuple(v.shape) for k, v in first.items() if isinstance(v, Tensor)}
    for i, delta in enumerate(deltas):
        _check_delta_against(delta, ref, i)
    return deltas


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def _check_fraction(name: str, value: float, low_open: bool = True) -> float:
    """``value`` as a float in (0, 1] (``low_open``) or [0, 1], else :class:`MergeConfigError` naming ``name``."""
    return check_number(value, name, low=0.0, high=1.0, low_open=low_open, error=MergeConfigError)


def _weights(lam: float | Sequence[float], n: int, name: str = "lam") -> list[float]:
    if isinstance(lam, (int, float)):
        return [check_number(lam, name, error=MergeConfigError)] * n
    values = list(lam)
    if len(values) != n:
        raise TaskError(f"{name} has {len(values)} values but there are {n} task deltas.")
    return [check_number(v, f"{name} for task {i}", error=MergeConfigError) for i, v in enumerate(values)]


def _finite_result(delta: Delta, blame: str) -> Delta:
    """``delta`` when every entry is finite; else :class:`MergeConfigError` blaming ``blame`` (the option that
    scaled finite inputs out of float range, e.g. ``alpha=1e308``) and naming the first overflowing key."""
    for key, v in delta.items():
        if not bool(torch.isfinite(v).all()):
            raise MergeConfigError(
                f"{blame} scales the finite delta at key {key!r} beyond the float range (inf); use a smaller value."
            )
    return delta


# ------------------------------------------------------------------------------------------------ building blocks


def trim_top_k(tensor: Tensor, k: float) -> Tensor:
    """Keep the top-``k`` fraction of entries of ``tensor`` by magnitude, zero the rest (TIES step 1, pam.md §9).

    Keeps ``max(1, floor(k·numel))`` entries (ties at the threshold broken by ``torch.topk``). peft's
    ``magnitude_based_pruning`` keeps ``floor(density·numel)``: the two agree except on tensors so small that
    ``floor(k·numel) = 0``, which peft zeroes entirely and this keeps one entry of.
    """
    k = _check_fraction("k", k)
    n = tensor.numel()
    keep = max(1, int(k * n))
    if keep >= n:
        return tensor.clone()
    flat = tensor.reshape(-1)
    idx = torch.topk(flat.abs(), keep, largest=True, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(tensor)


def _elect_disjoint_mean(stacked: Tensor) -> Tensor:
    """TIES steps 2–3 on deltas stacked on dim 0: σ = sign(Σ_t τ_t), then the mean over the non-zero entries whose
    sign equals σ. Where Σ_t τ_t = 0 exactly, σ = 0 and the result is 0 (peft elects + there instead)."""
    elected = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == elected) & (elected != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return (stacked * agree).sum(dim=0) / count


def _key_seed(seed: int, key: str) -> int:
    """A per-key seed, so that DARE's mask for one key does not depend on the other keys or their order (deltas
    can be merged tensor by tensor)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63 - 1)


def _dare_drop(tensors: list[Tensor], rho: float, seed: int, key: str) -> list[Tensor]:
    """τ̃ = m ⊙ τ / (1 − ρ), m ~ Bernoulli(1 − ρ), one generator per key seeded from (seed, key), tasks in order."""
    if rho == 0.0:
        return tensors
    gen = torch.Generator(device=tensors[0].device)
    gen.manual_seed(_key_seed(seed, key))
    keep = 1.0 - rho
    out = []
    for t in tensors:
        mask = torch.bernoulli(torch.full_like(t, keep), generator=gen)
        out.append(t * mask / keep)
    return out


# ------------------------------------------------------------------------------------------------ one-shot methods


def task_arithmetic(deltas: Sequence[Mapping[str, Tensor]], lam: float | Sequence[float] = 0.3) -> Delta:
    """Task arithmetic (arXiv:2212.04089; pam.md §9): τ_m = λ·Σ_t τ_t.

    ``lam`` is one λ for all tasks (default 0.3, lib; tune on validation) or one per task, which is peft's
    ``task_arithmetic(task_tensors, weights)`` with ``weights = lam``.
    """
    deltas = _check_deltas(deltas)
    w = _weights(lam, len(deltas))
    return _finite_result(
        {key: sum(wi * _f32(d[key]) for wi, d in zip(w, deltas)) for key in deltas[0]}, f"lam={lam!r}"
    )


def running_mean(deltas: Sequence[Mapping[str, Tensor]]) -> Delta:
    """Uniform soup (pam.md §9): τ_m = (1/T)·Σ_t τ_t, i.e. θ̄_T of the running mean θ̄_t = ((t−1)/t)θ̄_{t−1} + θ_t/t."""
    deltas = _check_deltas(deltas)
    n = len(deltas)
    return {key: sum(_f32(d[key]) for d in deltas) / n for key in deltas[0]}


def wise_ft(delta: Mapping[str, Tensor], alpha: float = 0.5) -> Delta:
    """WiSE-FT (arXiv:2109.01903; pam.md §9): θ = (1−α)θ0 + αθ_ft, so the merged delta is α·τ (α = 0.5, lib)."""
    (delta,) = _check_deltas([delta], what="delta")
    alpha = check_number(alpha, "alpha", error=MergeConfigError)
    return _finite_result({key: alpha * _f32(v) for key, v in delta.items()}, f"alpha={alpha!r}")


def magnitude_prune(
    deltas: Sequence[Mapping[str, Tensor]], k: float = 0.2, lam: float | Sequence[float] = 0.3
) -> Delta:
    """Task arithmetic on trimmed deltas: τ_m = Σ_t λ_t·trim_k(τ_t) (peft's ``magnitude_prune`` with
    ``density = k``, ``weights = lam``). The trim is TIES's step 1, per task and per tensor (:func:`trim_top_k`)."""
    deltas = _check_deltas(deltas)
    k = _check_fraction("k", k)
    w = _weights(lam, len(deltas))
    return {key: sum(wi * trim_top_k(_f32(d[key]), k) for wi, d in zip(w, deltas)) for key in deltas[0]}


def ties(deltas: Sequence[Mapping[str, Tensor]], k: float = 0.2, lam: float = 1.0) -> Delta:
    """TIES-merging (arXiv:2306.01708; pam.md §9), key by key:

    1. τ̃_t = the top-``k`` fraction of τ_t's entries by magnitude (per task, per tensor; the TIES paper trims over
       the whole flattened model, peft and hf_cft per tensor);
    2. σ = sign(Σ_t τ̃_t);
    3. τ_m = mean of τ̃_t over the tasks whose entry is non-zero with sign σ (0 where none);

    returns λ·τ_m (k = 0.2, λ = 1; lib). Equals peft's ``ties(weights=[λ]*T, density=k)`` except where
    Σ_t τ̃_t = 0 exactly (peft elects +, here σ = 0 gives 0) and on tiny tensors (see :func:`trim_top_k`).
    """
    deltas = _check_deltas(deltas)
    k = _check_fraction("k", k)
    lam = _weights(lam, 1)[0]
    out = {}
    for key in deltas[0]:
        stacked = torch.stack([trim_top_k(_f32(d[key]), k) for d in deltas])
        out[key] = lam * _elect_disjoint_mean(stacked)
    return _finite_result(out, f"lam={lam!r}")


def dare(
    deltas: Sequence[Mapping[str, Tensor]],
    rho: float = 0.9,
    seed: int = 0,
    then: str = "ta",
    lam: float | None = None,
) -> Delta:
    """DARE (arXiv:2311.03099; pam.md §9): τ̃_t = m_t ⊙ τ_t/(1−ρ), m_t ~ Bernoulli(1−ρ), then task arithmetic or TIES.

    Args:
        rho: drop rate ρ ∈ [0, 1) (0.9, lib). peft's ``density`` is 1 − ρ.
        seed: the masks are drawn from a ``torch.Generator`` (on the deltas' device) seeded per key from
            ``(seed, key)``, tasks in list order, so the result is reproducible and independent of the other keys
            (CPU and CUDA generators draw different masks for the same seed).
        then: ``"ta"`` → λ·Σ_t τ̃_t (peft ``dare_linear``); ``"ties"`` → λ·(elect sign + disjoint mean of τ̃_t)
            (peft ``dare_ties``): DARE's random drop replaces TIES's magnitude trim, as in the DARE paper.
        lam: λ; defaults to 0.3 for ``"ta"`` and 1.0 for ``"ties"`` (the defaults of those methods).
    """
    deltas = _check_deltas(deltas)
    rho = check_number(rho, "rho (the drop rate)", low=0.0, high=1.0, high_open=True, error=MergeConfigError)
    check_choice(then, "then", ("ta", "ties"), error=MergeConfigError)
    lam = _weights((0.3 if then == "ta" else 1.0) if lam is None else lam, 1)[0]
    out = {}
    for key in deltas[0]:
        dropped = _dare_drop([_f32(d[key]) for d in deltas], rho, seed, key)
        if then == "ta":
            out[key] = lam * sum(dropped)
        else:
            out[key] = lam * _elect_disjoint_mean(torch.stack(dropped))
    return _finite_result(out, f"lam={lam!r} (with the 1/(1-rho) rescale)")


def magmax(deltas: Sequence[Mapping[str, Tensor]], lam: float = 0.5) -> Delta:
    """MagMax (danielm1405/magmax; pam.md §9): τ_MM[j] = τ_{t*}[j], t* = argmax_t |τ_t[j]| (first task on ties);
    returns λ·τ_MM (λ = 0.5, the repository default).

    MagMax assumes *sequential* fine-tuning: θ_t starts from θ_{t−1} and τ_t = θ_t − θ0 is cumulative. On
    independently fine-tuned deltas it still runs, but it is then not the method of the paper.
    """
    deltas = _check_deltas(deltas)
    lam = _weights(lam, 1)[0]
    out = {}
    for key in deltas[0]:
        stacked = torch.stack([_f32(d[key]) for d in deltas])
        winner = stacked.abs().argmax(dim=0, keepdim=True)
        out[key] = lam * stacked.gather(0, winner).squeeze(0)
    return _finite_result(out, f"lam={lam!r}")


@dataclass
class EMRResult:
    """EMR-merging output: the unified delta τ_uni, one boolean mask M_t per task and one scalar rescaler λ_t.

    The task-t model is θ0 + λ_t·M_t ⊙ τ_uni (:meth:`task_delta`). It needs the task id at inference, so EMR is a
    task-aware reference, not comparable with PAM (pam.md §9).
    """

    unified: Delta
    masks: list[dict[str, Tensor]]
    rescalers: list[float]

    @property
    def num_tasks(self) -> int:
        return len(self.masks)

    def task_delta(self, i: int) -> Delta:
        """λ_i·M_i ⊙ τ_uni, the delta of task ``i`` (0-based)."""
        if not -self.num_tasks <= i < self.num_tasks:
            raise TaskError(f"task index {i} is out of range: EMR merged {self.num_tasks} task(s).")
        mask, scale = self.masks[i], self.rescalers[i]
        return {key: scale * mask[key].to(v.dtype) * v for key, v in self.unified.items()}


def emr(deltas: Sequence[Mapping[str, Tensor]]) -> EMRResult:
    """EMR-merging (arXiv:2405.17461; pam.md §9).

    * σ = sign(Σ_t τ_t); ε_j = max |τ_{t,j}| over the tasks whose sign agrees with σ_j; τ_uni = σ ⊙ ε.
    * M_t = 1[τ_t ⊙ σ > 0]; λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|, both sums over all keys (one scalar per task). Where the
      denominator is 0 the mask is empty and the task delta is 0 whatever λ_t is; λ_t is then set to 0.
    """
    deltas = _check_deltas(deltas)
    n = len(deltas)
    unified: Delta = {}
    masks: list[dict[str, Tensor]] = [{} for _ in range(n)]
    num = [0.0] * n
    den = [0.0] * n
    for key in deltas[0]:
        stacked = torch.stack([_f32(d[key]) for d in deltas])
        sigma = torch.sign(stacked.sum(dim=0))
        agree = stacked * sigma > 0
        eps = (stacked.abs() * agree).amax(dim=0)
        uni = sigma * eps
        unified[key] = uni
        for t in range(n):
            masks[t][key] = agree[t]
            num[t] += float(stacked[t].abs().sum(dtype=torch.float64))
            den[t] += float((uni * agree[t]).abs().sum(dtype=torch.float64))
    rescalers = [nt / dt if dt > 0 else 0.0 for nt, dt in zip(num, den)]
    return EMRResult(unified=unified, masks=masks, rescalers=rescalers)


def emr_task_delta(result: EMRResult, i: int) -> Delta:
    """The EMR delta of task ``i``: λ_i·M_i ⊙ τ_uni (same as ``result.task_delta(i)``)."""
    return result.task_delta(i)


@dataclass
class TallMasksResult:
    """TALL masks output: τ_MTL = Σ_t τ_t and one boolean mask m_t per task; task-t model θ0 + m_t ⊙ τ_MTL."""

    mtl: Delta
    masks: list[dict[str, Tensor]]

    @property
    def num_tasks(self) -> int:
        return len(self.masks)

    def task_delta(self, i: int) -> Delta:
        """m_i ⊙ τ_MTL, the delta of task ``i`` (0-based; needs the task id at inference)."""
        if not -self.num_tasks <= i < self.num_tasks:
            raise TaskError(f"task index {i} is out of range: TALL masks were built for {self.num_tasks} task(s).")
        return {key: self.masks[i][key].to(v.dtype) * v for key, v in self.mtl.items()}


def tall_masks(deltas: Sequence[Mapping[str, Tensor]], lambdas: float | Sequence[float] = 0.4) -> TallMasksResult:
    """TALL masks (arXiv:2405.07813; pam.md §9): τ_MTL = Σ_t τ_t, m_t = 1[|τ_t| > λ_t·|τ_MTL − τ_t|].

    ``lambdas`` is one λ_t for all tasks or one per task; the paper picks each in {0.2, …, 0.6} on validation
    data, 0.4 (the middle of that grid) is the library default.
    """
    deltas = _check_deltas(deltas)
    lams = _weights(lambdas, len(deltas), name="lambdas")
    mtl: Delta = {}
    masks: list[dict[str, Tensor]] = [{} for _ in deltas]
    for key in deltas[0]:
        stacked = torch.stack([_f32(d[key]) for d in deltas])
        total = stacked.sum(dim=0)
        mtl[key] = total
        for t, lam_t in enumerate(lams):
            masks[t][key] = stacked[t].abs() > lam_t * (total - stacked[t]).abs()
    return TallMasksResult(mtl=mtl, masks=masks)


def consensus(
    deltas: Sequence[Mapping[str, Tensor]],
    lambdas: float | Sequence[float] = 0.4,
    k: int = 2,
    lam: float = 0.3,
) -> Delta:
    """Consensus merging (arXiv:2405.07813; pam.md §9), task-agnostic: keep the entries of τ_MTL that at least
    ``k`` TALL masks select (k = 2) and return λ·(mask ⊙ τ_MTL) (λ = 0.3, lib: the task-arithmetic default).

    Raises :class:`~hf_cft.errors.TaskError` if ``k`` exceeds the number of tasks (every entry would be dropped).
    """
    deltas = _check_deltas(deltas)
    k = check_int(k, "k", low=0, error=MergeConfigError)
    if k > len(deltas):
        raise TaskError(
            f"consensus k={k} exceeds the number of tasks ({len(deltas)}): no entry could be kept; lower k."
        )
    lam = _weights(lam, 1)[0]
    tall = tall_masks(deltas, lambdas)
    out = {}
    for key, total in tall.mtl.items():
        votes = torch.stack([m[key] for m in tall.masks]).sum(dim=0)
        out[key] = lam * (votes >= k).to(total.dtype) * total
    return out


# ------------------------------------------------------------------------------------------------ continual forms


class ContinualMerger:
    """Base of the continual (stream) forms: ``add(delta)`` after each task returns the merged delta to deploy.

    Subclasses implement ``_add(delta_fp32)`` and ``_merged()``, and list their tensor state in ``_state_names``.
    Every added delta must have the keys and shapes of the first one (else :class:`DeltaError`), and finite values
    (else :class:`NonFiniteError` naming the key and the task index, 0-based).
    """

    _state_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.num_tasks = 0
        self._shapes: dict[str, tuple] | None = None

    def add(self, delta: Mapping[str, Tensor]) -> Delta:
        """Fold task ``self.num_tasks``'s delta into the state and return the merged delta (fresh tensors)."""
        if self._shapes is None:
            (delta,) = _check_deltas([delta], what="delta")
            self._shapes = {k: tuple(v.shape) for k, v in delta.items()}
        else:
            _check_delta_against(delta, self._shapes, self.num_tasks)
        self._add({k: _f32(v) for k, v in delta.items()})
        self.num_tasks += 1
        return self.merged

    @property
    def merged(self) -> Delta:
        """The merged delta after the tasks added so far."""
        if self.num_tasks == 0:
            raise TaskError(f"{type(self).__name__} has no task yet: call add(delta) first.")
        return {k: v.clone() for k, v in self._merged().items()}

    def _add(self, delta: Delta) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _merged(self) -> Delta:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- resume support: a flat dict of tensors (safetensors-friendly)

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to resume: ``"<state>.<key>"`` tensors plus ``"meta.num_tasks"`` (and extras)."""
        out = {"meta.num_tasks": torch.tensor(self.num_tasks, dtype=torch.int64)}
        for name in self._state_names:
            for key, value in getattr(self, name).items():
                out[f"{name}.{key}"] = value.detach().clone()
        out.update(self._extra_state())
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore a state written by :meth:`state_dict`."""
        if "meta.num_tasks" not in state:
            raise DeltaError(f"{type(self).__name__} state lacks 'meta.num_tasks'.")
        num_tasks = int(state["meta.num_tasks"])
        for name in self._state_names:
            prefix = f"{name}."
            values = {k[len(prefix) :]: _f32(v).clone() for k, v in state.items() if k.startswith(prefix)}
            if num_tasks > 0 and not values:
                raise DeltaError(f"{type(self).__name__} state lacks the {name!r} tensors.")
            for key, value in values.items():
                if not bool(torch.isfinite(value).all()):
                    raise NonFiniteError(f"{type(self).__name__} state holds NaN or inf at {name}.{key}.")
            setattr(self, name, values)
        self._load_extra_state(state)
        self.num_tasks = num_tasks
        first = self._state_names[0] if self._state_names else None
        self._shapes = {k: tuple(v.shape) for k, v in getattr(self, first).items()} if num_tasks and first else None

    def _extra_state(self) -> dict[str, Tensor]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        return None


class ContinualTaskArithmetic(ContinualMerger):
    """Task arithmetic, continual form (pam.md §9): θ ← θ + λτ_t after each task, i.e. merged = λ·Σ_{i≤t} τ_i."""

    _state_names = ("total",)

    def __init__(self, lam: float = 0.3) -> None:
        super().__init__()
        self.lam = _weights(lam, 1)[0]
        self.total: Delta = {}

    def _add(self, delta: Delta) -> None:
        for key, value in delta.items():
            self.total[key] = self.total[key] + value if key in self.total else value.clone()

    def _merged(self) -> Delta:
        return {k: self.lam * v for k, v in self.total.items()}


class RunningMean(ContinualMerger):
    """Running mean / uniform soup (pam.md §9): θ̄_t = ((t−1)/t)·θ̄_{t−1} + (1/t)·θ_t, on deltas."""

    _state_names = ("mean",)

    def __init__(self) -> None:
        super().__init__()
        self.mean: Delta = {}

    def _add(self, delta: Delta) -> None:
        t = self.num_tasks + 1
        for key, value in delta.items():
            self.mean[key] = self.mean[key] * ((t - 1) / t) + value / t if key in self.mean else value.clone()

    def _merged(self) -> Delta:
        return self.mean


class ContinualTIES(ContinualMerger):
    """TIES, continual form (pam.md §9): after the first task the merged delta is τ_1 (nothing to merge with; lib),
    then m_t = :func:`ties` ([m_{t−1}, τ_t], k, λ) on the pair (current merged delta, new delta)."""

    _state_names = ("current",)

    def __init__(self, k: float = 0.2, lam: float = 1.0) -> None:
        super().__init__()
        self.k = _check_fraction("k", k)
        self.lam = _weights(lam, 1)[0]
        self.current: Delta = {}

    def _add(self, delta: Delta) -> None:
        if not self.current:
            self.current = {k: v.clone() for k, v in delta.items()}
        else:
            self.current = ties([self.current, delta], k=self.k, lam=self.lam)

    def _merged(self) -> Delta:
        return self.current


class MagMaxMerger(ContinualMerger):
    """MagMax, continual form (pam.md §9): keeps τ_MM[j] = the largest-magnitude value seen so far at entry j (the
    earlier task on ties) and returns λ·τ_MM (λ = 0.5).

    Feed it *cumulative* deltas τ_t = θ_t − θ0 of sequential fine-tuning (θ_t starts from θ_{t−1}), as MagMax
    assumes; with independent deltas it runs but is not the published method.
    """

    _state_names = ("best",)

    def __init__(self, lam: float = 0.5) -> None:
        super().__init__()
        self.lam = _weights(lam, 1)[0]
        self.best: Delta = {}

    def _add(self, delta: Delta) -> None:
        for key, value in delta.items():
            if key not in self.best:
                self.best[key] = value.clone()
            else:
                self.best[key] = torch.where(value.abs() > self.best[key].abs(), value, self.best[key])

    def _merged(self) -> Delta:
        return {k: self.lam * v for k, v in self.best.items()}


def default_opcm_linear_key(key: str, tensor: Tensor) -> bool:
    """Which deltas OPCM projects: 2-D weights that are not embeddings (``nn.Linear`` weights in CLIP/SigLIP)."""
    return tensor.ndim == 2 and key.endswith("weight") and "embed" not in key.lower()


class OPCMMerger(ContinualMerger):
    """OPCM, orthogonal-projection continual merging (arXiv:2501.09522; pam.md §9).

    For each linear weight, with U S Vᵀ the *full* SVD of the previous merged delta S_{t−1}: P = Uᵀ τ_t V; zero P's
    diagonal and its leading r_α × r_α block, r_α = the number of leading singular values whose cumulative share of
    Σ S does not exceed α (α = 0.5); τ′_t = U P Vᵀ. Other parameters keep τ′_t = τ_t. The running sum
    S_t = S_{t−1} + τ′_t is deployed as S_t · mean_i ‖τ_i‖ / ‖S_t‖, norms over all parameters. (The SVD of the
    deployed, rescaled delta has the same U, V and r_α, so S_{t−1} is used directly.)

    Args:
        alpha: α ∈ [0, 1].
        linear_keys: which keys are linear weights: a predicate ``(key, tensor) -> bool`` or a set of keys
            (default :func:`default_opcm_linear_key`).
    """

    _state_names = ("total",)

    def __init__(
        self,
        alpha: float = 0.5,
        linear_keys: Callable[[str, Tensor], bool] | Iterable[str] | None = None,
    ) -> None:
        super().__init__()
        self.alpha = _check_fraction("alpha", alpha, low_open=False)
        if linear_keys is None:
            self._is_linear = default_opcm_linear_key
        elif callable(linear_keys):
            self._is_linear = linear_keys
        else:
            keys = set(linear_keys)
            self._is_linear = lambda key, tensor: key in keys and tensor.ndim == 2
        self.total: Delta = {}
        self.norms: list[float] = []

    @staticmethod
    def split_rank(singular_values: Tensor, alpha: float) -> int:
        """r_α: number of leading singular values whose cumulative share of their sum is ≤ α."""
        total = singular_values.sum()
        if float(total) <= 0.0:
            return 0
        share = singular_values.cumsum(0) / total
        return int((share <= alpha).sum())

    def project(self, previous: Tensor, delta: Tensor) -> Tensor:
        """τ′ = U P Vᵀ with P = Uᵀ τ V stripped of its diagonal and leading r_α × r_α block."""
        u, s, vh = torch.linalg.svd(previous.double(), full_matrices=True)
        r = self.split_rank(s, self.alpha)
        p = u.T @ delta.double() @ vh.T
        p.diagonal().zero_()
        p[:r, :r] = 0
        return (u @ p @ vh).to(torch.float32)

    def _add(self, delta: Delta) -> None:
        self.norms.append(math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values())))
        if not self.total:
            self.total = {k: v.clone() for k, v in delta.items()}
            return
        for key, value in delta.items():
            if self._is_linear(key, value):
                value = self.project(self.total[key], value)
            self.total[key] = self.total[key] + value

    def _merged(self) -> Delta:
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in self.total.values()))
        scale = (sum(self.norms) / len(self.norms)) / norm if norm > 0 else 0.0
        return {k: scale * v for k, v in self.total.items()}

    def _extra_state(self) -> dict[str, Tensor]:
        return {"meta.norms": torch.tensor(self.norms, dtype=torch.float64)}

    def _load_extra_state(self, state: Mapping[str, Tensor]) -> None:
        if "meta.norms" not in state:
            raise DeltaError("OPCMMerger state lacks 'meta.norms'.")
        norms = [float(x) for x in state["meta.norms"].reshape(-1)]
        if len(norms) != int(state["meta.num_tasks"]):
            raise DeltaError(
                f"OPCMMerger state has {len(norms)} task norms for {int(state['meta.num_tasks'])} task(s)."
            )
        self.norms = norms

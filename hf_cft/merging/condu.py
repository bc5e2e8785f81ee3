"""ConDU: continual decoupling and unifying of task deltas (docs/methods/condu.md §1–§5).

State kept between sessions (§1): the unified delta ``u`` (fp32, one tensor per delta key), one trigger per
task (bit-packed mask ``M^i`` per key and scalar rescaler ``λ^i``), the task's prototypes and its record.
One session (§2, :meth:`DeltaFusionMerger.add_task`) decouples every stored task (``δ̃^i = λ^i·M^i⊙u``), adds
the new delta and re-unifies all of them with EMR-Merging's rule (§3):

- elected sign ``σ = +1`` where ``Σ_i δ^i > 0`` (equivalently the mean), else ``−1``;
- mask ``M^i = [σ·δ^i > 0]``;
- unified delta ``u = σ ⊙ max_i(M^i ⊙ |δ^i|)``;
- rescaler ``λ^i = Σ_p mean|δ^i_p| / Σ_p mean|M^i_p ⊙ u_p|`` (``"mean"``, as released) or the EMR paper's
  ``Σ_p ‖δ^i_p‖₁ / Σ_p ‖M^i_p ⊙ u_p‖₁`` (``"global_sum"``). Under ``"mean"`` the parts ``p`` are the delta's
  tensors (``rescaler_groups="tensor"``, default) or groups of them: ``"openai"`` fuses HF CLIP's separate
  q/k/v projections of each attention layer into one part, as OpenAI's ``in_proj`` in the released code.

Everything runs key by key, so memory stays at ``u`` + the packed masks + a few tensors of one key. Degenerate
triggers (all-zero delta, or no entry agreeing with σ) get ``λ = 0`` and are flagged ``collapsed`` with a
warning instead of the released code's NaN/inf (§3 "Edge cases"); ``strict=True`` raises instead.

Example::

    from hf_cft.merging import DeltaFusionMerger, delta_from_models

    merger = DeltaFusionMerger(rescaler="mean")
    for name, model in finetuned_models.items():                 # one session per task
        merger.add_task(delta_from_models(clip, model, keys="trainable"), name, classnames=..., templates=...)
    expert = merger.expert_delta("dtd")                          # δ̃ = λ·M⊙u for one task
    merger.save_pretrained("condu_bundle")                       # safetensors + manifest.json
    merger = DeltaFusionMerger.from_pretrained("condu_bundle")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_cft.errors import BundleError, DeltaError, MergeConfigError, NonFiniteError, TaskError
from hf_cft.merging.deltas import (
    LazyDelta,
    TaskDelta,
    _is_peft_model,
    base_fingerprint,
    delta_from_lora,
    lora_factor_delta,
    validate_delta,
    validate_lazy_delta,
)
from hf_cft.merging.hub_hint import MovedToHubMixin
from hf_cft.merging.masks import PackedMask, packed_nbytes
from hf_cft.utils import atomic_path, read_json_object, release_freed_memory, user_stacklevel

__all__ = [
    "CollapsedTaskWarning",
    "DeltaFusionMerger",
    "DeltaFusionMergerConfig",
    "TaskRecord",
    "UnifyResult",
    "compute_device",
    "decouple",
    "elected_sign",
    "openai_rescaler_group",
    "resolve_rescaler_groups",
    "unify",
]

BUNDLE_FORMAT = "hf_cft.condu_bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
UNIFIED_FILE = "unified.safetensors"
MASKS_FILE = "masks.safetensors"
PROTOTYPES_FILE = "prototypes.safetensors"
# A save stages its files here and commits by writing the staged manifest (see ``save_pretrained``).
STAGING_DIR = ".pending-save"
#: sha256 of the manifest's other fields (canonical JSON): an edited λ, class name or file checksum is corruption.
MANIFEST_CHECKSUM = "manifest_sha256"
_BUNDLE_FILES = (UNIFIED_FILE, MASKS_FILE, PROTOTYPES_FILE)

RESCALERS = ("mean", "global_sum")
LORA_MERGES = ("dense", "factors")
RESCALER_GROUPS = ("tensor", "openai")


class CollapsedTaskWarning(UserWarning):
    """A task's trigger collapsed (all-zero delta or empty mask): λ = 0, its expert is θ⁰ (condu.md §3)."""


# ------------------------------------------------------------------------------------------------ the unify rule


def elected_sign(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """σ (fp32, ±1): +1 where ``Σ_i δ^i > 0``, else −1 — ties and all-zero entries get −1 (condu.md §3).

    The sum has the sign of the mean, and is what the paper's "sum > 0 → max, else min" tests.
    """
    total = torch.zeros_like(deltas[0], dtype=torch.float32)
    for d in deltas:
        total += d
    return torch.where(total > 0, 1.0, -1.0)


#: Entries per slice when a key is unified (a multiple of 8, so packed mask bytes of consecutive slices line up).
#: Every step of the rule is element-wise and λ's terms are sums, so slicing changes no result; it bounds the
#: temporaries (σ, |u|, one δ^i, one mask) to a few slices instead of a few copies of the largest tensor.
UNIFY_SLICE = 1 << 20

#: Bytes of decoupled slices a session keeps between the two passes over a slice (σ, then M and u) instead of
#: decoupling every stored expert twice: all n − 1 of them when they fit (8 tasks × 4 MiB slices = 28 MiB),
#: else as many as fit and the rest are decoupled again.
DECOUPLED_CACHE_BYTES = 1 << 27

#: Entries per chunk when an expert's weights θ⁰ + λ·M⊙u are formed on the CPU (:meth:`DeltaFusionMerger.
#: iter_expert_weights`): small enough that the float64 product and the mask stay in the CPU's caches, so a build
#: reads θ⁰ and u and writes the weights about once. On an accelerator a key is formed whole.
EXPERT_CHUNK = 1 << 16

#: Device types a merger computes on: the unify rule sums λ's terms in float64, which every CPU and CUDA device has.
COMPUTE_DEVICE_TYPES = ("cpu", "cuda")


def compute_device(device: torch.device | str | None) -> torch.device:
    """The device :class:`DeltaFusionMerger` computes on: ``None`` → the CPU (where its state lives); ``"cpu"``,
    ``"cuda"``, ``"cuda:1"`` or a ``torch.device``. Raises :class:`MergeConfigError` naming the device for a name
    torch does not know, ``"meta"`` (holds no data), a device type other than CPU/CUDA, or a CUDA device this
    machine lacks. Example::

        compute_device("cuda:0") if torch.cuda.is_available() else compute_device(None)   # device(type='cpu')
    """
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise MergeConfigError(
            f"device must be a device name such as 'cpu' or 'cuda:0' (or a torch.device), got {type(device).__name__} "
            f"{device!r}."
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise MergeConfigError(f"device {device!r} is not a device name torch knows ({exc}).") from exc
    if dev.type == "meta":
        raise MergeConfigError(
            f"device {device!r}: meta tensors hold no values, so nothing can be unified on them; use 'cpu' or 'cuda'."
        )
    if dev.type not in COMPUTE_DEVICE_TYPES:
        raise MergeConfigError(
            f"device {device!r}: DeltaFusionMerger computes on {COMPUTE_DEVICE_TYPES} devices (its rescaler sums "
            f"are float64), not {dev.type!r}."
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeConfigError(f"device {device!r}: CUDA is not available on this machine.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeConfigError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) (0..."
                f"{torch.cuda.device_count() - 1})."
            )
    return dev


def _unify_slice(
    get: Callable[[int], torch.Tensor], n: int, zero_sign: float = -1.0
) -> tuple[torch.Tensor, list[torch.Tensor], list[float], list[float]]:
    """The unify rule on one flat slice: ``u``, each task's mask bits, and the raw L1 sums of λ's terms.

    ``zero_sign`` is σ where ``Σ_i δ^i = 0`` exactly: −1 (condu.md §3, the released code, EMR's official code and
    FusionBench) or 0 (no task is selected there; hf_cft's EMR before the ``zero_sign`` option)."""
    total = get(0).to(torch.float32).clone()
    for i in range(1, n):
        total += get(i)
    if zero_sign == -1.0:  # ±1 without a branch per entry (torch.where on random signs is ~10× slower)
        sigma = (total > 0).to(torch.float32).mul_(2.0).sub_(1.0)
    else:
        sigma = torch.where(total > 0, 1.0, torch.where(total < 0, -1.0, zero_sign))
    del total
    u_abs = torch.zeros_like(sigma)
    masks, num = [], []
    for i in range(n):
        d = get(i)
        sd = sigma * d  # σ·δ^i: positive exactly where the entry agrees with the elected sign
        m = sd > 0
        torch.maximum(u_abs, sd.clamp_min(0.0), out=u_abs)  # max_i M^i⊙|δ^i|
        masks.append(m)
        num.append(float(d.abs().sum(dtype=torch.float64)))  # |δ^i|, also where σ = 0
        del sd, d
    den = [float((u_abs * m).sum(dtype=torch.float64)) for m in masks]
    u = (sigma * u_abs).add_(0.0)  # u_abs ≥ 0; + 0.0 makes σ·0 = −0.0 +0.0: no negative zeros where none was selected
    return u, [PackedMask.pack(m).bits for m in masks], num, den


def _unify_key(
    get: Callable[[int, int, int], torch.Tensor],
    n: int,
    shape: tuple[int, ...],
    rescaler: str,
    slice_size: int | None = None,
    mean_over: int | None = None,
    zero_sign: float = -1.0,
) -> tuple[torch.Tensor, list[PackedMask], list[float], list[float]]:
    """Unify the ``n`` tensors of one key (fp32) slice by slice, never stacking them.

    ``get(i, start, stop)`` returns entries ``start:stop`` of task ``i``'s flattened tensor, on the device the slice
    is to be computed on (the rule runs where the tensors are; ``u_p`` and the masks are copied back into CPU
    tensors slice by slice). Returns ``u_p``, the
    packed masks ``M^i_p`` and, per task, this key's numerator and denominator terms of λ (``Σ|δ^i_p|/N`` and
    ``Σ|M^i_p⊙u_p|/N`` with ``N = mean_over``, default the key's size, i.e. the per-tensor means; or the L1 sums
    under ``global_sum``), accumulated in float64. A key that belongs to a rescaler group passes the group's size
    as ``mean_over``, so that the group's terms add up to the group's mean. ``get`` is called twice per task and
    slice (once for σ, once for M and u), so only one task's slice is live at a time: peak memory is the output
    ``u_p`` plus a few slices, whatever ``n``.
    """
    slice_size = UNIFY_SLICE if slice_size is None else slice_size
    if slice_size <= 0 or slice_size % 8:
        raise ValueError(f"slice_size must be a positive multiple of 8, got {slice_size}")
    numel = math.prod(shape)
    u = torch.empty(numel, dtype=torch.float32)
    bits = [torch.zeros(packed_nbytes(shape), dtype=torch.uint8) for _ in range(n)]
    num, den = [0.0] * n, [0.0] * n
    for start in range(0, numel, slice_size):
        stop = min(start + slice_size, numel)
        u_s, bits_s, a, b = _unify_slice(lambda i, start=start, stop=stop: get(i, start, stop), n, zero_sign)
        u[start:stop] = u_s
        for i in range(n):
            bits[i][start // 8 : start // 8 + bits_s[i].numel()] = bits_s[i]
            num[i] += a[i]
            den[i] += b[i]
    divisor = numel if mean_over is None else mean_over
    if rescaler == "mean" and divisor > 0:
        num = [x / divisor for x in num]
        den = [x / divisor for x in den]
    return u.view(shape), [PackedMask(bt, tuple(shape)) for bt in bits], num, den


_QKV_KEY = re.compile(r"^(?P<prefix>.*\.)(?:q_proj|k_proj|v_proj)\.(?P<param>weight|bias)$")


def openai_rescaler_group(key: str) -> str:
    """The rescaler group of ``key`` in OpenAI CLIP's layout: an attention layer's ``q_proj``, ``k_proj`` and
    ``v_proj`` weights (biases) share the group ``<layer>.in_proj_weight`` (``_bias``), as OpenAI's fused
    ``in_proj``; every other key is its own group. HF CLIP ViT-B/16's 397 trainable keys give OpenAI's 301
    (condu.md §1, issue 17 item 9). Example::

        openai_rescaler_group("vision_model.encoder.layers.0.self_attn.k_proj.weight")
        # 'vision_model.encoder.layers.0.self_attn.in_proj_weight'
    """
    m = _QKV_KEY.match(key)
    return f"{m['prefix']}in_proj_{m['param']}" if m else key


def resolve_rescaler_groups(
    spec: str | Mapping[str, str] | Callable[[str], str], keys: Sequence[str]
) -> dict[str, str]:
    r"""``{key: group}`` for the per-group-mean rescaler: ``"tensor"`` (every key alone), ``"openai"``
    (:func:`openai_rescaler_group`), a mapping that names every key's group, or a callable ``key -> group``
    (e.g. ``lambda k: re.sub(r"\.(q|k|v)_proj\.", ".in_proj.", k)``). Raises :class:`MergeConfigError` naming
    a key the mapping lacks or a group name that is not a string."""
    if isinstance(spec, str):
        if spec not in RESCALER_GROUPS:
            raise MergeConfigError(
                f"rescaler_groups must be one of {RESCALER_GROUPS}, a mapping or a callable, got {spec!r}."
            )
        fn = (lambda k: k) if spec == "tensor" else openai_rescaler_group
        return {k: fn(k) for k in keys}
    if isinstance(spec, Mapping):
        missing = [k for k in keys if k not in spec]
        if missing:
            raise MergeConfigError(f"rescaler_groups names no group for delta key {missing[0]!r}.")
        out = {k: spec[k] for k in keys}
    elif callable(spec):
        out = {k: spec(k) for k in keys}
    else:
        raise MergeConfigError(
            f"rescaler_groups must be a string, a mapping or a callable, got {type(spec).__name__}."
        )
    bad = [k for k, g in out.items() if not isinstance(g, str) or not g]
    if bad:
        raise MergeConfigError(f"rescaler_groups gives delta key {bad[0]!r} the group {out[bad[0]]!r}, not a name.")
    return out


def _group_sizes(shapes: Mapping[str, tuple[int, ...]], groups: Mapping[str, str]) -> dict[str, int]:
    """``{key: number of entries of the key's rescaler group}`` (the ``mean_over`` of :func:`_unify_key`)."""
    size: dict[str, int] = {}
    for k, s in shapes.items():
        size[groups[k]] = size.get(groups[k], 0) + math.prod(s)
    return {k: size[groups[k]] for k in shapes}


def _decoupled(u: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """δ̃ = λ·M⊙u. The product λ·u is formed in float64 and rounded once to fp32, so λ's own fp32 rounding
    never biases the whole tensor (keeps each expert's L1 mass to ~1e-8 over many sessions, §8 test 3)."""
    if lam == 0.0:
        return torch.zeros_like(u)
    # M⊙x + 0.0 is torch.where(M, x, 0.0) for finite x (+ 0.0 turns −0.0 into +0.0) without a branch per entry
    return (u.to(torch.float64) * lam).to(torch.float32).mul_(mask).add_(0.0)


def _expert_weight(base: torch.Tensor, u: torch.Tensor, mask: PackedMask, lam: float) -> torch.Tensor:
    """θ⁰ + λ·M⊙u for one key on ``base``'s device and in its dtype: the fp32 sum ``θ⁰ + δ̃`` rounded once (the
    values of ``FunctionalExpert(model, {key: _decoupled(u, M, λ)})``), formed chunk by chunk on the CPU."""
    dev = base.device
    wide = torch.promote_types(base.dtype, torch.float32)
    numel = u.numel()
    b = base.reshape(-1)
    uf = u.reshape(-1).to(dev)  # the key's u on the device once (a view on the CPU)
    out = torch.empty(numel, dtype=base.dtype, device=dev)
    step = EXPERT_CHUNK if dev.type == "cpu" else max(numel, 1)
    for lo in range(0, numel, step):
        hi = min(lo + step, numel)
        d = _decoupled(uf[lo:hi], mask.unpack_range(lo, hi, dev), lam)
        if wide == base.dtype:
            torch.add(b[lo:hi], d, out=out[lo:hi])
        else:
            out[lo:hi] = b[lo:hi].to(wide) + d
    return out.view(base.shape)


def _rescalers(num: Sequence[float], den: Sequence[float]) -> tuple[list[float], list[bool]]:
    """λ^i = num/den; a zero denominator (all-zero delta, or empty mask) gives λ = 0 and ``collapsed``."""
    lams, collapsed = [], []
    for a, b in zip(num, den):
        ok = b > 0.0 and a > 0.0 and math.isfinite(a / b)
        lams.append(a / b if ok else 0.0)
        collapsed.append(not ok)
    return lams, collapsed


@dataclass
class UnifyResult:
    """Output of :func:`unify`: ``unified`` (u), per-task boolean ``masks``, ``lambdas`` and ``collapsed`` flags."""

    unified: dict[str, torch.Tensor]
    masks: list[dict[str, torch.Tensor]]
    lambdas: list[float]
    collapsed: list[bool]


def unify(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    rescaler: str = "mean",
    rescaler_groups: str | Mapping[str, str] | Callable[[str], str] = "tensor",
    device: torch.device | str | None = None,
) -> UnifyResult:
    """One-shot EMR unify of ``deltas`` (condu.md §3); the same rule :class:`DeltaFusionMerger` runs per session.

    All deltas must share keys and shapes (else :class:`DeltaError`). Collapsed triggers get λ = 0 (no warning
    here; the merger warns). ``rescaler_groups``: see :class:`DeltaFusionMergerConfig`. ``device``: where each
    slice is computed (:func:`compute_device`; default the CPU); the results are CPU tensors. Example::

        res = unify([delta_a, delta_b])
        rebuilt_a = decouple(res, 0)          # λ^0 · M^0 ⊙ u
    """
    DeltaFusionMergerConfig(rescaler=rescaler, rescaler_groups=rescaler_groups)  # checks both options
    dev = compute_device(device)
    if not deltas:
        raise TaskError("unify() needs at least one delta.")
    ref = validate_delta(deltas[0], name="delta 0")
    shapes = {k: tuple(t.shape) for k, t in ref.items()}
    checked = [ref] + [validate_delta(d, shapes, name=f"delta {i}") for i, d in enumerate(deltas[1:], start=1)]
    n = len(checked)
    mean_over = _group_sizes(shapes, resolve_rescaler_groups(rescaler_groups, list(shapes)))
    unified: dict[str, torch.Tensor] = {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    num, den = [0.0] * n, [0.0] * n
    for key in shapes:
        flat = [checked[i][key].reshape(-1) for i in range(n)]
        get = lambda i, lo, hi, flat=flat: flat[i][lo:hi].to(dev)  # noqa: E731
        u, pm, a, b = _unify_key(get, n, shapes[key], rescaler, mean_over=mean_over[key])
        unified[key] = u
        for i in range(n):
            masks[i][key] = pm[i].unpack()
            num[i] += a[i]
            den[i] += b[i]
    lams, collapsed = _rescalers(num, den)
    return UnifyResult(unified, masks, lams, collapsed)


def decouple(result: UnifyResult, index: int) -> dict[str, torch.Tensor]:
    """δ̃^i = λ^i · M^i ⊙ u from a :class:`UnifyResult`."""
    lam = result.lambdas[index]
    return {k: _decoupled(u, result.masks[index][k], lam) for k, u in result.unified.items()}


# ------------------------------------------------------------------------------------------------------ merger


@dataclass
class DeltaFusionMergerConfig:
    """Options of :class:`DeltaFusionMerger`.

    - ``rescaler``: ``"mean"`` (per-tensor-mean λ, as released; default) or ``"global_sum"`` (EMR paper).
    - ``lora_merge``: how :meth:`DeltaFusionMerger.add_task` turns a LoRA adapter into a delta: ``"dense"``
      (default, ΔW = s·B@A keyed by base weights) or ``"factors"`` (A and B unified as tensors, ConDU (LoRA)).
    - ``strict``: raise :class:`TaskError` instead of collapsing a degenerate trigger to λ = 0.
    - ``rescaler_groups`` (``"mean"`` only): the parts whose means λ adds up. ``"tensor"`` (default): every delta
      key. ``"openai"``: HF CLIP's q/k/v projections of one attention layer form one part, as the released code's
      fused ``in_proj`` (:func:`openai_rescaler_group`), so λ equals the released one for full fine-tuning (the
      per-tensor mean otherwise weighs the attention input projection 3×: 397 parts instead of 301). Or a
      mapping ``{key: group}`` / a callable ``key -> group`` (resolved to a mapping at the first task, so that the
      bundle stores it). The default stays ``"tensor"``: it is defined for any model's own layout (SigLIP, LoRA
      factors, other towers), while ``"openai"`` encodes one checkpoint format's fusion.
    """

    rescaler: str = "mean"
    lora_merge: str = "dense"
    strict: bool = False
    rescaler_groups: str | dict[str, str] | Callable[[str], str] = "tensor"

    def __post_init__(self):
        if self.rescaler not in RESCALERS:
            raise MergeConfigError(f"rescaler must be one of {RESCALERS}, got {self.rescaler!r}.")
        groups = self.rescaler_groups
        if isinstance(groups, str):
            resolve_rescaler_groups(groups, [])
        elif isinstance(groups, Mapping):
            self.rescaler_groups = dict(resolve_rescaler_groups(groups, list(groups)))
        elif not callable(groups):
            raise MergeConfigError(
                f"rescaler_groups must be a string, a mapping or a callable, got {type(groups).__name__}."
            )
        if groups != "tensor" and self.rescaler != "mean":
            raise MergeConfigError(
                f"rescaler_groups={groups!r} needs rescaler='mean': the {self.rescaler!r} rescaler sums over every "
                "entry, so grouping tensors changes nothing."
            )
        if self.lora_merge not in LORA_MERGES:
            raise MergeConfigError(f"lora_merge must be one of {LORA_MERGES}, got {self.lora_merge!r}.")
        if not isinstance(self.strict, bool):
            raise MergeConfigError(f"strict must be a bool, got {self.strict!r}.")

    def to_dict(self) -> dict[str, Any]:
        if callable(self.rescaler_groups) and not isinstance(self.rescaler_groups, (str, Mapping)):
            raise MergeConfigError(
                "rescaler_groups is a callable that no task has resolved yet; add a task (or pass a mapping) first."
            )
        out = asdict(self)
        if out["rescaler_groups"] == "tensor":  # the default stays out, so bundles read by older hf_cft still load
            del out["rescaler_groups"]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeltaFusionMergerConfig:
        unknown = set(d) - {"rescaler", "lora_merge", "strict", "rescaler_groups"}
        if unknown:
            raise MergeConfigError(f"Unknown DeltaFusionMergerConfig option(s): {sorted(unknown)}.")
        return cls(**d)


@dataclass
class TaskRecord:
    """What the merger keeps about one task besides its trigger tensors (condu.md §1)."""

    name: str
    order: int
    lam: float = 1.0
    collapsed: bool = False
    dataset: str | None = None
    classnames: list[str] | None = None
    templates: list[str] | None = None
    has_prototypes: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DeltaFusionMerger(MovedToHubMixin):
    """ConDU's merger (condu.md §1–§5): one :meth:`add_task` per session; experts rebuilt on demand.

    ``base_model`` (optional) is only needed to turn LoRA adapters given to :meth:`add_task` into deltas
    (``lora_merge="dense"``: the plain CLIP; ``"factors"``: a ``PeftModel`` holding θ⁰ plus the initial adapter)
    and to record the base fingerprint up front; deltas from :func:`delta_from_models` carry the fingerprint
    themselves. ``device`` (default: the CPU, where the state — u, the packed masks — always lives) is where a
    session computes: with ``device="cuda"`` each slice of u, of the masks and of the new delta is moved there,
    unified, and its u and mask bits are brought back; results equal the CPU's up to float rounding of λ's sums
    (:func:`compute_device` lists the refusals). Example::

        merger = DeltaFusionMerger(strict=False)
        merger.add_task(delta_1, "aircraft", classnames=names_1, templates=tpl_1, prototypes=protos_1)
        merger.add_task(delta_2, "caltech101", ...)
        merger.tasks[0].lam, merger.expert_delta("aircraft")

    Push it with ``hf_cft.hub.push_to_hub(merger, repo_id)``; its card is ``hf_cft.hub.condu_card(merger, ...)``.
    """

    _MOVED_TO_HUB = {
        "push_to_hub": "hf_cft.hub.push_to_hub(merger, repo_id, card_kwargs=...)",
        "model_card": "hf_cft.hub.condu_card(merger, results=..., summary=...)",
    }

    def __init__(
        self,
        config: DeltaFusionMergerConfig | None = None,
        *,
        base_model: nn.Module | None = None,
        base_model_name_or_path: str | None = None,
        device: torch.device | str | None = None,
        **options,
    ):
        self.device = compute_device(device)  # first: a bad device is refused before anything else is set up
        if config is None:
            config = DeltaFusionMergerConfig(**options)
        elif options:
            config = dataclasses.replace(config, **options)
        self.config = config
        self.base_model = base_model
        self.base_fingerprint: str | None = base_fingerprint(base_model) if base_model is not None else None
        if base_model_name_or_path is None and base_model is not None:
            cfg = getattr(base_model, "config", None)
            base_model_name_or_path = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
        self.base_model_name_or_path = base_model_name_or_path or None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._u: dict[str, torch.Tensor] = {}
        self._masks: list[dict[str, PackedMask]] = []
        self._records: list[TaskRecord] = []
        self._prototypes: dict[str, torch.Tensor] = {}
        self._interrupted = False
        #: Incremented by every session (and on load): routers drop cached expert heads when it changes.
        self.version = 0

    # ------------------------------------------------------------------------------------------------ access

    @property
    def task_names(self) -> list[str]:
        return [r.name for r in self._records]

    @property
    def tasks(self) -> list[TaskRecord]:
        """Copies of the task records, in training order."""
        return [TaskRecord(**{**r.to_dict(), "extra": dict(r.extra)}) for r in self._records]

    def __len__(self) -> int:
        return len(self._records)

    @property
    def keys(self) -> list[str]:
        return list(self._shapes)

    @property
    def unified_delta(self) -> dict[str, torch.Tensor]:
        """u (read-only view: the merger's own tensors; do not modify them)."""
        self._check_usable()
        return dict(self._u)

    def task_index(self, name: str) -> int:
        for i, r in enumerate(self._records):
            if r.name == name:
                return i
        raise TaskError(f"Unknown task {name!r}; the merger holds {self.task_names}.")

    def record(self, name: str) -> TaskRecord:
        return self.tasks[self.task_index(name)]

    def mask(self, name: str, key: str) -> torch.Tensor:
        """The boolean mask M^i of task ``name`` for ``key`` (unpacked on demand)."""
        i = self.task_index(name)
        if key not in self._shapes:
            raise DeltaError(f"Unknown delta key {key!r}.")
        return self._masks[i][key].unpack()

    def packed_mask(self, name: str, key: str) -> PackedMask:
        return self._masks[self.task_index(name)][key]

    def prototypes(self, name: str) -> torch.Tensor | None:
        """Task ``name``'s prototypes ``[C, d]`` (unit rows) or ``None`` if none were given."""
        self.task_index(name)
        return self._prototypes.get(name)

    def set_prototypes(self, name: str, prototypes: torch.Tensor) -> None:
        """Attach (or replace) the prototypes of a stored task, e.g. computed after :meth:`add_task`."""
        i = self.task_index(name)
        self._prototypes[name] = self._check_prototypes(prototypes, name, self._records[i].classnames)
        self._records[i].has_prototypes = True
        self.version += 1

    def _check_usable(self) -> None:
        if self._interrupted:
            raise TaskError(
                "A previous add_task() was interrupted while it rewrote the unified delta; this merger is "
                "inconsistent. Reload the last saved bundle with DeltaFusionMerger.from_pretrained()."
            )

    # ------------------------------------------------------------------------------------------- one session

    def _as_delta(self, source: Any, name: str) -> Mapping[str, torch.Tensor]:
        if isinstance(source, Mapping):
            return source
        if isinstance(source, (str, os.PathLike)) and str(source).endswith(".safetensors"):
            return LazyDelta.from_file(source)  # a delta file (save_delta): streamed key by key
        if _is_peft_model(source) or isinstance(source, (str, os.PathLike)):
            if self.base_model is None:
                raise DeltaError(
                    f"Task {name!r} was given as a LoRA adapter; the merger needs base_model= to turn it into a "
                    "delta (or pass delta_from_lora(adapter, base_model))."
                )
            if self.config.lora_merge == "factors":
                return lora_factor_delta(source, self.base_model)
            return delta_from_lora(source, self.base_model)
        raise DeltaError(
            f"Task {name!r}: expected a delta (dict of tensors), a PeftModel or an adapter folder, "
            f"got {type(source).__name__}."
        )

    def _check_prototypes(self, prototypes: Any, name: str, classnames: Sequence[str] | None) -> torch.Tensor:
        if not isinstance(prototypes, torch.Tensor) or prototypes.ndim != 2 or prototypes.shape[0] == 0:
            raise TaskError(f"Prototypes of task {name!r} must be a non-empty [C, d] tensor.")
        p = prototypes.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"Prototypes of task {name!r} hold NaN/inf values.")
        if bool((p.norm(dim=-1) == 0).any()):
            raise TaskError(f"Prototypes of task {name!r} contain an all-zero row (cannot be normalised).")
        if classnames is not None and p.shape[0] != len(classnames):
            raise TaskError(f"Task {name!r} has {len(classnames)} class names but {p.shape[0]} prototype rows.")
        for other, q in self._prototypes.items():
            if other != name and q.shape[1] != p.shape[1]:
                raise TaskError(
                    f"Prototypes of task {name!r} are {p.shape[1]}-d but task {other!r}'s are {q.shape[1]}-d."
                )
        return torch.nn.functional.normalize(p, dim=-1).contiguous()

    def add_task(
        self,
        delta: Mapping[str, torch.Tensor] | nn.Module | str | os.PathLike,
        name: str,
        prototypes: torch.Tensor | None = None,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        dataset: str | None = None,
    ) -> TaskRecord:
        """Run one ConDU session (condu.md §2 steps 2–5) for task ``name`` and return its record.

        ``delta``: the task delta δ^t = θ^t − θ⁰ (a dict of tensors, e.g. from :func:`delta_from_models` /
        :func:`delta_from_lora`), a :class:`~hf_cft.merging.LazyDelta` or the path of a ``.safetensors`` delta file
        (:func:`~hf_cft.merging.save_delta`), both streamed one key at a time so that memory stays near the bundle
        itself, or a LoRA ``PeftModel`` / adapter folder (converted per ``lora_merge``; needs ``base_model``). Every stored task is decoupled (δ̃^i = λ^i M^i⊙u), the new delta added, and **all**
        triggers recomputed (§3). ``prototypes`` (``[C, d]``, see :func:`hf_cft.merging.compute_prototypes`),
        ``classnames``, ``templates`` and ``dataset`` are stored in the task record for routing.

        Raises :class:`TaskError` for a duplicate or empty name; :class:`DeltaError` naming a key that does not
        match the stored keys/shapes or a delta from another base model; :class:`NonFiniteError` naming a NaN key.
        A degenerate trigger gets λ = 0, ``collapsed=True`` and a :class:`CollapsedTaskWarning` (``strict``:
        :class:`TaskError`, and the merger is left unchanged).
        """
        self._check_usable()
        if not isinstance(name, str) or not name.strip():
            raise TaskError(f"Task names must be non-empty strings, got {name!r}.")
        if name in self.task_names:
            raise TaskError(f"Task {name!r} was already added (tasks: {self.task_names}); task names must be unique.")
        classnames = list(classnames) if classnames is not None else None
        templates = list(templates) if templates is not None else None
        delta = self._as_delta(delta, name)
        if isinstance(delta, LazyDelta):  # checked key by key now, read again key by key in the session
            checked = validate_lazy_delta(delta, self._shapes or None, name=f"delta of task {name!r}")
        else:
            checked = validate_delta(delta, self._shapes or None, name=f"delta of task {name!r}")
        fp = checked.base_fingerprint
        if fp is not None and self.base_fingerprint is not None and fp != self.base_fingerprint:
            raise DeltaError(
                f"The delta of task {name!r} was taken from another base model (fingerprint {fp}) than the "
                f"merger's (fingerprint {self.base_fingerprint})."
            )
        protos = self._check_prototypes(prototypes, name, classnames) if prototypes is not None else None

        if self.config.strict:  # dry run first: a strict failure must leave the merger unchanged
            lams, collapsed, _ = self._session(checked, commit=False)
            if any(collapsed):
                bad = [n for n, c in zip([*self.task_names, name], collapsed) if c]
                raise TaskError(
                    f"strict=True: the trigger of task(s) {bad} would collapse (all-zero delta, or no entry agreeing "
                    "with the elected sign; λ would be 0/0 or x/0). Nothing was changed."
                )
        groups = self.config.rescaler_groups
        if not isinstance(groups, (str, Mapping)):  # a callable: resolved once, so that the bundle can store it
            keys = list(self._shapes or checked)
            self.config = dataclasses.replace(self.config, rescaler_groups=resolve_rescaler_groups(groups, keys))
        if not self._shapes:
            self._shapes = (
                checked.shapes() if isinstance(checked, LazyDelta) else {k: tuple(t.shape) for k, t in checked.items()}
            )
        lams, collapsed, new_masks = self._session(checked, commit=True)

        was_collapsed = [r.collapsed for r in self._records] + [False]
        newly = [n for n, c, w in zip([*self.task_names, name], collapsed, was_collapsed) if c and not w]
        self._masks = new_masks
        for r, lam, c in zip(self._records, lams, collapsed):
            r.lam, r.collapsed = lam, c
        record = TaskRecord(
            name=name,
            order=len(self._records),
            lam=lams[-1],
            collapsed=collapsed[-1],
            dataset=dataset,
            classnames=classnames,
            templates=templates,
            has_prototypes=protos is not None,
        )
        self._records.append(record)
        if protos is not None:
            self._prototypes[name] = protos
        if self.base_fingerprint is None:
            self.base_fingerprint = fp
        self.version += 1
        if newly:
            warnings.warn(
                f"ConDU trigger of task(s) {newly} collapsed (all-zero delta, or no entry agrees with the elected "
                "sign): λ = 0, so the decoupled expert is θ⁰ (condu.md §3).",
                CollapsedTaskWarning,
                stacklevel=user_stacklevel(),
            )
        return TaskRecord(**{**record.to_dict(), "extra": {}})

    def _session(
        self, new: Mapping[str, torch.Tensor], commit: bool
    ) -> tuple[list[float], list[bool], list[dict[str, PackedMask]]]:
        """Decouple stored tasks, add ``new``, unify key by key and slice by slice (:func:`_unify_key`).

        Only one key of ``new`` is read at a time (a :class:`~hf_cft.merging.LazyDelta` streams it from disk), and
        the stored experts are rebuilt slice by slice from u and their packed masks, never whole. With ``commit``,
        u is replaced key by key (peak memory: u + old and new packed masks + one key of ``new`` and of the new u +
        a few slices, and up to :data:`DECOUPLED_CACHE_BYTES` of decoupled slices kept between the two passes);
        masks and λ are returned for the caller to swap in. Each slice is computed on ``self.device``."""
        old_lams = [r.lam for r in self._records]
        dev = self.device
        n = len(self._records) + 1
        num, den = [0.0] * n, [0.0] * n
        masks: list[dict[str, PackedMask]] = [{} for _ in range(n)]
        shapes = self._shapes or (
            new.shapes() if isinstance(new, LazyDelta) else {k: tuple(t.shape) for k, t in new.items()}
        )
        keys = list(shapes)
        mean_over = _group_sizes(shapes, resolve_rescaler_groups(self.config.rescaler_groups, keys))
        if commit:
            self._interrupted = True
        for key in keys:
            d_new = new[key].detach().to(torch.float32)  # moved to the compute device slice by slice
            shape = tuple(d_new.shape)
            d_new = d_new.reshape(-1)
            u_old = self._u.get(key)  # u and the masks live on the CPU
            u_flat = u_old.reshape(-1) if u_old is not None else None
            old_masks = [self._masks[i][key] for i in range(n - 1)]
            # this slice of u and of the new delta on the compute device (on the CPU: views), and the stored
            # experts' decoupled slices from the σ pass, reused by the M/u pass (as many as the budget holds)
            on_dev: dict[Any, Any] = {}
            keep = DECOUPLED_CACHE_BYTES // (4 * min(UNIFY_SLICE, max(d_new.numel(), 1)))

            def get(i, lo, hi, d_new=d_new, u_flat=u_flat, old_masks=old_masks, on_dev=on_dev, keep=keep):
                if on_dev.get("range") != (lo, hi):
                    on_dev.clear()
                    on_dev["range"] = (lo, hi)
                    on_dev["new"] = d_new[lo:hi].to(dev)
                    on_dev["u"] = u_flat[lo:hi].to(dev) if u_flat is not None else None
                if i == n - 1:
                    return on_dev["new"]
                d = on_dev.pop(i, None)  # the second call for this slice takes the first call's result
                if d is None:
                    d = _decoupled(on_dev["u"], old_masks[i].unpack_range(lo, hi, dev), old_lams[i])
                    if i < keep:
                        on_dev[i] = d
                return d

            u, pm, a, b = _unify_key(get, n, shape, self.config.rescaler, mean_over=mean_over[key])
            for i in range(n):
                masks[i][key] = pm[i]
                num[i] += a[i]
                den[i] += b[i]
            if commit:
                self._u[key] = u
            big = d_new.numel() >= UNIFY_SLICE
            del u, d_new, u_flat, on_dev
            if big:  # a large key's temporaries: trimmed now, so that the footprint stays near u + masks
                release_freed_memory()
        if commit:
            self._interrupted = False
        release_freed_memory()  # the small keys' temporaries, once per session (a trim per key costs ~10%)
        lams, collapsed = _rescalers(num, den)
        return lams, collapsed, masks

    # ------------------------------------------------------------------------------------------------ experts

    def iter_expert_delta(
        self, name: str, device: torch.device | str | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, δ̃^i_key)`` for task ``name``, one key at a time (masks unpacked per key), computed on
        ``device`` (default: where u is, the CPU)."""
        self._check_usable()
        i = self.task_index(name)
        lam = self._records[i].lam
        dev = None if device is None else compute_device(device)
        for key, u in self._u.items():
            u = u if dev is None else u.to(dev)
            yield key, _decoupled(u, self._masks[i][key].unpack(u.device), lam)

    def iter_expert_weights(self, name: str, base: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, θ⁰_key + δ̃^i_key)`` for task ``name``: the expert's own tensor of every delta key, formed on
        ``base[key]``'s device in its dtype (the sum in fp32, rounded once, as
        :class:`~hf_cft.merging.FunctionalExpert` does), so that a router builds an expert where its model runs.

        ``base`` maps delta keys to θ⁰'s tensors (e.g. ``dict(model.named_parameters())``); a missing key or a
        shape mismatch raises :class:`DeltaError`. On the CPU each key is formed in chunks of
        :data:`EXPERT_CHUNK` entries, so the float64 product λ·u and the mask stay in cache; the values are those
        of ``θ⁰ + iter_expert_delta(name)`` exactly. Example::

            weights = dict(merger.iter_expert_weights("dtd", dict(clip.named_parameters())))
        """
        self._check_usable()
        i = self.task_index(name)
        lam = self._records[i].lam
        for key, u in self._u.items():
            b = base.get(key)
            if b is None or tuple(b.shape) != tuple(u.shape):
                what = "is missing from the base tensors" if b is None else f"has shape {tuple(b.shape)} in the base"
                raise DeltaError(f"Delta key {key!r} {what}, but the merger's u is {tuple(u.shape)}.")
            yield key, _expert_weight(b.detach(), u, self._masks[i][key], lam)

    def expert_delta(self, name: str) -> TaskDelta:
        """δ̃^i = λ^i · M^i ⊙ u for task ``name`` (condu.md §3 "decouple"); expert θ̃^i = θ⁰ + δ̃^i."""
        return TaskDelta(self.iter_expert_delta(name), base_fingerprint=self.base_fingerprint)

    # ------------------------------------------------------------------------------------------------ storage

    def storage_bytes(self) -> dict[str, int]:
        """Bytes of the state beyond θ⁰ (condu.md §4), and of the alternatives it replaces.

        - ``unified``: u in fp32; ``masks_packed``: all masks at 1 bit/entry; ``masks_bool``: the same at 1
          byte/entry (torch ``bool``, as released); ``prototypes``: fp32;
        - ``bundle`` = unified + masks_packed + prototypes (what :meth:`save_pretrained` stores, plus a manifest);
        - ``bundle_bool_masks`` = the same with 1-byte masks;
        - ``experts``: every task's delta kept separately in fp32 (T × u).
        """
        unified = sum(t.numel() * t.element_size() for t in self._u.values())
        entries = sum(math.prod(s) for s in self._shapes.values())
        packed = sum(packed_nbytes(s) for s in self._shapes.values()) * len(self._records)
        protos = sum(p.numel() * p.element_size() for p in self._prototypes.values())
        return {
            "unified": unified,
            "masks_packed": packed,
            "masks_bool": entries * len(self._records),
            "prototypes": protos,
            "bundle": unified + packed + protos,
            "bundle_bool_masks": unified + entries * len(self._records) + protos,
            "experts": unified * len(self._records),
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the bundle: ``unified.safetensors`` (u), ``masks.safetensors`` (uint8 bit-packed masks, keys
        ``"<task index>/<delta key>"``), ``prototypes.safetensors`` and ``manifest.json`` (config, task order,
        λ, flags, class names, templates, base model reference and fingerprint, key shapes, file checksums).

        Crash-safe in place: the new files are staged in ``.pending-save/`` (each written atomically), the staged
        manifest written last is the commit point, then the files are moved into place and the manifest last.
        A process killed at any moment leaves the old bundle (not committed yet) or the new one (committed: readers
        take the staged files still waiting to be moved, and the next save finishes the move), never a mix. A
        torn or foreign file still fails the checksums in :meth:`from_pretrained` with :class:`BundleError`.
        """
        self._check_usable()
        if not self._records:
            raise TaskError("Nothing to save: no task was added to the merger.")
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        _finish_pending_save(out)  # a save killed after its commit point: move its files in first
        stage = out / STAGING_DIR
        stage.mkdir()
        masks = {f"{i}/{k}": pm.bits for i, per in enumerate(self._masks) for k, pm in per.items()}
        protos = {str(i): self._prototypes[r.name] for i, r in enumerate(self._records) if r.name in self._prototypes}
        files = {
            UNIFIED_FILE: _atomic_save_file(self._u, stage / UNIFIED_FILE),
            MASKS_FILE: _atomic_save_file(masks, stage / MASKS_FILE),
            PROTOTYPES_FILE: _atomic_save_file(protos, stage / PROTOTYPES_FILE),
        }
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "config": self.config.to_dict(),
            "base_model": {"name_or_path": self.base_model_name_or_path, "fingerprint": self.base_fingerprint},
            "keys": [{"key": k, "shape": list(s)} for k, s in self._shapes.items()],
            "mask_bit_order": "big",
            "tasks": [r.to_dict() for r in self._records],
            "files": files,
        }
        from hf_cft.utils import atomic_write_json

        manifest[MANIFEST_CHECKSUM] = _manifest_digest(manifest)
        atomic_write_json(stage / MANIFEST, manifest)  # the commit point
        _finish_pending_save(out)
        return out

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        base_model: nn.Module | None = None,
        revision: str | None = None,
        verify: bool = True,
        device: torch.device | str | None = None,
    ) -> DeltaFusionMerger:
        """Load a bundle from a local folder or a Hub model repo (``huggingface_hub.snapshot_download``).

        Raises :class:`BundleError` for a missing or corrupt manifest or safetensors file (checksums verified
        unless ``verify=False``), and for tensors that disagree with the manifest. With ``base_model``, its
        fingerprint must match the bundle's (else :class:`DeltaError`). ``device``: where later sessions compute
        (see :class:`DeltaFusionMerger`; a runtime choice, not stored in the bundle).
        """
        compute_device(device)  # a bad device is refused before any file is read
        folder = Path(path_or_repo_id)
        if not folder.is_dir():
            folder = _download_bundle(str(path_or_repo_id), revision)
        paths = _committed_paths(folder)
        manifest = _read_manifest(folder, paths[MANIFEST])
        if verify:
            _check_manifest_integrity(folder, manifest)
        try:
            config = DeltaFusionMergerConfig.from_dict(manifest["config"])
            shapes = {e["key"]: tuple(int(x) for x in e["shape"]) for e in manifest["keys"]}
            records = [TaskRecord(**t) for t in manifest["tasks"]]
            base_info = manifest.get("base_model") or {}
            files = manifest["files"]
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"Bundle {str(folder)!r}: malformed manifest.json ({exc!r}).") from exc
        if [r.order for r in records] != list(range(len(records))) or len({r.name for r in records}) != len(records):
            raise BundleError(f"Bundle {str(folder)!r}: task order/names in manifest.json are inconsistent.")
        for r in records:
            if not isinstance(r.lam, (int, float)) or not math.isfinite(r.lam) or r.lam < 0:
                raise BundleError(f"Bundle {str(folder)!r}: task {r.name!r} has an invalid rescaler λ={r.lam!r}.")
        tensors = {
            fname: _load_checked(folder, paths[fname], files.get(fname), verify)
            for fname in (UNIFIED_FILE, MASKS_FILE, PROTOTYPES_FILE)
        }

        merger = cls(config, base_model_name_or_path=base_info.get("name_or_path"), device=device)
        merger.base_fingerprint = base_info.get("fingerprint")
        if base_model is not None:
            fp = base_fingerprint(base_model)
            if merger.base_fingerprint is not None and fp != merger.base_fingerprint:
                raise DeltaError(
                    f"Bundle {str(folder)!r} was built on another base model (fingerprint {merger.base_fingerprint}, "
                    f"given model {fp})."
                )
            merger.base_model = base_model
        unified = tensors[UNIFIED_FILE]
        if set(unified) != set(shapes):
            extra = sorted(set(unified) ^ set(shapes))
            raise BundleError(f"Bundle {str(folder)!r}: {UNIFIED_FILE} and the manifest disagree on key {extra[0]!r}.")
        for k, s in shapes.items():
            t = unified[k]
            if tuple(t.shape) != s or t.dtype != torch.float32:
                raise BundleError(
                    f"Bundle {str(folder)!r}: unified tensor {k!r} is {t.dtype} {tuple(t.shape)}, expected fp32 {s}."
                )
            if not bool(torch.isfinite(t).all()):
                raise BundleError(f"Bundle {str(folder)!r}: unified tensor {k!r} holds NaN/inf.")
        merger._shapes = shapes
        merger._u = {k: unified[k] for k in shapes}
        packed = tensors[MASKS_FILE]
        masks: list[dict[str, PackedMask]] = []
        for i in range(len(records)):
            per = {}
            for k, s in shapes.items():
                bits = packed.get(f"{i}/{k}")
                if bits is None or bits.dtype != torch.uint8 or bits.ndim != 1 or bits.numel() != packed_nbytes(s):
                    raise BundleError(
                        f"Bundle {str(folder)!r}: mask of task {records[i].name!r} for key {k!r} is missing or malformed."
                    )
                per[k] = PackedMask(bits, s)
            masks.append(per)
        if len(packed) != len(records) * len(shapes):
            raise BundleError(f"Bundle {str(folder)!r}: {MASKS_FILE} holds masks the manifest does not list.")
        merger._masks = masks
        protos = tensors[PROTOTYPES_FILE]
        for i, r in enumerate(records):
            p = protos.get(str(i))
            if r.has_prototypes != (p is not None):
                raise BundleError(f"Bundle {str(folder)!r}: prototypes of task {r.name!r} missing or unexpected.")
            if p is not None:
                if p.ndim != 2 or not bool(torch.isfinite(p).all()):
                    raise BundleError(f"Bundle {str(folder)!r}: prototypes of task {r.name!r} are malformed.")
                merger._prototypes[r.name] = p
        merger._records = records
        merger.version = 1
        return merger

    def __repr__(self) -> str:
        return (
            f"DeltaFusionMerger({len(self._records)} tasks, {len(self._shapes)} keys, rescaler={self.config.rescaler!r}, "
            f"rescaler_groups={self.config.rescaler_groups if isinstance(self.config.rescaler_groups, str) else 'custom'!r}, "
            f"lora_merge={self.config.lora_merge!r}, strict={self.config.strict})"
        )


# --------------------------------------------------------------------------------------------- bundle file I/O


def _atomic_save_file(tensors: Mapping[str, torch.Tensor], path: Path) -> str:
    """``safetensors.torch.save_file`` to a temporary file in the same folder, fsync, rename; return its sha256.

    Streams to disk (unlike ``utils.atomic_save_safetensors``, which serialises to bytes first, doubling memory
    for a ViT-B/16 unified delta)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        digest = _sha256(tmp)
    return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _committed_paths(folder: Path) -> dict[str, Path]:
    """Where each bundle file of ``folder`` is: in the staging folder when a save was killed after its commit
    point (staged manifest written) but before every file was moved into place, else in ``folder`` itself."""
    stage = folder / STAGING_DIR
    # a staging folder is the bundle's own real sub-folder: a symlink (to another bundle) never redirects a load
    committed = not stage.is_symlink() and stage.is_dir() and (stage / MANIFEST).is_file()
    names = (MANIFEST, UNIFIED_FILE, MASKS_FILE, PROTOTYPES_FILE)
    return {n: stage / n if committed and (stage / n).is_file() else folder / n for n in names}


def _finish_pending_save(folder: Path) -> None:
    """Complete a committed save left in the staging folder (move its files into place, the manifest last), or
    drop an uncommitted one; then remove the staging folder."""
    import shutil

    stage = folder / STAGING_DIR
    if stage.is_symlink():
        stage.unlink()  # never a save of this bundle (saves create a real folder): drop it, never follow it
        return
    if not stage.exists():
        return
    if (stage / MANIFEST).is_file():
        for name in (UNIFIED_FILE, MASKS_FILE, PROTOTYPES_FILE, MANIFEST):
            if (stage / name).is_file():
                os.replace(stage / name, folder / name)
    shutil.rmtree(stage)


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode("utf-8")).hexdigest()


def _check_manifest_integrity(folder: Path, manifest: dict) -> None:
    """The manifest's own checksum, and a sha256 in ``files`` for every bundle file (a missing entry is
    corruption, not a reason to skip verification)."""
    digest = manifest.get(MANIFEST_CHECKSUM)
    if not isinstance(digest, str) or digest != _manifest_digest(manifest):
        what = "has no checksum" if digest is None else "does not match its checksum"
        raise BundleError(
            f"Bundle {str(folder)!r}: {MANIFEST} {what} ({MANIFEST_CHECKSUM}): it was edited or is corrupt; "
            "re-save the bundle (or load with verify=False to accept it as is)."
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"Bundle {str(folder)!r}: {MANIFEST} has no 'files' checksums.")
    for name in _BUNDLE_FILES:
        if not isinstance(files.get(name), str):
            raise BundleError(f"Bundle {str(folder)!r}: {MANIFEST} has no checksum for {name} in 'files'.")


def _read_manifest(folder: Path, file: Path) -> dict:
    """The manifest ``file`` of bundle ``folder`` (in the folder, or in its staging folder: :func:`_committed_paths`)."""
    if not file.is_file():
        raise BundleError(f"{str(folder)!r} is not a ConDU bundle: {MANIFEST} is missing.")
    manifest = read_json_object(file, BundleError, f"Bundle {str(folder)!r}: {MANIFEST}")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"Bundle {str(folder)!r}: {MANIFEST} is not a {BUNDLE_FORMAT} manifest.")
    if manifest.get("format_version") != BUNDLE_VERSION:
        raise BundleError(
            f"Bundle {str(folder)!r} has format version {manifest.get('format_version')!r}; this hf_cft reads {BUNDLE_VERSION}."
        )
    return manifest


def _load_checked(folder: Path, file: Path, digest: str | None, verify: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    fname = file.name
    if not file.is_file():
        raise BundleError(f"Bundle {str(folder)!r} lacks {fname}.")
    if verify and digest is not None and _sha256(file) != digest:
        raise BundleError(
            f"Bundle {str(folder)!r}: {fname} does not match the checksum in {MANIFEST} (corrupt, or a save was "
            "interrupted)."
        )
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises SafetensorError / OSError on damaged headers
        raise BundleError(f"Bundle {str(folder)!r}: cannot read {fname} ({exc}).") from exc


def _download_bundle(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[MANIFEST, "*.safetensors", "*.md"]))
    except Exception as exc:  # offline, unknown repo, auth: one typed error naming the repo
        raise BundleError(
            f"{repo_id!r} is neither a local bundle folder nor a downloadable Hub repo ({type(exc).__name__}: {exc})."
        ) from exc

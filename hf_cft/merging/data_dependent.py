"""Data-dependent merging: RegMean and Fisher merging, with statistics gathered on a small calibration loader.

Both need, per task, statistics of that task's fine-tuned model on a few batches of that task's data:

* **RegMean** (Jin et al., ICLR 2023, arXiv:2212.09849): per ``nn.Linear`` the Gram matrix G_t = X_tᵀX_t of the
  layer's inputs (every token of every example is a row of X_t), gathered with forward hooks
  (:func:`linear_input_grams`); the merged weight minimises Σ_t ‖X_t W − X_t W_t‖², i.e.
  W* = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹ (``nn.Linear``'s [out, in] layout), with the off-diagonal entries of every G_t
  scaled by α: G̃_t = α·G_t + (1 − α)·diag(G_t) (:func:`regmean`). As W_t = W0 + τ_t and Σ_t G̃_t (Σ_t G̃_t)⁻¹ = I,
  the merged delta is (Σ_t τ_t G̃_t)(Σ_t G̃_t)⁻¹. Keys without Gram matrices (biases, LayerNorms, embeddings, the
  text tower when only images were run) get the plain mean of the deltas, as in the paper.
* **Fisher merging** (Matena & Raffel, NeurIPS 2022, arXiv:2111.09832): per parameter the diagonal Fisher
  F_t = E_x E_{y~p_t(y|x)} [(∂ log p_t(y|x)/∂θ)²] (:func:`fisher_diagonal`, per-example gradients), and the merge
  θ* = Σ_t λ_t F_t θ_t / Σ_t λ_t F_t, i.e. the delta Σ_t λ_t F_t τ_t / Σ_t λ_t F_t (:func:`fisher_merging`).

For hf_cft's CLIP models the defaults run the image tower: a batch is a dict with ``pixel_values`` (what
:class:`~hf_cft.data.ImageClassificationCollator` makes), and :func:`clip_log_probs` turns a model into the zero-shot
classifier of the task's class names (its text head computed once per set of weights, without gradients).

Example::

    from hf_cft.merging.data_dependent import regmean_merge, fisher_merge, clip_log_probs

    delta = regmean_merge(clip, [expert_a, expert_b], [loader_a, loader_b], alpha=0.6)
    delta = fisher_merge(clip, [expert_a, expert_b], [loader_a, loader_b],
                         [clip_log_probs(tok, names_a, templates), clip_log_probs(tok, names_b, templates)])
    merged = apply_delta(copy.deepcopy(clip), delta)

A loader is a ``DataLoader``, any iterable of batches, or a dataset (rows with ``pixel_values`` and ``labels``,
wrapped in a ``DataLoader`` with hf_cft's collator); ``max_batches`` caps how much of it is used.

From a dataset on disk (what ``hf-cft merge`` does with a merge config's ``calibration`` sections),
:func:`load_calibration` reads a local Parquet / ImageFolder dataset, a shared-data name or a Hub dataset id with
:func:`hf_cft.data.load_classification_dataset`, draws ``rows`` rows of one split with a seed
(:func:`calibration_rows`), and returns their loader with the dataset's class names and templates::

    transform = hf_cft.data.model_transform(clip)
    dtd = load_calibration("dtd10", transform, rows=256, batch_size=32, seed=0)
    delta = fisher_merge(clip, [expert_dtd, ...], [dtd.loader, ...],
                         [clip_log_probs(tok, dtd.classnames, dtd.templates), ...])
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hf_cft.errors import DatasetFormatError, DeltaError, MergeConfigError, TaskError
from hf_cft.merging.baselines import Delta, _check_deltas, _f32, _finite_result, _weights
from hf_cft.validation import check_choice, check_int, check_number

__all__ = [
    "CALIBRATION_DEFAULTS",
    "FISHER_LABELS",
    "CalibrationData",
    "LinearGrams",
    "calibration_batches",
    "calibration_rows",
    "clip_log_probs",
    "fisher_diagonal",
    "fisher_merge",
    "fisher_merging",
    "image_forward",
    "linear_input_grams",
    "load_calibration",
    "regmean",
    "regmean_merge",
]

Batch = Mapping[str, Tensor] | Tensor
Forward = Callable[[nn.Module, Batch], object]


# ------------------------------------------------------------------------------------------------ inputs


def calibration_batches(data, batch_size: int = 16, max_batches: int | None = None) -> Iterable:
    """The batches of ``data``: a ``DataLoader`` or an iterable of batches as given; a dataset (has ``__len__`` and
    ``__getitem__`` and is not a list of batches) wrapped in a ``DataLoader`` with hf_cft's image collator. At most
    ``max_batches`` of them."""
    from torch.utils.data import DataLoader

    if max_batches is not None:
        max_batches = check_int(max_batches, "max_batches", low=1, error=MergeConfigError)
    if data is None:
        raise DatasetFormatError("no calibration data: pass a DataLoader, an iterable of batches or a dataset.")
    if not isinstance(data, (DataLoader, list, tuple)) and hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        from hf_cft.data.transforms import ImageClassificationCollator

        data = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=ImageClassificationCollator())

    def batches():
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                return
            yield batch

    return batches()


#: The calibration defaults of a merge config (FusionBench's CLIP settings: 256 examples per task, batches of 32).
CALIBRATION_DEFAULTS = {"rows": 256, "batch_size": 32, "seed": 0, "split": "train"}


def calibration_rows(available: int, rows: int, seed: int = 0) -> list[int]:
    """The rows of a split of ``available`` rows that calibrate a merge: the first ``rows`` of a permutation drawn
    with ``numpy.random.default_rng(seed)``, in ascending order (the same rows for the same split, rows and seed)."""
    import numpy as np

    return sorted(int(i) for i in np.random.default_rng(int(seed)).permutation(int(available))[: int(rows)])


@dataclass
class CalibrationData:
    """One input's calibration data (:func:`load_calibration`): its ``loader`` (batches of ``pixel_values`` and
    ``labels``), the dataset's ``classnames`` and ``templates`` (Fisher's zero-shot head), and what was used: the
    dataset ``name``, its ``split``, the ``rows`` drawn (indices into the split) out of ``available``."""

    name: str
    split: str
    loader: object
    classnames: list[str]
    templates: list[str]
    rows: list[int]
    available: int

    def describe(self) -> dict:
        """What a merge card and a summary show: dataset, split, rows used / available, classes."""
        return {
            "dataset": self.name,
            "split": self.split,
            "rows": len(self.rows),
            "available": self.available,
            "classes": len(self.classnames),
        }


def load_calibration(
    source,
    transform=None,
    *,
    rows: int = CALIBRATION_DEFAULTS["rows"],
    batch_size: int = CALIBRATION_DEFAULTS["batch_size"],
    seed: int = CALIBRATION_DEFAULTS["seed"],
    split: str = CALIBRATION_DEFAULTS["split"],
    data_dir=None,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    where: str = "calibration.data",
    rows_where: str = "calibration.rows",
    split_where: str = "calibration.split",
    batch_size_where: str = "calibration.batch_size",
    classnames_where: str = "calibration.classnames",
    templates_where: str = "calibration.templates",
) -> CalibrationData:
    """``rows`` rows of ``split`` of a dataset the library reads (a Parquet or ImageFolder folder, a name under
    ``data_dir`` / ``$HF_CFT_DATA_DIR`` / ``../shared/data``, a spec name or a Hub dataset id:
    :func:`hf_cft.data.load_classification_dataset`; or a :class:`~hf_cft.data.ClassificationDataset`), chosen
    by :func:`calibration_rows`, as a loader of ``transform``'s ``pixel_values`` (an
    :class:`~hf_cft.data.ImageTransform`; default: CLIP's 224-pixel preprocessing) and ``labels`` in batches of
    ``batch_size``. ``classnames`` / ``templates`` override the dataset's.

    A source that cannot be read (missing, not a dataset, no image / label column), a missing or empty split, or
    fewer than ``rows`` rows, class names that do not match its labels raise :class:`~hf_cft.errors.MergeConfigError`
    naming the field (``where``, ``rows_where``, ``split_where``, ``batch_size_where``, ``classnames_where``,
    ``templates_where``: how the caller's config spells them, e.g. ``inputs[1].calibration.data``)."""
    from torch.utils.data import DataLoader

    from hf_cft.data import ClassificationDataset, load_classification_dataset
    from hf_cft.data.templates import validate_classnames, validate_templates
    from hf_cft.data.transforms import ImageClassificationCollator, ImageTransform, apply_image_transform
    from hf_cft.errors import HfCftError

    rows = check_int(rows, rows_where, low=1, error=MergeConfigError)
    batch_size = check_int(batch_size, batch_size_where, low=1, error=MergeConfigError)
    if isinstance(source, ClassificationDataset):
        task, label = source, source.name
    else:
        if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
            raise MergeConfigError(
                f"{where} must name a dataset (a folder, a shared dataset name or a Hub id), got {source!r}."
            )
        label = str(source)
        try:
            task = load_classification_dataset(source, data_dir=data_dir)
        except HfCftError as exc:
            raise MergeConfigError(f"{where} {label!r} cannot be used as calibration data: {exc}") from exc
    if split not in task.splits:
        raise MergeConfigError(
            f"{where} {label!r} has no split {split!r} ({split_where}); it has {', '.join(task.splits)}."
        )
    data = task[split]
    available = len(data)
    if available == 0:
        raise MergeConfigError(f"{where} {label!r}: split {split!r} is empty, no calibration data.")
    if available < rows:
        raise MergeConfigError(
            f"{where} {label!r} has {available} row(s) in split {split!r}, fewer than {rows_where} = {rows}: lower "
            f"{rows_where} to at most {available}, or give a larger split."
        )
    chosen = calibration_rows(available, rows, seed)
    try:
        names = validate_classnames(
            classnames if classnames is not None else task.classnames,
            owner=f"{where} {label!r}",
            num_labels=task.num_classes,
            duplicates="error",
        )
    except HfCftError as exc:
        raise MergeConfigError(f"{classnames_where}: {exc}") from exc
    try:
        tpl = validate_templates(templates if templates is not None else task.templates, owner=f"{where} {label!r}")
    except HfCftError as exc:
        raise MergeConfigError(f"{templates_where}: {exc}") from exc
    view = apply_image_transform(data.select(chosen), transform or ImageTransform(), name=task.name)
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, collate_fn=ImageClassificationCollator())
    return CalibrationData(task.name, split, loader, list(names), list(tpl), chosen, available)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    raise DatasetFormatError(
        f"a calibration batch must be a dict of tensors or a tensor of pixel values, got {type(batch).__name__}."
    )


def _batch_len(batch: Batch) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    first = next((v for v in batch.values() if isinstance(v, Tensor) and v.ndim > 0), None)
    if first is None:
        raise DatasetFormatError(f"a calibration batch holds no batched tensor (keys {sorted(batch)}).")
    return first.shape[0]


def _row(batch: Batch, i: int) -> Batch:
    """Example ``i`` of a batch, as a batch of one."""
    if isinstance(batch, Tensor):
        return batch[i : i + 1]
    return {k: v[i : i + 1] if isinstance(v, Tensor) and v.ndim > 0 else v for k, v in batch.items()}


def _pixel_values(batch: Batch) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if "pixel_values" not in batch:
        raise DatasetFormatError(f"a calibration batch lacks 'pixel_values' (it has {sorted(batch)}).")
    return batch["pixel_values"]


def image_forward(model: nn.Module, batch: Batch) -> Tensor:
    """The default calibration forward: the CLIP image tower on the batch's ``pixel_values`` (projected features)."""
    from hf_cft.models.clip import image_features

    return image_features(model, _pixel_values(batch))


def _device(model: nn.Module) -> torch.device:
    from hf_cft.models.clip import model_device

    return model_device(model)


def _run(model: nn.Module, delta: Mapping[str, Tensor] | None, fn: Callable, *args):
    """``fn(model, *args)`` with the weights θ + δ (``delta``) or θ (``None``)."""
    if not delta:
        return fn(model, *args)
    from hf_cft.merging.deltas import FunctionalExpert

    return FunctionalExpert(model, delta).run(fn, *args)


# ------------------------------------------------------------------------------------------------ RegMean


@dataclass
class LinearGrams:
    """Per ``nn.Linear`` weight key (``"<module>.weight"``), the Gram matrix XᵀX of the layer's inputs [in, in]
    (float64, summed over rows) and the number of rows it was summed over."""

    grams: dict[str, Tensor]
    rows: dict[str, int]

    def __getitem__(self, key: str) -> Tensor:
        return self.grams[key]

    def __contains__(self, key: object) -> bool:
        return key in self.grams

    def __iter__(self):
        return iter(self.grams)

    def __len__(self) -> int:
        return len(self.grams)

    def keys(self):
        return self.grams.keys()

    def mean(self) -> dict[str, Tensor]:
        """XᵀX / rows per key (the reference code's per-example average)."""
        return {k: g / max(1, self.rows[k]) for k, g in self.grams.items()}


def linear_input_grams(
    model: nn.Module,
    data,
    forward: Forward | None = None,
    delta: Mapping[str, Tensor] | None = None,
    modules: Callable[[str, nn.Linear], bool] | Iterable[str] | None = None,
    max_batches: int | None = None,
    batch_size: int = 16,
) -> LinearGrams:
    """RegMean's statistics: run ``forward(model, batch)`` (default :func:`image_forward`) over ``data`` without
    gradients and, with a forward hook on every ``nn.Linear`` (or those ``modules`` selects: a predicate
    ``(name, module)`` or a collection of module names), sum XᵀX over every input row (all leading dimensions
    flattened: tokens × examples). ``delta``: gather the statistics of θ + δ instead of θ (``functional_call``, the
    model is not modified). Linear layers the forward never reaches are left out."""
    forward = forward or image_forward
    if modules is None:
        chosen = lambda name, module: True  # noqa: E731
    elif callable(modules):
        chosen = modules
    else:
        names = set(modules)
        chosen = lambda name, module: name in names  # noqa: E731
    grams: dict[str, Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name):
        def fn(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            key = f"{name}.weight" if name else "weight"  # the model itself an nn.Linear: its key is "weight"
            g = x.T @ x
            grams[key] = grams[key] + g if key in grams else g
            rows[key] = rows.get(key, 0) + x.shape[0]

        return fn

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear) and chosen(n, m)
    ]
    device = _device(model)
    seen = 0
    try:
        with torch.no_grad():
            for batch in calibration_batches(data, batch_size, max_batches):
                _run(model, delta, forward, _to_device(batch, device))
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise DatasetFormatError("the calibration data yielded no batch: RegMean has no statistics to merge with.")
    return LinearGrams(grams={k: g.cpu() for k, g in grams.items()}, rows=rows)


def _reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """G̃ = α·G + (1 − α)·diag(G)."""
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def _solve_right(numerator: Tensor, gram_sum: Tensor) -> Tensor:
    """numerator · gram_sum⁻¹ for a symmetric ``gram_sum`` (the pseudo-inverse where it is singular, e.g. an input
    feature that is always 0)."""
    try:
        return torch.linalg.solve(gram_sum, numerator.T).T
    except torch.linalg.LinAlgError:
        return numerator @ torch.linalg.pinv(gram_sum, hermitian=True)


def regmean(
    deltas: Sequence[Mapping[str, Tensor]],
    grams: Sequence[Mapping[str, Tensor]],
    alpha: float = 0.6,
    normalize: bool = False,
) -> Delta:
    """RegMean's closed form on task deltas (see the module docstring): for every key with a Gram matrix in every
    task's ``grams`` (:func:`linear_input_grams`, or any ``{weight key: [in, in]}``), τ* = (Σ_t τ_t G̃_t)(Σ_t G̃_t)⁻¹;
    for the other keys the mean of the deltas.

    Args:
        alpha: the off-diagonal scale α ∈ [0, 1] of G̃_t = α·G_t + (1 − α)·diag(G_t) (0.6; the paper tunes
            it: α = 1 is the exact least-squares merge, α = 0 a per-input-feature weighted average). FusionBench's
            ``reduce_non_diagonal_ratio`` is this α: its CLIP config uses 0.95, its GPT-2 config 0.6.
        normalize: divide each G_t by its number of rows first (the reference code's per-example average; matters
            only when the tasks' calibration sets differ in size). Needs :class:`LinearGrams`.

    A key with Gram matrices in some tasks but not all, or one of the wrong shape, raises
    :class:`~hf_cft.errors.DeltaError` naming it; a Gram key that is not a delta key is ignored (a layer that was
    not fine-tuned).
    """
    deltas = _check_deltas(deltas)
    alpha = check_number(alpha, "alpha", low=0.0, high=1.0, error=MergeConfigError)
    grams = list(grams)
    if len(grams) != len(deltas):
        raise TaskError(f"regmean got {len(grams)} sets of Gram matrices for {len(deltas)} task deltas.")
    if normalize:
        if not all(isinstance(g, LinearGrams) for g in grams):
            raise MergeConfigError("regmean(normalize=True) needs LinearGrams (they carry the row counts).")
        grams = [g.mean() for g in grams]
    out = {}
    for key, first in deltas[0].items():
        present = [key in g for g in grams]
        if not any(present):
            out[key] = sum(_f32(d[key]) for d in deltas) / len(deltas)
            continue
        if not all(present):
            missing = [i for i, p in enumerate(present) if not p]
            raise DeltaError(f"key {key!r} has Gram matrices for some tasks but not for task(s) {missing}.")
        if first.ndim != 2:
            raise DeltaError(f"key {key!r} has Gram matrices but its delta is {first.ndim}-D, not a linear weight.")
        numerator = torch.zeros(first.shape, dtype=torch.float64)
        total = torch.zeros(first.shape[1], first.shape[1], dtype=torch.float64)
        for i, (d, g) in enumerate(zip(deltas, grams)):
            gram = g[key].double().cpu()
            if tuple(gram.shape) != (first.shape[1], first.shape[1]):
                raise DeltaError(
                    f"the Gram matrix of key {key!r} of task {i} has shape {tuple(gram.shape)}, expected "
                    f"{(first.shape[1], first.shape[1])} (the weight's input size)."
                )
            if not bool(torch.isfinite(gram).all()):
                raise DeltaError(f"the Gram matrix of key {key!r} of task {i} holds NaN or inf.")
            gram = _reduce_off_diagonal(gram, alpha)
            numerator += d[key].double().cpu() @ gram
            total += gram
        out[key] = _solve_right(numerator, total).to(torch.float32).to(first.device)
    return _finite_result(out, f"alpha={alpha!r}")


def regmean_merge(
    base: nn.Module,
    models: Sequence[nn.Module],
    data: Sequence,
    alpha: float = 0.6,
    forward: Forward | None = None,
    keys: str | Sequence[str] | None = "trainable",
    max_batches: int | None = None,
    batch_size: int = 16,
) -> Delta:
    """RegMean from models: each model's delta from ``base`` (:func:`~hf_cft.merging.delta_from_models` with
    ``keys``) and its Gram matrices on its own calibration data (``data[i]`` for ``models[i]``; one loader for every
    model is accepted too), merged by :func:`regmean`. Returns the merged delta (θ = θ0 + delta)."""
    from hf_cft.merging.deltas import delta_from_models

    models = list(models)
    loaders = _per_model(data, len(models))
    deltas = [delta_from_models(base, m, keys=keys) for m in models]
    grams = [
        linear_input_grams(m, d, forward, max_batches=max_batches, batch_size=batch_size)
        for m, d in zip(models, loaders)
    ]
    return regmean(deltas, grams, alpha=alpha)


def _per_model(data, n: int) -> list:
    """One calibration source per model: a list/tuple of ``n`` sources as given, else ``data`` shared by all (a
    list of batches counts as one source)."""
    if n == 0:
        raise TaskError("no models to merge.")
    if isinstance(data, (list, tuple)) and not all(isinstance(b, (Tensor, Mapping)) for b in data):
        if len(data) != n:
            raise TaskError(f"got {len(data)} calibration sources for {n} models: give one per model, or one for all.")
        return list(data)
    return [data] * n


# ------------------------------------------------------------------------------------------------ Fisher

FISHER_LABELS = ("sample", "expected", "empirical")


def clip_log_probs(
    tokenizer, classnames: Sequence[str], templates: Sequence[str]
) -> Callable[[nn.Module, Batch], Tensor]:
    """``fn(model, batch) -> [B, C]`` log-probabilities of the CLIP zero-shot classifier of ``classnames`` (the
    template-ensembled text head of the weights in use, built once per set of weights and without gradients, so the
    Fisher of the text tower is 0 there) on the batch's ``pixel_values``."""
    from hf_cft.models.clip import check_clip_like, clip_logits, image_features
    from hf_cft.models.zeroshot import build_zeroshot_classifier

    cache: dict[tuple, Tensor] = {}

    def fn(model: nn.Module, batch: Batch) -> Tensor:
        base = check_clip_like(model)
        ident = (id(model), *(p.data_ptr() for p in base.text_projection.parameters()))
        if ident not in cache:
            cache.clear()
            cache[ident] = build_zeroshot_classifier(model, tokenizer, classnames, templates)
        logits = clip_logits(model, image_features(model, _pixel_values(batch)), cache[ident])
        return torch.log_softmax(logits.float(), dim=-1)

    return fn


def fisher_diagonal(
    model: nn.Module,
    data,
    log_probs: Callable[[nn.Module, Batch], Tensor],
    keys: Iterable[str] | None = None,
    labels: str = "sample",
    delta: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    batch_size: int = 16,
) -> dict[str, Tensor]:
    """The diagonal Fisher of ``model`` (θ + ``delta`` when given) over ``data``: the mean over examples of
    (∂ log p(y|x)/∂θ)², with per-example gradients, for the parameters ``keys`` (default: every floating-point
    parameter; the model's ``requires_grad`` flags are not used or changed).

    ``log_probs(model, batch)`` returns [B, C] log-probabilities (or logits: a log-softmax is applied).
    ``labels``: ``"sample"`` (default: one y ~ p(y|x) per example, drawn from a generator seeded with ``seed``, the
    paper's Monte-Carlo Fisher), ``"expected"`` (Σ_y p(y|x)·g_y², the exact expectation: C backward passes per
    example) or ``"empirical"`` (the batch's ``labels``). Returns fp32 tensors on the CPU.
    """
    from torch.func import functional_call

    from hf_cft.merging.deltas import _Runner

    check_choice(labels, "labels", FISHER_LABELS, error=MergeConfigError)
    named = dict(model.named_parameters())
    keys = [k for k, p in named.items() if p.is_floating_point()] if keys is None else list(keys)
    for k in keys:
        if k not in named:
            raise DeltaError(f"key {k!r} is not a parameter of {type(model).__name__}.")
    params = {}
    for k in keys:
        p = named[k].detach().float()
        if delta is not None and k in delta:
            p = p + delta[k].to(device=p.device, dtype=torch.float32)
        params[k] = p.clone().requires_grad_(True)
    if delta is not None:
        for k in delta:
            if k not in params:
                raise DeltaError(f"delta key {k!r} is not among the Fisher keys.")
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    gen = torch.Generator().manual_seed(int(seed))
    device = _device(model)
    runner = _Runner(model, log_probs)
    wrapped = {f"model.{k}": p for k, p in params.items()}
    examples = 0
    with torch.enable_grad():
        for batch in calibration_batches(data, batch_size, max_batches):
            batch = _to_device(batch, device)
            if labels == "empirical" and (not isinstance(batch, Mapping) or "labels" not in batch):
                raise DatasetFormatError("fisher_diagonal(labels='empirical') needs batches with 'labels'.")
            for i in range(_batch_len(batch)):  # one example per forward: per-example gradients, O(B) backward work
                example = _row(batch, i)
                logp = torch.log_softmax(functional_call(runner, wrapped, (example,), strict=False).float(), dim=-1)
                logp = logp.reshape(-1)
                if labels == "expected":
                    probs = logp.detach().exp().tolist()
                    targets = [(c, w) for c, w in enumerate(probs) if w > 0.0]
                elif labels == "sample":
                    targets = [(int(torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen)), 1.0)]
                else:
                    targets = [(int(example["labels"].reshape(-1)[0]), 1.0)]
                for n_done, (c, weight) in enumerate(targets):
                    last = n_done == len(targets) - 1
                    grads = torch.autograd.grad(
                        logp[c], list(params.values()), retain_graph=not last, allow_unused=True
                    )
                    for k, g in zip(params, grads):
                        if g is not None:
                            fisher[k] += weight * g.detach().pow(2)
                examples += 1
                del logp
    if examples == 0:
        raise DatasetFormatError("the calibration data yielded no example: no Fisher to merge with.")
    return {k: (f / examples).cpu() for k, f in fisher.items()}


def fisher_merging(
    deltas: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    weights: float | Sequence[float] = 1.0,
    floor: float = 1e-6,
    normalize: bool = False,
) -> Delta:
    """Fisher merging on task deltas: τ* = Σ_t λ_t F̂_t ⊙ τ_t / Σ_t λ_t F̂_t with F̂_t = F_t + ``floor``.

    Args:
        weights: the model weights λ_t (one for all, or one per task; 1 = the paper's default).
        floor: added to every Fisher entry (1e-6, the value of the reference code and FusionBench), so that an entry
            no task's data touched gets the plain (λ-weighted) average instead of 0/0.
        normalize: FusionBench's ``normalize_fisher_weight`` (off by default, as in the paper): task t's weight
            becomes λ_t·F̂_t/(‖F_t‖ + ``floor``), ‖F_t‖ the L2 norm of its Fisher over every delta key, so each
            task's Fisher counts by its shape, not its scale. The floor is added before the division, as FusionBench
            does (``(F_t + floor)/(‖F_t‖ + floor)``; checked against it in ``benchmarks/fusionbench_parity.py``).

    A delta key missing from a task's Fisher raises :class:`~hf_cft.errors.DeltaError` naming it, unless it is
    missing from every task (then the keys' plain λ-weighted average is used).
    """
    deltas = _check_deltas(deltas)
    fishers = list(fishers)
    if len(fishers) != len(deltas):
        raise TaskError(f"fisher_merging got {len(fishers)} Fisher sets for {len(deltas)} task deltas.")
    lam = _weights(weights, len(deltas), name="weights")
    if sum(lam) == 0:
        raise MergeConfigError("fisher_merging weights sum to 0: the merge is undefined.")
    floor = check_number(floor, "floor", low=0.0, error=MergeConfigError)
    scales = [1.0] * len(fishers)
    if normalize:
        for i, f in enumerate(fishers):
            norm = math.sqrt(sum(float(v.double().pow(2).sum()) for k, v in f.items() if k in deltas[0])) + floor
            scales[i] = 1.0 / norm if norm > 0 else 1.0
    out = {}
    for key, first in deltas[0].items():
        present = [key in f for f in fishers]
        if not all(present):
            if any(present):
                missing = [i for i, p in enumerate(present) if not p]
                raise DeltaError(f"key {key!r} has a Fisher for some tasks but not for task(s) {missing}.")
            out[key] = sum(w * _f32(d[key]) for w, d in zip(lam, deltas)) / sum(lam)
            continue
        num = torch.zeros(first.shape, dtype=torch.float64)
        den = torch.zeros(first.shape, dtype=torch.float64)
        for i, (w, d, f) in enumerate(zip(lam, deltas, fishers)):
            fk = f[key].double().cpu()
            if tuple(fk.shape) != tuple(first.shape):
                raise DeltaError(
                    f"the Fisher of key {key!r} of task {i} has shape {tuple(fk.shape)}, not the delta's."
                )
            if not bool(torch.isfinite(fk).all()) or bool((fk < 0).any()):
                raise DeltaError(f"the Fisher of key {key!r} of task {i} holds NaN, inf or negative values.")
            weight = (w * scales[i]) * (fk + floor)
            num += weight * d[key].double().cpu()
            den += weight
        if bool((den == 0).any()):
            raise MergeConfigError(
                f"the Fisher weights of key {key!r} sum to 0 somewhere (floor=0 and no task's data touched it); "
                "use floor > 0."
            )
        out[key] = (num / den).to(torch.float32).to(first.device)
    return _finite_result(out, "the Fisher weights")


def fisher_merge(
    base: nn.Module,
    models: Sequence[nn.Module],
    data: Sequence,
    log_probs: Callable | Sequence[Callable],
    weights: float | Sequence[float] = 1.0,
    labels: str = "sample",
    keys: str | Sequence[str] | None = "trainable",
    floor: float = 1e-6,
    normalize: bool = False,
    seed: int = 0,
    max_batches: int | None = None,
    batch_size: int = 16,
) -> Delta:
    """Fisher merging from models: each model's delta from ``base`` (``keys`` as
    :func:`~hf_cft.merging.delta_from_models`), its diagonal Fisher on its own data (``data[i]``, ``log_probs[i]``
    or one of each for all), merged by :func:`fisher_merging`."""
    from hf_cft.merging.deltas import delta_from_models

    models = list(models)
    loaders = _per_model(data, len(models))
    fns = list(log_probs) if isinstance(log_probs, (list, tuple)) else [log_probs] * len(models)
    if len(fns) != len(models):
        raise TaskError(f"got {len(fns)} log_probs functions for {len(models)} models.")
    deltas = [delta_from_models(base, m, keys=keys) for m in models]
    fishers = [
        fisher_diagonal(
            m, d, fn, keys=list(delta), labels=labels, seed=seed, max_batches=max_batches, batch_size=batch_size
        )
        for m, d, fn, delta in zip(models, loaders, fns, deltas)
    ]
    return fisher_merging(deltas, fishers, weights=weights, floor=floor, normalize=normalize)


# ------------------------------------------------------------------------------------------------ registry
# ``kind="model"`` entries of hf_cft.merging.registry. What they need beyond the deltas comes through
# ``ModelContext.extra``: ``calibration`` (one loader / dataset / list of batches for all inputs, or a list with one
# per input; :class:`CalibrationData` entries are unwrapped), ``model`` (θ0 as an ``nn.Module``; default: loaded
# from ``ModelContext.base_model``), ``forward`` (RegMean's calibration forward) and for Fisher ``log_probs`` (a
# function or one per input) or ``tokenizer`` + ``classnames`` (one list, or one per input) + ``templates`` (one
# list, or one per input), for the CLIP zero-shot classifier. ``input_names``: how errors name each input's
# calibration data (default ``input t``; ``hf-cft merge`` passes ``inputs[t].calibration.data 'dtd10'``).


def _context_model(ctx) -> nn.Module:
    model = ctx.extra.get("model")
    if model is None:
        model = ctx.base_model
    if isinstance(model, nn.Module):
        return model
    if model is None:
        raise MergeConfigError(
            "this method runs the model on calibration data: pass the base model (a folder, or extra={'model': ...})."
        )
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(model)).eval()


def _context_data(ctx, name: str) -> list:
    data = ctx.extra.get("calibration")
    if data is None:
        raise MergeConfigError(
            f"method {name!r} needs calibration data: pass extra={{'calibration': loader}} (one for every input, or a "
            "list with one per input), or a merge config's calibration sections."
        )
    data = data.loader if isinstance(data, CalibrationData) else data
    if isinstance(data, (list, tuple)):
        data = [d.loader if isinstance(d, CalibrationData) else d for d in data]
    return _per_model(data, len(ctx.inputs))


def _input_names(ctx) -> list[str]:
    names = ctx.extra.get("input_names")
    return list(names) if names else [f"input {t}" for t in range(len(ctx.inputs))]


def _check_statistics(stats: Mapping[str, Tensor], what: str, input_name: str, method: str) -> None:
    """A statistic of one input holding NaN/inf names the input's calibration data, the key and the method (instead
    of a NaN merge, or a DeltaError about "task t" far from the config)."""
    from hf_cft.errors import NonFiniteError

    for key, value in stats.items():
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteError(
                f"{method}: the {what} of key {key!r} gathered on {input_name} holds NaN/inf (the model's activations "
                "or gradients overflow on that data, or the input's weights hold NaN/inf); check that input and its "
                "data."
            )


def _dense_deltas(deltas, ctx) -> list[dict[str, Tensor]]:
    """Every input's delta over the union of the inputs' keys (zeros where an input has none)."""
    keys = [k for k in ctx.shapes if any(k in d for d in deltas)]
    return [{k: d[k] if k in d else torch.zeros(ctx.shapes[k]) for k in keys} for d in deltas]


def _regmean_model(deltas, ctx):
    model = _context_model(ctx)
    data = _context_data(ctx, "regmean")
    dense = _dense_deltas(deltas, ctx)
    forward = ctx.extra.get("forward")
    max_batches = ctx.options["max_batches"]
    grams = []
    for d, delta, name in zip(data, dense, _input_names(ctx)):
        g = linear_input_grams(model, d, forward, delta=delta, max_batches=max_batches)
        _check_statistics(g.grams, "Gram matrix", name, "regmean")
        grams.append(g)
    return regmean(dense, grams, alpha=ctx.options["alpha"], normalize=ctx.options["normalize"])


def _per_input(value, n: int, what: str) -> list:
    """``value`` as one entry per input: a list of ``n`` lists as given, else one list shared by all."""
    if value and isinstance(value[0], (list, tuple)):
        if len(value) != n:
            raise MergeConfigError(f"got {len(value)} lists of {what} for {n} inputs: give one, or one per input.")
        return [list(v) for v in value]
    return [list(value)] * n


def _fisher_log_probs(ctx) -> list:
    fns = ctx.extra.get("log_probs")
    n = len(ctx.inputs)
    if fns is None:
        tokenizer, names = ctx.extra.get("tokenizer"), ctx.extra.get("classnames")
        if tokenizer is None or names is None:
            raise MergeConfigError(
                "method 'fisher' needs the classifier: extra={'log_probs': fn} or extra={'tokenizer': ..., "
                "'classnames': [...], 'templates': [...]} (class names and templates: one list, or one per input)."
            )
        per = _per_input(names, n, "class names")
        templates = _per_input(ctx.extra.get("templates") or ["a photo of a {}."], n, "templates")
        fns = [clip_log_probs(tokenizer, c, t) for c, t in zip(per, templates)]
    fns = list(fns) if isinstance(fns, (list, tuple)) else [fns] * n
    if len(fns) != n:
        raise MergeConfigError(f"got {len(fns)} log_probs functions for {n} inputs.")
    return fns


def _fisher_model(deltas, ctx):
    model = _context_model(ctx)
    data = _context_data(ctx, "fisher")
    dense = _dense_deltas(deltas, ctx)
    fns = _fisher_log_probs(ctx)
    opts = ctx.options
    fishers = []
    for d, fn, delta, name in zip(data, fns, dense, _input_names(ctx)):
        f = fisher_diagonal(
            model,
            d,
            fn,
            keys=list(delta),
            labels=opts["labels"],
            delta=delta,
            seed=opts["seed"],
            max_batches=opts["max_batches"],
        )
        _check_statistics(f, "Fisher", name, "fisher")
        fishers.append(f)
    weights = [inp["weight"] for inp in ctx.inputs]
    return fisher_merging(dense, fishers, weights=weights, floor=opts["floor"], normalize=opts["normalize"])


def _register() -> None:
    from hf_cft.merging.registry import MergeMethod, Option, register

    batches = Option("max_batches", None, "int", low=1, help="calibration batches used per input (default: all)")
    register(
        MergeMethod(
            "regmean",
            "model",
            _regmean_model,
            (
                Option("alpha", 0.6, low=0.0, high=1.0, help="off-diagonal scale of the Gram matrices"),
                Option("normalize", False, "bool", help="divide each Gram matrix by its number of rows"),
                batches,
            ),
            summary="per linear (Σ_t τ_t G̃_t)(Σ_t G̃_t)⁻¹ with Gram matrices of calibration inputs; others averaged",
            reference="Jin et al., Dataless Knowledge Fusion (RegMean), ICLR 2023 (arXiv:2212.09849)",
            calibration=("images",),
        )
    )
    register(
        MergeMethod(
            "fisher",
            "model",
            _fisher_model,
            (
                Option("weight", 1.0, per_input=True, help="λ_t of Σ_t λ_t F_t τ_t / Σ_t λ_t F_t"),
                Option("labels", "sample", "choice", choices=FISHER_LABELS, help="y of the Fisher's log p(y|x)"),
                Option("floor", 1e-6, low=0.0, help="added to every Fisher entry"),
                Option("normalize", False, "bool", help="divide each task's Fisher by its L2 norm"),
                Option("seed", 0, "int", help="seed of the sampled labels"),
                batches,
            ),
            summary="per parameter Σ_t λ_t F_t τ_t / Σ_t λ_t F_t, F_t the diagonal Fisher on calibration data",
            reference="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 (arXiv:2111.09832)",
            calibration=("images", "classes"),
        )
    )


_register()

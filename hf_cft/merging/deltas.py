"""Task deltas δ = θ − θ⁰: from models, state dicts, safetensors folders and LoRA adapters, plus experts run as
θ⁰ + s·δ without copying the model.

A delta is a plain ``dict[str, torch.Tensor]`` (fp32) keyed by the base model's state-dict keys. Functions here
return :class:`TaskDelta`, a ``dict`` subclass that also carries the *base fingerprint* (a short hash of the
base model's keys, shapes and a few values), so that deltas taken against different base models are caught
before they are merged (:func:`check_compatible`).

Why these pieces (docs/architecture.md, "Engineering rules"; docs/methods/condu.md §1, §5):

- merging works in dense delta space; a LoRA adapter becomes ``ΔW = s·B@A`` per target linear, keyed by the
  **base** weight key (``text_model.encoder.layers.0.mlp.fc1.weight``), with ``s = lora_alpha/r`` or
  ``lora_alpha/√r`` under rsLoRA (condu.md §5, "dense");
- ``lora_merge="factors"`` (condu.md §5) needs the A/B factors as tensors of their own: :func:`lora_factor_delta`;
- checkpoints on disk are read tensor by tensor with ``safetensors.safe_open`` (:func:`iter_delta`), so taking
  the delta of two large checkpoints needs memory for one delta plus a couple of tensors;
- :class:`FunctionalExpert` runs θ⁰ + s·δ through ``torch.func.functional_call``: the base model is never
  copied or modified (condu.md §7, "Cost").

Example::

    from hf_cft.merging import delta_from_models, delta_from_lora, functional_expert

    delta = delta_from_models(base_model, finetuned_model, keys="trainable")
    lora_delta = delta_from_lora("path/to/adapter", base_model)      # dense ΔW = s·B@A per target linear
    expert = functional_expert(base_model, delta)                     # θ⁰ + δ, no copy
    feats = expert.run(lambda m, x: hf_cft.models.image_features(m, x), pixel_values)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_cft.errors import AdapterError, BundleError, DeltaError, NonFiniteError

__all__ = [
    "DEFAULT_EXCLUDE",
    "FINGERPRINT_METADATA",
    "FunctionalExpert",
    "LazyDelta",
    "TaskDelta",
    "apply_delta",
    "base_fingerprint",
    "check_compatible",
    "delta_from_lora",
    "delta_from_models",
    "functional_expert",
    "iter_delta",
    "dense_delta_from_factors",
    "lora_factor_delta",
    "save_delta",
    "validate_delta",
    "validate_lazy_delta",
]

#: State-dict entries never part of a task delta: CLIP's temperature is not trained (condu.md §1, §5).
DEFAULT_EXCLUDE: tuple[str, ...] = ("logit_scale",)

_FINGERPRINT_VALUES = 1024  # values hashed from each sampled tensor
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors' floating-point dtype names


class TaskDelta(dict):
    """A task delta: ``dict[str, Tensor]`` (fp32) plus the fingerprint of the base model it was taken from.

    ``base_fingerprint`` is ``None`` for a delta built by hand; such a delta is only checked by keys and shapes.
    """

    def __init__(self, *args, base_fingerprint: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.base_fingerprint = base_fingerprint

    def numel(self) -> int:
        return sum(t.numel() for t in self.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.values())

    def __repr__(self) -> str:
        return f"TaskDelta({len(self)} tensors, {self.numel():,} entries, base={self.base_fingerprint})"


# ----------------------------------------------------------------------------------------------- tensor sources


class _Source:
    """Read-only access to named tensors: a module, a mapping, or safetensors files (read lazily)."""

    def __init__(self, obj: Any, role: str):
        self.role = role
        self.module: nn.Module | None = None
        self._files: dict[str, str] | None = None  # key -> safetensors file
        self._handles: dict[str, Any] = {}
        if isinstance(obj, nn.Module):
            self.module = obj
            self._tensors: Mapping[str, torch.Tensor] = obj.state_dict(keep_vars=False)
        elif isinstance(obj, Mapping):
            self._tensors = obj
        elif isinstance(obj, (str, os.PathLike)):
            self._tensors = {}
            self._files = _safetensors_index(Path(obj), role)
        else:
            raise DeltaError(
                f"The {role} must be an nn.Module, a state dict or a safetensors file/folder, got {type(obj).__name__}."
            )
        self.description = str(obj) if self._files is not None else type(obj).__name__

    def names(self) -> list[str]:
        return list(self._files) if self._files is not None else list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in (self._files if self._files is not None else self._tensors)

    def _handle(self, key: str):
        from safetensors import safe_open

        file = self._files[key]
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise BundleError(f"Cannot read safetensors file {file!r} of the {self.role}: {exc}") from exc
        return self._handles[file]

    def _read(self, key: str, what: Callable[[Any], Any]):
        """``what(handle)`` for the file holding ``key``; a safetensors failure (the file replaced or damaged since
        it was indexed) becomes a :class:`BundleError` naming the tensor, the role and the file."""
        handle = self._handle(key)
        try:
            return what(handle)
        except Exception as exc:
            raise BundleError(f"Cannot read tensor {key!r} of the {self.role} ({self._files[key]}): {exc}") from exc

    def shape(self, key: str) -> tuple[int, ...]:
        if self._files is not None:
            return self._read(key, lambda h: tuple(h.get_slice(key).get_shape()))
        return tuple(self._tensors[key].shape)

    def is_floating(self, key: str) -> bool:
        if self._files is not None:
            return self._read(key, lambda h: h.get_slice(key).get_dtype() in _FLOAT_DTYPES)
        t = self._tensors[key]
        return isinstance(t, torch.Tensor) and t.is_floating_point()

    def get(self, key: str) -> torch.Tensor:
        if self._files is not None:
            return self._read(key, lambda h: h.get_tensor(key))
        return self._tensors[key].detach()

    def head_values(self, key: str, n: int) -> torch.Tensor:
        """The first ``n`` values of ``key`` (flattened), reading only the rows needed from disk."""
        if self._files is not None:

            def head(h):
                sl = h.get_slice(key)
                shape = sl.get_shape()
                if not shape:
                    return h.get_tensor(key).reshape(-1)[:n]
                row = max(1, math.prod(shape[1:]))
                return sl[: max(1, -(-n // row))].reshape(-1)[:n]

            return self._read(key, head)
        return self._tensors[key].detach().reshape(-1)[:n]

    def trainable_keys(self) -> list[str]:
        if self.module is None:
            raise DeltaError(
                f"keys='trainable' needs the {self.role} as an nn.Module (requires_grad flags); got "
                f"{self.description}. Pass the list of keys instead."
            )
        return [n for n, p in self.module.named_parameters() if p.requires_grad]


def _safetensors_index(path: Path, role: str) -> dict[str, str]:
    """Map every tensor key to its safetensors file, for a file or a (possibly sharded) checkpoint folder."""
    from safetensors import safe_open

    if path.is_file():
        files = [path]
    elif path.is_dir():
        if (path / "adapter_config.json").is_file():
            raise DeltaError(
                f"{str(path)!r} ({role}) is a PEFT adapter folder; take its delta with delta_from_lora(folder, base)."
            )
        from hf_cft.validation import safetensors_files

        return {
            k: str(f)
            for k, f in safetensors_files(
                path, BundleError, f"{role} {str(path)!r}", (".bin", ".pt", ".pth", ".ckpt"), "reads"
            ).items()
        }
    else:
        raise BundleError(f"The {role} path {str(path)!r} does not exist.")
    out: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for k in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    out[k] = str(f)
        except Exception as exc:
            raise BundleError(f"Cannot read safetensors file {str(f)!r} of the {role}: {exc}") from exc
    return out


def _as_source(obj: Any, role: str) -> _Source:
    return obj if isinstance(obj, _Source) else _Source(obj, role)


# ------------------------------------------------------------------------------------------------- fingerprint


def base_fingerprint(base: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike) -> str:
    """A short hash identifying a base model: every floating-point key with its shape, plus the first 1024
    values (as fp32) of the first, middle and last key in sorted order. Cheap (reads three slices from disk) and
    equal for a model, its state dict and its safetensors checkpoint."""
    src = _as_source(base, "base model")
    keys = sorted(k for k in src.names() if src.is_floating(k))
    h = hashlib.blake2b(digest_size=12)
    for k in keys:
        h.update(f"{k}:{list(src.shape(k))};".encode())
    if keys:
        for k in sorted({keys[0], keys[len(keys) // 2], keys[-1]}):
            h.update(src.head_values(k, _FINGERPRINT_VALUES).to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ validation


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite. A finite sum proves it in one read without a mask the size of ``t``
    (NaN and ±inf propagate into the sum); only a sum that is not finite (NaN/inf, or finite values summing past
    the float range) is checked entry by entry."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(key: str, t: torch.Tensor, where: str) -> None:
    if t.is_floating_point() and not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"Tensor {key!r} {where} holds {bad} NaN/inf value(s).")


def _check_key_set(keys: Iterable[str], reference: Mapping[str, tuple[int, ...]], name: str) -> None:
    """:class:`DeltaError` naming the first missing and the first unknown key of ``keys`` against ``reference``."""
    keys = list(keys)
    present = set(keys)
    missing = [k for k in reference if k not in present]
    extra = [k for k in keys if k not in reference]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            parts.append(f"has unknown key {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        raise DeltaError(f"The {name} {' and '.join(parts)}; all task deltas must share the same keys.")


def validate_delta(
    delta: Mapping[str, torch.Tensor],
    reference: Mapping[str, tuple[int, ...]] | None = None,
    name: str = "delta",
) -> TaskDelta:
    """Check a delta and return it as an fp32 :class:`TaskDelta` (tensors are not copied when already fp32).

    Raises :class:`DeltaError` for a non-tensor / non-floating entry or (with ``reference``: key → shape) a missing,
    extra or mis-shaped key, and :class:`NonFiniteError` for NaN/inf — each naming the key.
    """
    if not isinstance(delta, Mapping):
        raise DeltaError(f"The {name} must be a mapping from state-dict keys to tensors, got {type(delta).__name__}.")
    if len(delta) == 0:
        raise DeltaError(f"The {name} is empty (no tensors).")
    if reference is not None:
        _check_key_set(delta, reference, name)
    out = TaskDelta(base_fingerprint=getattr(delta, "base_fingerprint", None))
    for k, t in delta.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise DeltaError(f"Entry {k!r} of the {name} is not a floating-point tensor ({type(t).__name__}).")
        if reference is not None and tuple(t.shape) != tuple(reference[k]):
            raise DeltaError(f"Key {k!r} of the {name} has shape {tuple(t.shape)}, expected {tuple(reference[k])}.")
        t = t.detach().to(torch.float32)
        _check_finite(k, t, f"of the {name}")
        out[k] = t
    return out


def check_compatible(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names=("delta a", "delta b")):
    """Raise :class:`DeltaError` unless two deltas share keys, shapes and (when both carry one) base fingerprint."""
    fa, fb = getattr(a, "base_fingerprint", None), getattr(b, "base_fingerprint", None)
    if fa is not None and fb is not None and fa != fb:
        raise DeltaError(
            f"The {names[0]} and the {names[1]} were taken from different base models (fingerprints {fa} and {fb})."
        )
    validate_delta(b, {k: tuple(t.shape) for k, t in a.items()}, name=names[1])


# ------------------------------------------------------------------------------------------ deltas from models


def _select_keys(ft: _Source, keys, exclude: Sequence[str]) -> list[str]:
    if keys is None:
        selected = [k for k in ft.names() if ft.is_floating(k)]
    elif isinstance(keys, str):
        if keys != "trainable":
            raise DeltaError(f"keys must be None, 'trainable' or a list of state-dict keys, got {keys!r}.")
        selected = ft.trainable_keys()
        if not selected:
            raise DeltaError(
                f"The fine-tuned model ({ft.description}) has no parameter with requires_grad=True; "
                "pass the trained keys explicitly."
            )
    else:
        selected = list(keys)
        for k in selected:
            if k not in ft:
                raise DeltaError(f"Key {k!r} is not in the fine-tuned model ({ft.description}).")
    selected = [k for k in selected if k.rsplit(".", 1)[-1] not in exclude and k not in exclude]
    if not selected:
        raise DeltaError("No delta keys left after selection and exclusions.")
    return selected


def iter_delta(
    base: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    finetuned: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    keys: None | str | Sequence[str] = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, θ_ft[key] − θ⁰[key])`` in fp32, one tensor at a time.

    ``base`` / ``finetuned``: an ``nn.Module``, a state dict, or a safetensors file or checkpoint folder (sharded
    folders with ``model.safetensors.index.json`` work); files are opened with ``safe_open`` and read per key,
    so memory stays at a couple of tensors beyond what the caller keeps.
    ``keys``: ``None`` = every floating-point entry of ``finetuned``; ``"trainable"`` = parameters of the
    fine-tuned module with ``requires_grad`` (hf_cft's rule, condu.md §1); or an explicit list.
    ``exclude`` drops entries by full key or last name component (default ``logit_scale``).
    Raises :class:`DeltaError` naming a key missing from the base or of another shape, :class:`NonFiniteError`
    naming a key whose delta holds NaN/inf.
    """
    b, f = _as_source(base, "base model"), _as_source(finetuned, "fine-tuned model")
    for k in _select_keys(f, keys, exclude):
        _check_delta_key(b, f, k, "; are they the same architecture? (A PEFT-wrapped model needs delta_from_lora.)")
        d = f.get(k).to(torch.float32) - b.get(k).to(torch.float32)
        _check_finite(k, d, "of the delta (fine-tuned − base)")
        yield k, d


def _check_delta_key(b: _Source, f: _Source, k: str, missing_tail: str) -> None:
    """Key ``k`` of the fine-tuned source can have a task delta: the base has it, with the same shape, and both are
    floating-point (``missing_tail`` ends the missing-key message)."""
    if k not in b:
        raise DeltaError(f"Key {k!r} of the fine-tuned model is not in the base model ({b.description}){missing_tail}")
    if b.shape(k) != f.shape(k):
        raise DeltaError(f"Key {k!r} has shape {f.shape(k)} in the fine-tuned model but {b.shape(k)} in the base.")
    if not b.is_floating(k) or not f.is_floating(k):
        raise DeltaError(f"Key {k!r} is not a floating-point tensor; it cannot have a task delta.")


def delta_from_models(
    base: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    finetuned: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    keys: None | str | Sequence[str] = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> TaskDelta:
    """The task delta θ_ft − θ⁰ as a :class:`TaskDelta` (fp32, tagged with the base fingerprint).

    See :func:`iter_delta` for the accepted inputs and ``keys`` / ``exclude``. Example::

        delta = delta_from_models(clip, finetuned_clip, keys="trainable")
        delta = delta_from_models("ckpt/base", "ckpt/task3")          # safetensors folders, streamed
    """
    b = _as_source(base, "base model")
    out = TaskDelta(iter_delta(b, finetuned, keys=keys, exclude=exclude))
    out.base_fingerprint = base_fingerprint(b)
    return out


# ----------------------------------------------------------------------------------------------- streamed deltas

#: safetensors metadata key holding the base fingerprint of a delta file written by :func:`save_delta`.
FINGERPRINT_METADATA = "hf_cft_base_fingerprint"


class LazyDelta(Mapping):
    """A task delta read (or computed) one key at a time, for merging deltas larger than memory allows.

    ``DeltaFusionMerger.add_task`` streams it: a first pass checks every key (shape, NaN/inf) one tensor at a time,
    a second reads each key once while that key is unified, so memory holds the bundle plus about one tensor of
    the delta rather than the whole delta (condu.md §7, issue "streamed tensor by tensor from safetensors").
    Each access returns a fresh fp32 tensor; nothing is cached. Build one with :meth:`from_file` (a delta saved by
    :func:`save_delta`) or :meth:`from_models` (θ_ft − θ⁰ of two checkpoints, computed per key). Example::

        save_delta(delta_from_models(base, finetuned), "deltas/task3.safetensors")
        merger.add_task(LazyDelta.from_file("deltas/task3.safetensors"), "task3")
        merger.add_task("deltas/task4.safetensors", "task4")            # a .safetensors path does the same
        merger.add_task(LazyDelta.from_models("ckpt/base", "ckpt/task5"), "task5")
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        getter: Callable[[str], torch.Tensor],
        base_fingerprint: str | None = None,
        description: str = "lazy delta",
        range_getter: Callable[[str, int, int], torch.Tensor] | None = None,
    ):
        self._shapes = {k: tuple(v) for k, v in shapes.items()}
        self._getter = getter
        self._range_getter = range_getter
        self.base_fingerprint = base_fingerprint
        self.description = description

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LazyDelta:
        """A delta stored in one safetensors file (every floating-point tensor is a key of the delta)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise BundleError(f"Delta file {str(path)!r} does not exist.")
        try:  # one look at the header: keys, shapes, dtypes, metadata (no tensor is read)
            with safe_open(str(path), framework="pt", device="cpu") as h:
                fp = (h.metadata() or {}).get(FINGERPRINT_METADATA)
                slices = {k: h.get_slice(k) for k in h.keys()}  # noqa: SIM118 - safe_open handles are not mappings
                shapes = {k: tuple(sl.get_shape()) for k, sl in slices.items()}
                bad = [k for k, sl in slices.items() if sl.get_dtype() not in _FLOAT_DTYPES]
        except Exception as exc:
            raise BundleError(f"Cannot read safetensors file {str(path)!r}: {exc}") from exc
        if bad:
            raise DeltaError(f"Entry {bad[0]!r} of the delta file {str(path)!r} is not a floating-point tensor.")

        def read(key: str) -> torch.Tensor:
            # a fresh handle per key: safetensors maps the file, and a handle kept open would keep every page read
            # so far resident (the whole delta again, by the end of a pass)
            try:
                with safe_open(str(path), framework="pt", device="cpu") as h:
                    return h.get_tensor(key)
            except Exception as exc:
                raise BundleError(f"Cannot read tensor {key!r} of the delta file {str(path)!r}: {exc}") from exc

        def read_range(key: str, start: int, stop: int) -> torch.Tensor:
            # only the rows that hold flat entries start:stop are read (safetensors slices the first dimension)
            shape = shapes[key]
            try:
                with safe_open(str(path), framework="pt", device="cpu") as h:
                    if len(shape) == 0:
                        return h.get_tensor(key).reshape(-1)[start:stop]
                    row = math.prod(shape[1:])
                    first, last = start // row, -(-stop // row)
                    rows = h.get_slice(key)[first:last].reshape(-1)
                    return rows[start - first * row : stop - first * row]
            except Exception as exc:
                raise BundleError(f"Cannot read tensor {key!r} of the delta file {str(path)!r}: {exc}") from exc

        return cls(shapes, read, fp, str(path), range_getter=read_range)

    @classmethod
    def from_models(
        cls,
        base: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
        finetuned: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
        keys: None | str | Sequence[str] = None,
        exclude: Sequence[str] = DEFAULT_EXCLUDE,
    ) -> LazyDelta:
        """θ_ft − θ⁰ computed key by key on access (see :func:`iter_delta` for the inputs and key rules)."""
        b, f = _as_source(base, "base model"), _as_source(finetuned, "fine-tuned model")
        selected = _select_keys(f, keys, exclude)
        for k in selected:
            _check_delta_key(b, f, k, ".")
        return cls(
            {k: f.shape(k) for k in selected},
            lambda k: f.get(k).to(torch.float32) - b.get(k).to(torch.float32),
            base_fingerprint(b),
            f"{f.description} − {b.description}",
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        t = self._getter(key).detach().to(torch.float32)
        if tuple(t.shape) != self._shapes[key]:
            raise DeltaError(f"Key {key!r} of {self.description} changed shape while being read.")
        _check_finite(key, t, f"of {self.description}")
        return t

    def read_flat(self, key: str, start: int, stop: int, check: bool = True) -> torch.Tensor:
        """Entries ``start:stop`` of ``key``'s flattened tensor as fp32, checked for NaN/inf unless ``check=False``
        (a caller that reads the same entries again checks them once). A delta file reads only the rows that hold
        them; other lazy deltas compute the whole key and slice it."""
        if key not in self._shapes:
            raise KeyError(key)
        if self._range_getter is None:
            return self[key].reshape(-1)[start:stop]
        t = self._range_getter(key, start, stop).detach().to(torch.float32)
        if check:
            _check_finite(key, t, f"of {self.description}")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def materialize(self) -> TaskDelta:
        """Every key in memory, as a :class:`TaskDelta`."""
        return TaskDelta(((k, self[k]) for k in self), base_fingerprint=self.base_fingerprint)

    def __repr__(self) -> str:
        return f"LazyDelta({len(self)} tensors from {self.description}, base={self.base_fingerprint})"


def validate_lazy_delta(
    delta: LazyDelta, reference: Mapping[str, tuple[int, ...]] | None = None, name: str = "delta"
) -> LazyDelta:
    """:func:`validate_delta` for a :class:`LazyDelta`: the same checks and errors, reading one key at a time
    and keeping none of them."""
    if len(delta) == 0:
        raise DeltaError(f"The {name} is empty (no tensors).")
    if reference is not None:
        _check_key_set(delta, reference, name)
        for k, shape in delta.shapes().items():
            if shape != tuple(reference[k]):
                raise DeltaError(f"Key {k!r} of the {name} has shape {shape}, expected {tuple(reference[k])}.")
    for k in delta:
        try:
            delta[k]  # reads the key, checks NaN/inf, drops it
        except NonFiniteError as exc:
            raise NonFiniteError(f"{exc} (the {name})") from None
    return delta


def save_delta(delta: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a delta to one safetensors file atomically, with its base fingerprint in the metadata, for
    :meth:`LazyDelta.from_file` / ``DeltaFusionMerger.add_task(path)``."""
    from hf_cft.utils import atomic_save_safetensors

    path = Path(path)
    checked = validate_delta(delta, name=f"delta written to {path.name}")
    fp = getattr(delta, "base_fingerprint", None)
    tensors = {k: t.contiguous() for k, t in checked.items()}
    atomic_save_safetensors(tensors, path, metadata={FINGERPRINT_METADATA: fp} if fp else None)
    return path


# ----------------------------------------------------------------------------------------------- LoRA adapters

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)$")


def _is_peft_model(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and hasattr(obj, "peft_config") and isinstance(obj.peft_config, dict)


def _read_adapter(adapter: Any, adapter_name: str | None) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(config dict, saved-form tensors ``base_model.model.<module>.lora_A.weight``, description)."""
    if _is_peft_model(adapter):
        from peft import PeftModel, get_peft_model_state_dict

        name = adapter_name or getattr(adapter, "active_adapter", None) or "default"
        if isinstance(name, (list, tuple)):
            name = name[0]
        if name not in adapter.peft_config:
            raise AdapterError(f"Adapter {name!r} is not in the PEFT model (it has {sorted(adapter.peft_config)}).")
        config = adapter.peft_config[name].to_dict()
        tensors = get_peft_model_state_dict(adapter, adapter_name=name)
        # a tuner (``peft_model.base_model``, e.g. a LoraModel) names its tensors ``model.<module>...``: give them
        # the PeftModel's saved form ``base_model.model.<module>...``
        prefix = "" if isinstance(adapter, PeftModel) else "base_model."
        return config, {prefix + k: v.detach() for k, v in tensors.items()}, f"adapter {name!r}"
    if isinstance(adapter, (str, os.PathLike)):
        folder = Path(adapter)
        cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not cfg_file.is_file():
            raise AdapterError(f"{str(folder)!r} is not a PEFT adapter folder (no adapter_config.json).")
        if not weights.is_file():
            hint = (
                " (only adapter_model.bin: hf_cft reads safetensors only)"
                if (folder / "adapter_model.bin").exists()
                else ""
            )
            raise AdapterError(f"Adapter folder {str(folder)!r} has no adapter_model.safetensors{hint}.")
        try:
            config = json.loads(cfg_file.read_text())
        except ValueError as exc:
            raise AdapterError(
                f"Adapter folder {str(folder)!r}: adapter_config.json is not valid JSON ({exc})."
            ) from exc
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(weights))
        except Exception as exc:
            raise BundleError(f"Cannot read {str(weights)!r}: {exc}") from exc
        return config, tensors, f"adapter folder {str(folder)!r}"
    raise AdapterError(f"Expected a PeftModel or an adapter folder, got {type(adapter).__name__}.")


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` rule: a pattern applies when it matches a dotted suffix of the
    module name (``(.*\\.)?pattern$``); the first matching pattern wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _lora_groups(config: dict, tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, dict]:
    """Group saved LoRA tensors per target module and compute each module's scaling (refusing what isn't LoRA)."""
    peft_type = str(config.get("peft_type", "")).split(".")[-1].upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"The {where} is a {config.get('peft_type')!r} adapter; only LoRA adapters have a delta here."
        )
    if config.get("use_dora"):
        raise AdapterError(
            f"The {where} uses DoRA (use_dora=True): its weight is a magnitude-normalised direction, not θ⁰ + s·B@A, "
            "so it has no LoRA delta. Merge it with merge_and_unload() and use delta_from_models instead."
        )
    groups: dict[str, dict] = {}
    unknown = []
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        groups.setdefault(m["module"], {})[f"{m['part']}.{m['param']}"] = t
    if unknown:
        raise AdapterError(
            f"The {where} holds tensors that are not LoRA A/B factors, e.g. {unknown[0]!r} ({len(unknown)} in all: "
            "modules_to_save, trained biases, embedding or token adapters); hf_cft takes deltas of LoRA linears only."
        )
    if not groups:
        raise AdapterError(f"The {where} holds no LoRA tensors.")
    for module, g in groups.items():
        if "lora_A.weight" not in g or "lora_B.weight" not in g:
            raise AdapterError(f"The {where} lacks lora_A or lora_B for module {module!r}.")
        a, b = g["lora_A.weight"], g["lora_B.weight"]
        if a.ndim != 2 or b.ndim != 2:
            part, t = ("lora_A", a) if a.ndim != 2 else ("lora_B", b)
            raise AdapterError(f"Module {module!r} of the {where} is not a linear LoRA ({part} has {t.ndim} dims).")
        from hf_cft.validation import check_int, check_number

        r = check_int(
            _pattern_value(config.get("rank_pattern"), module, config.get("r")),
            f"LoRA rank 'r' of module {module!r} ({where}'s adapter_config.json)",
            low=1,
            error=AdapterError,
        )
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(
                f"Module {module!r} of the {where}: lora_A has rank {a.shape[0]} and lora_B rank {b.shape[1]} but "
                f"the config says r={r}."
            )
        alpha = check_number(
            _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha")),
            f"lora_alpha of module {module!r} ({where}'s adapter_config.json)",
            error=AdapterError,
        )
        g["scaling"] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        g["fan_in_fan_out"] = bool(config.get("fan_in_fan_out"))
    return groups


def delta_from_lora(
    adapter: nn.Module | str | os.PathLike,
    base_model: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    adapter_name: str | None = None,
) -> TaskDelta:
    """Dense delta of a LoRA adapter: ``ΔW = s·B@A`` per target linear, keyed by the base weight key
    (condu.md §5 "dense"; architecture.md: merge in dense delta space).

    ``adapter``: a ``PeftModel`` (its active adapter, or ``adapter_name``), its tuner ``peft_model.base_model``
    (the first of its active adapters), or an adapter folder
    (``adapter_config.json`` + ``adapter_model.safetensors``). ``s = lora_alpha/r``, or ``lora_alpha/√r`` with
    ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` are honoured; ``fan_in_fan_out`` transposes; a LoRA-B
    bias (``lora_bias=True``) adds ``s·b`` to the base bias. ``base_model`` (module, state dict or safetensors
    path) gives the key names, shapes and the base fingerprint.

    Raises :class:`AdapterError` for DoRA, non-LoRA adapters and tensors that are not LoRA factors;
    :class:`DeltaError` naming a target whose base key is missing or of another shape. Example::

        delta = delta_from_lora(peft_model, clip)        # {"vision_model...mlp.fc1.weight": s·B@A, ...}
    """
    config, tensors, where = _read_adapter(adapter, adapter_name)
    groups = _lora_groups(config, tensors, where)
    base = _as_source(base_model, "base model")
    out = TaskDelta()
    for module, g in groups.items():
        a, b, s = g["lora_A.weight"].to(torch.float32), g["lora_B.weight"].to(torch.float32), g["scaling"]
        dw = s * (b @ a)
        if g["fan_in_fan_out"]:
            dw = dw.t().contiguous()
        entries = {f"{module}.weight": dw}
        if "lora_B.bias" in g:
            entries[f"{module}.bias"] = s * g["lora_B.bias"].to(torch.float32)
        for key, t in entries.items():
            if key not in base:
                raise DeltaError(f"LoRA target {module!r} of the {where} has no base key {key!r} in the base model.")
            if base.shape(key) != tuple(t.shape):
                raise DeltaError(
                    f"LoRA delta for {key!r} has shape {tuple(t.shape)} but the base weight is {base.shape(key)}."
                )
            _check_finite(key, t, f"of the LoRA delta ({where})")
            out[key] = t
    out.base_fingerprint = base_fingerprint(base)
    return out


def lora_factor_delta(
    adapter: nn.Module | str | os.PathLike, reference: nn.Module, adapter_name: str | None = None
) -> TaskDelta:
    """Deltas of the LoRA factors themselves, for ``lora_merge="factors"`` (condu.md §5, ConDU (LoRA) as released):
    ``δ_A = A − A⁰``, ``δ_B = B − B⁰``, keyed by the parameter names of ``reference``.

    ``reference`` is a ``PeftModel`` holding θ⁰ plus the *initial* adapter (hf_cft: B⁰ = 0 and the fixed A⁰
    seed shared by every task). Experts are then built over ``reference`` (θ⁰ + A⁰/B⁰ + λ·M⊙u). The adapter
    must have the same targets, ranks and scalings as the reference (else :class:`DeltaError`).
    """
    if not _is_peft_model(reference):
        raise AdapterError("lora_merge='factors' needs the reference as a PeftModel holding the initial adapter.")
    ref_name = reference.active_adapter if isinstance(reference.active_adapter, str) else reference.active_adapter[0]
    config, tensors, where = _read_adapter(adapter, adapter_name)
    ref_config = reference.peft_config[ref_name].to_dict()
    groups = _lora_groups(config, tensors, where)
    ref_groups = _lora_groups(ref_config, _read_adapter(reference, ref_name)[1], f"reference adapter {ref_name!r}")
    params = dict(reference.named_parameters())
    out = TaskDelta()
    for module, g in groups.items():
        if module not in ref_groups:
            raise DeltaError(f"LoRA target {module!r} of the {where} is not a target of the reference adapter.")
        if not math.isclose(g["scaling"], ref_groups[module]["scaling"], rel_tol=1e-12):
            raise DeltaError(
                f"LoRA target {module!r}: scaling {g['scaling']} differs from the reference's "
                f"{ref_groups[module]['scaling']}; factor deltas need the same r / lora_alpha / use_rslora."
            )
        for part in ("lora_A", "lora_B"):
            key = f"base_model.model.{module}.{part}.{ref_name}.weight"
            if key not in params:
                raise DeltaError(f"The reference PeftModel has no parameter {key!r}.")
            factor = g[f"{part}.weight"]
            # compared before subtracting: a rank-1 factor would broadcast against the reference's (same scaling)
            if tuple(factor.shape) != tuple(params[key].shape):
                raise DeltaError(
                    f"Factor {key!r} has shape {tuple(factor.shape)}, reference {tuple(params[key].shape)}."
                )
            t = factor.to(torch.float32) - params[key].detach().to(torch.float32)
            _check_finite(key, t, f"of the LoRA factor delta ({where})")
            out[key] = t
    missing = set(ref_groups) - set(groups)
    if missing:
        raise DeltaError(f"The {where} lacks the reference's LoRA target {sorted(missing)[0]!r}.")
    out.base_fingerprint = base_fingerprint(reference)
    return out


def dense_delta_from_factors(factor_delta: Mapping[str, torch.Tensor], reference: nn.Module) -> TaskDelta:
    """The dense weight delta of factor deltas (``lora_merge="factors"``): per LoRA target of ``reference``,
    ``ΔW = s·(B⁰ + δ_B)(A⁰ + δ_A) − s·B⁰A⁰``, keyed by the base weight (``<module>.weight``), fp32.

    ``factor_delta`` is keyed like :func:`lora_factor_delta` (``base_model.model.<module>.lora_A.<adapter>.weight``),
    e.g. a rebuilt ConDU (LoRA) expert λ·M⊙u; ``reference`` is the ``PeftModel`` holding θ⁰ and the initial adapter
    (A⁰, B⁰). θ⁰ + ΔW is the model that θ⁰ + the adapter (A⁰ + δ_A, B⁰ + δ_B) computes, so the expert can be run on
    the plain θ⁰ (no PEFT wrapper), like a ``"dense"`` one. A target missing from ``factor_delta`` raises
    :class:`DeltaError` naming it."""
    if not _is_peft_model(reference):
        raise AdapterError("dense_delta_from_factors needs the reference as a PeftModel holding the initial adapter.")
    ref_name = reference.active_adapter if isinstance(reference.active_adapter, str) else reference.active_adapter[0]
    config, tensors, where = _read_adapter(reference, ref_name)
    groups = _lora_groups(config, tensors, f"reference adapter {ref_name!r}")
    out = TaskDelta()
    for module, g in groups.items():
        factors = {}
        for part in ("lora_A", "lora_B"):
            key = f"base_model.model.{module}.{part}.{ref_name}.weight"
            if key not in factor_delta:
                raise DeltaError(f"The factor delta lacks {key!r}, a factor of the reference adapter.")
            factors[part] = g[f"{part}.weight"].to(torch.float32) + factor_delta[key].to(torch.float32).cpu()
        a0, b0, s = g["lora_A.weight"].to(torch.float32), g["lora_B.weight"].to(torch.float32), g["scaling"]
        dw = s * (factors["lora_B"] @ factors["lora_A"] - b0 @ a0)
        out[f"{module}.weight"] = dw.t().contiguous() if g["fan_in_fan_out"] else dw
    out.base_fingerprint = None  # keyed by θ⁰'s weights, not by the reference's (whose fingerprint the factors carry)
    return out


# ---------------------------------------------------------------------------------------- experts θ⁰ + s·δ


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    return named


def _check_against_model(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    named = _named_tensors(model)
    for k, d in delta.items():
        if k not in named:
            raise DeltaError(f"Delta key {k!r} is not a parameter or buffer of {type(model).__name__}.")
        if tuple(named[k].shape) != tuple(d.shape):
            raise DeltaError(f"Delta key {k!r} has shape {tuple(d.shape)} but the model's is {tuple(named[k].shape)}.")
    fp = getattr(delta, "base_fingerprint", None)
    if fp is not None and fp != base_fingerprint(model):
        raise DeltaError(
            f"The delta was taken from another base model (fingerprint {fp}, model {base_fingerprint(model)})."
        )
    return named


@torch.no_grad()
def apply_delta(model: nn.Module, delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> nn.Module:
    """Add ``scale·δ`` to ``model``'s tensors **in place** and return the model (keys and shapes checked first).

    Use :func:`functional_expert` to run θ⁰ + s·δ without touching the model.
    """
    from hf_cft.validation import check_number

    scale = check_number(scale, "scale")
    named = _check_against_model(model, delta)
    for k, d in delta.items():
        _check_finite(k, d, "of the delta")
    # every key is checked before the first is changed: a scale that overflows a key leaves the model as it was
    for k, d in delta.items():
        t = named[k]
        if not t.is_floating_point():
            continue
        fits = abs(scale) <= torch.finfo(t.dtype).max
        if not fits or not bool(
            torch.isfinite(torch.add(t.detach(), d.to(device=t.device, dtype=t.dtype), alpha=scale)).all()
        ):
            raise NonFiniteError(
                f"scale={scale!r} times the delta at key {k!r} overflows {t.dtype} (inf); the model is unchanged."
            )
    with torch.no_grad():
        for k, d in delta.items():
            t = named[k]
            t.add_(d.to(device=t.device, dtype=t.dtype), alpha=scale)
    return model


class _Runner(nn.Module):
    """Lets ``functional_call`` run any function of the model (e.g. ``get_image_features``), not just forward."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)


class FunctionalExpert:
    """θ⁰ + scale·δ run with ``torch.func.functional_call``: only the delta's keys are replaced (by new tensors
    θ⁰[k] + s·δ[k]); the module and its other weights are shared, never copied or modified.

    ``expert(*args)`` calls the model's forward; ``expert.run(fn, *args)`` calls ``fn(model, *args)`` with the
    expert's weights in place, e.g. ``expert.run(hf_cft.models.image_features, pixel_values)``.
    """

    def __init__(
        self,
        model: nn.Module,
        delta: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        scale: float = 1.0,
        check: bool = True,
    ):
        if isinstance(delta, Mapping) and check:
            named = _check_against_model(model, delta)
            items: Iterable[tuple[str, torch.Tensor]] = delta.items()
        else:  # a stream of (key, δ) pairs (e.g. DeltaFusionMerger.iter_expert_delta): keys checked as they come
            named = _named_tensors(model)
            items = delta.items() if isinstance(delta, Mapping) else delta
        self.model = model
        self.params: dict[str, torch.Tensor] = {}
        for k, d in items:
            base = named.get(k)
            if base is None or tuple(base.shape) != tuple(d.shape):
                what = (
                    "is not a parameter or buffer" if base is None else f"has shape {tuple(d.shape)}, not the model's"
                )
                raise DeltaError(f"Delta key {k!r} {what} of {type(model).__name__}.")
            # θ⁰ + s·δ in fp32, rounded once to θ⁰'s dtype: the evaluator's rule (continual.weights.delta_parameters);
            # adding δ already rounded to a bf16 θ⁰'s dtype rounded twice (issue 17 item 12)
            wide = torch.promote_types(base.dtype, torch.float32)
            w = base.detach().to(wide) + scale * d.to(device=base.device, dtype=wide)
            self.params[k] = w.to(base.dtype)

    @classmethod
    def from_weights(cls, model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> FunctionalExpert:
        """An expert whose replaced tensors are given already formed (θ⁰ + δ, e.g. from
        :meth:`~hf_cft.merging.DeltaFusionMerger.iter_expert_weights`): each must match the model's tensor of that
        name in shape, dtype and device, else :class:`DeltaError`. Example::

            expert = FunctionalExpert.from_weights(clip, merger.iter_expert_weights("dtd", dict(clip.named_parameters())))
        """
        named = _named_tensors(model)
        expert = cls.__new__(cls)
        expert.model = model
        expert.params = {}
        for k, w in weights:
            base = named.get(k)
            if base is None:
                raise DeltaError(f"Expert weight {k!r} is not a parameter or buffer of {type(model).__name__}.")
            if (tuple(w.shape), w.dtype, w.device) != (tuple(base.shape), base.dtype, base.device):
                raise DeltaError(
                    f"Expert weight {k!r} is {w.dtype} {tuple(w.shape)} on {w.device}; the model's is {base.dtype} "
                    f"{tuple(base.shape)} on {base.device}."
                )
            expert.params[k] = w
        return expert

    def __call__(self, *args, **kwargs):
        from torch.func import functional_call

        return functional_call(self.model, self.params, args, kwargs, strict=False)

    def run(self, fn: Callable, *args, **kwargs):
        from torch.func import functional_call

        params = {f"model.{k}": v for k, v in self.params.items()}
        return functional_call(_Runner(self.model, fn), params, args, kwargs, strict=False)


def functional_expert(model: nn.Module, delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> FunctionalExpert:
    """Shorthand for :class:`FunctionalExpert` (θ⁰ + scale·δ without a model copy). Example::

    with torch.no_grad():
        logits = functional_expert(clip, delta)(input_ids=ids, pixel_values=px).logits_per_image
    """
    return FunctionalExpert(model, delta, scale)

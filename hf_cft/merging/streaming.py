"""Streaming merges: key by key from the inputs' safetensors to sharded safetensors, one tensor of each input in
memory at a time.

A merge of T inputs into θ⁰ walks θ⁰'s keys once. For each key it reads θ⁰'s tensor, hands the registered method
(:mod:`hf_cft.merging.registry`) a lazy sequence of the inputs' deltas at that key — a full-model input's
θ_t − θ⁰ read from its safetensors, a LoRA input's ``s·B@A`` computed from its factors, an in-memory delta as is;
each read only when the method reaches it — and writes θ⁰ + δ_merged to the output shard that the key was planned
into, at once. Keys that no input changes are copied from θ⁰; the union of the inputs' keys is never filled with
zeros in memory. The output is planned from the headers before the first tensor is merged (every key's shard and
byte offset), so the shards are written sequentially as the keys come and never held in memory
(:class:`ShardedWriter`); ``model.safetensors.index.json`` indexes them when there is more than one.

Reading does not go through a memory map: :class:`SafetensorsFile` parses the header once and reads each tensor
with one ``readinto`` into a fresh tensor, so pages of the inputs do not stay resident as the pass goes on (a
``safe_open`` handle keeps every page it touched mapped until it is closed).

- :func:`merge_deltas` — in-memory deltas → merged delta (key by key; the Python form of a merge).
- :func:`merge_folders` — θ⁰ folder + input folders (full models, LoRA adapters) → a merged model folder, or a
  LoRA adapter (``lora_rank``: rank-r truncated SVD of the merged ΔW per target), written atomically.

Example::

    from hf_cft.merging.streaming import merge_folders

    merge_folders("clip", ["ft/task_a", "lora/task_b"], "ties", {"density": 0.3}, out="merged",
                  inputs=[{"weight": 1.0}, {"weight": 0.5}], out_dtype="bfloat16", max_shard_size="500MB")
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from hf_cft.errors import BundleError, DeltaError, MergeConfigError, NonFiniteError

__all__ = [
    "DTYPES",
    "SafetensorsFile",
    "ShardedWriter",
    "merge_deltas",
    "merge_folders",
    "parse_size",
]

#: safetensors dtype names ↔ torch dtypes (the ones a CLIP checkpoint holds).
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
#: ``out_dtype`` values of a merge (``None``: every tensor keeps θ⁰'s dtype).
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Files copied from the base model folder next to a merged model, so the output loads like the base.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
)
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_size(value: int | str, where: str = "max_shard_size") -> int:
    """Bytes of ``value``: an int, or ``"500MB"`` / ``"2GB"`` (powers of 1000) / ``"1GiB"`` (powers of 1024)."""
    if isinstance(value, bool):
        raise MergeConfigError(f"{where} must be a size such as 2GB or a number of bytes, got {value!r}.")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.match(str(value))
        if m is None:
            raise MergeConfigError(f"{where} must be a size such as 500MB, 2GB or 1GiB, got {value!r}.")
        unit = (m.group(2) or "B").upper()
        power = "BKMGT".index(unit[0]) if unit != "B" else 0
        size = int(float(m.group(1)) * ((1024 if "I" in unit else 1000) ** power))
    if size < 1:
        raise MergeConfigError(f"{where} must be at least 1 byte, got {value!r}.")
    return size


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """One safetensors file: its header parsed once, each tensor read with one ``readinto`` (no memory map)."""

    def __init__(self, path: str | os.PathLike, what: str = "safetensors file"):
        self.path = Path(path)
        self.what = what
        try:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
                size = os.fstat(fh.fileno()).st_size
        except (OSError, ValueError, struct.error) as exc:
            raise BundleError(f"{what}: {str(self.path)!r} is not a readable safetensors file ({exc}).") from exc
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, _Entry] = {}
        for key, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise BundleError(
                    f"{what}: tensor {key!r} of {str(self.path)!r} has an unreadable header entry."
                ) from exc
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or 8 + n + end > size:
                raise BundleError(f"{what}: tensor {key!r} of {str(self.path)!r} has a torn or inconsistent entry.")
            self.entries[key] = _Entry(dtype, shape, 8 + n + begin, nbytes)

    def read(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        return self._read_into(key, torch.empty(e.shape, dtype=e.dtype), e.start)

    def read_range(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Entries ``[start, stop)`` of the tensor at ``key`` in flat (row-major) order, as a 1-D tensor (read into
        ``out``, a contiguous 1-D tensor of that many entries, where it has the file's dtype)."""
        e = self.entries[key]
        size = max(0, stop - start)
        if out is None or out.dtype != e.dtype or out.numel() != size or not out.is_contiguous():
            out = torch.empty(size, dtype=e.dtype)
        return self._read_into(key, out, e.start + start * out.element_size())

    def _read_into(self, key: str, out: torch.Tensor, offset: int) -> torch.Tensor:
        nbytes = out.numel() * out.element_size()
        if nbytes:
            view = out.reshape(-1).view(torch.uint8).numpy()
            with open(self.path, "rb", buffering=0) as fh:
                fh.seek(offset)
                got = fh.readinto(memoryview(view))
            if got != nbytes:
                raise BundleError(f"{self.what}: tensor {key!r} of {str(self.path)!r} is truncated.")
        return _host_order(out)


def _host_order(t: torch.Tensor) -> torch.Tensor:
    """Between safetensors' little-endian bytes and this host's: ``t`` itself on a little-endian host or for a
    one-byte dtype, else ``t`` with the bytes of each element reversed (through uint8: numpy has no bfloat16). The
    swap is its own inverse, so reading and writing both use it."""
    size = t.element_size()
    if sys.byteorder == "little" or size == 1:
        return t
    return t.reshape(-1).view(torch.uint8).view(-1, size).flip(1).contiguous().view(t.dtype).reshape(t.shape)


class _Folder:
    """Every tensor of a model folder (one file or shards with an index), read key by key."""

    def __init__(self, folder: Path, what: str):
        from hf_cft.validation import safetensors_files

        files = safetensors_files(folder, BundleError, what, (".bin", ".pt", ".pth", ".ckpt"), "merges")
        opened = {f: SafetensorsFile(f, what) for f in set(files.values())}
        self.files = {k: opened[f] for k, f in files.items()}
        self.folder = folder
        self.what = what

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def entry(self, key: str) -> _Entry:
        return self.files[key].entries[key]

    def read(self, key: str) -> torch.Tensor:
        return self.files[key].read(key)

    def read_range(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat entries ``[start, stop)`` of ``key`` as fp32, into ``out`` (a contiguous fp32 1-D tensor of that many
        entries) where given."""
        raw = self.files[key].read_range(key, start, stop, out)
        if raw.dtype == torch.float32:
            return raw
        return raw.to(torch.float32) if out is None else out.copy_(raw)

    def read_range_cached(self, key: str, start: int, stop: int) -> torch.Tensor:
        """:meth:`read_range` with the last range kept, in one buffer reused from range to range (the inputs of a
        chunked merge all subtract the same range of θ⁰; a fresh allocation per range grew the heap): valid until
        the next call."""
        size = max(0, stop - start)
        if getattr(self, "_last_range", None) != (key, start, stop):
            buf = getattr(self, "_range_buf", None)
            if buf is None or buf.numel() < size:
                buf = self._range_buf = torch.empty(size)
            self.read_range(key, start, stop, buf[:size])
            self._last_range = (key, start, stop)
        return self._range_buf[:size]


# ------------------------------------------------------------------------------------------------ inputs


class _Input:
    """One merge input: which θ⁰ keys it has a delta for, and that delta (fp32) per key."""

    description = "input"

    def delta_keys(self) -> set[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_range(
        self, key: str, start: int, stop: int, base: Callable[[], torch.Tensor], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Flat entries ``[start, stop)`` of the delta at ``key`` (fp32; written into ``out``, a contiguous fp32 1-D
        buffer of that many entries, where the input reads ranges). This default computes the whole delta (``base()``:
        θ⁰ at the key); inputs that can read a range alone override it."""
        return self.delta(key, base()).reshape(-1)[start:stop]


class _ModelInput(_Input):
    """A fine-tuned full model folder: δ = θ_t − θ⁰ on every floating-point key but ``logit_scale``."""

    def __init__(self, folder: Path, base: _Folder, what: str):
        from hf_cft.merging.deltas import DEFAULT_EXCLUDE

        self.source = _Folder(folder, what)
        self.base = base
        self.description = what
        floating = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
        self._keys = set()
        for key in self.source.files:
            e = self.source.entry(key)
            if e.dtype not in floating or key in DEFAULT_EXCLUDE or key.rsplit(".", 1)[-1] in DEFAULT_EXCLUDE:
                continue
            if key not in base:
                raise DeltaError(
                    f"Key {key!r} of the {what} is not in the base model; are they the same architecture?"
                )
            if base.entry(key).shape != e.shape:
                raise DeltaError(
                    f"Key {key!r} has shape {e.shape} in the {what} but {base.entry(key).shape} in the base model."
                )
            self._keys.add(key)

    def delta_keys(self) -> set[str]:
        return self._keys

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:
        return self.source.read(key).to(torch.float32).sub_(base)

    def delta_range(
        self, key: str, start: int, stop: int, base: Callable[[], torch.Tensor], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.source.read_range(key, start, stop, out).sub_(self.base.read_range_cached(key, start, stop))


class _LoraInput(_Input):
    """A LoRA adapter folder: δ = s·B@A per target linear (``fan_in_fan_out`` transposed), s·b for a LoRA bias."""

    def __init__(self, folder: Path, base: _Folder, what: str):
        from hf_cft.merging.deltas import _lora_groups, _read_adapter

        config, tensors, where = _read_adapter(folder, None)
        self.description = what
        self.config = config
        self.groups = _lora_groups(config, tensors, what)
        self._targets: dict[str, tuple[str, str]] = {}  # base key → (module, "weight" | "bias")
        for module, g in self.groups.items():
            entries = {f"{module}.weight": "weight"}
            if "lora_B.bias" in g:
                entries[f"{module}.bias"] = "bias"
            for key, part in entries.items():
                if key not in base:
                    raise DeltaError(
                        f"LoRA target {module!r} of the {what} has no base key {key!r} in the base model."
                    )
                b, a = g["lora_B.weight"], g["lora_A.weight"]
                shape = (b.shape[0],) if part == "bias" else (b.shape[0], a.shape[1])
                if g["fan_in_fan_out"] and part == "weight":
                    shape = shape[::-1]
                if base.entry(key).shape != shape:
                    raise DeltaError(
                        f"LoRA delta for {key!r} has shape {shape} but the base weight is {base.entry(key).shape}."
                    )
                self._targets[key] = (module, part)

    def delta_keys(self) -> set[str]:
        return set(self._targets)

    @property
    def has_bias(self) -> bool:
        return any(part == "bias" for _, part in self._targets.values())

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:
        module, part = self._targets[key]
        g = self.groups[module]
        s = g["scaling"]
        if part == "bias":
            return g["lora_B.bias"].to(torch.float32) * s
        dw = torch.mm(g["lora_B.weight"].to(torch.float32), g["lora_A.weight"].to(torch.float32)).mul_(s)
        return dw.t().contiguous() if g["fan_in_fan_out"] else dw


class _DeltaInput(_Input):
    """An in-memory delta (a dict or a :class:`~hf_cft.merging.LazyDelta`) keyed like θ⁰."""

    def __init__(self, delta: Mapping[str, torch.Tensor], what: str):
        self.mapping = delta
        self.description = what

    def delta_keys(self) -> set[str]:
        return set(self.mapping)

    def delta(self, key: str, base: torch.Tensor | None) -> torch.Tensor:
        t = self.mapping[key]
        return t.to(torch.float32) if t.dtype != torch.float32 else t

    def delta_range(
        self, key: str, start: int, stop: int, base: Callable[[], torch.Tensor], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.delta(key, None).reshape(-1)[start:stop]


class _KeyDeltas(Sequence):
    """The inputs' deltas at one key, read on access (each access reads again: a method that needs an input twice
    keeps it); an input without this key gives zeros."""

    def __init__(self, inputs: Sequence[_Input], present: list[bool], key: str, shape, base, check: bool = True):
        self.inputs, self.present, self.key, self.shape, self.base = inputs, present, key, shape, base
        self.check = check  # False: the caller checks the merged delta and calls check_inputs() when it is not finite

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, t):
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(len(self)))]
        if not self.present[t]:
            return torch.zeros(self.shape)
        d = self.inputs[t].delta(self.key, self.base())
        if self.check:
            self._check(t, d)
        return d

    def range(self, t: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat entries ``[start, stop)`` of input t's delta (fp32), read alone (into ``out`` where given) where the
        input can (a model folder), unchecked like :meth:`unchecked`."""
        if not self.present[t]:
            return torch.zeros(max(0, stop - start))
        return self.inputs[t].delta_range(self.key, start, stop, self.base, out)

    def unchecked(self, t: int) -> torch.Tensor:
        """Input t's delta, read without the finite check: the caller checks it (:meth:`verify`, or a pass of its own
        that counts NaN/inf entries and then calls :meth:`check_inputs`)."""
        return torch.zeros(self.shape) if not self.present[t] else self.inputs[t].delta(self.key, self.base())

    def verify(self, t: int, d: torch.Tensor) -> None:
        """The finite check of input t's delta ``d`` read by :meth:`unchecked` (where this key checks its inputs)."""
        if self.check and self.present[t]:
            self._check(t, d)

    def _check(self, t: int, d: torch.Tensor) -> None:
        from hf_cft.merging.deltas import all_finite

        if not all_finite(d):
            raise NonFiniteError(f"The delta of {self.inputs[t].description} holds NaN/inf at key {self.key!r}.")

    def raise_nonfinite(self) -> NoReturn:
        """Raise :class:`NonFiniteError` naming the first input whose delta holds NaN/inf (a kernel counted some)."""
        self.check_inputs()
        raise NonFiniteError(f"An input's delta holds NaN/inf at key {self.key!r}.")  # (check_inputs names it)

    def check_inputs(self) -> None:
        """Read every present input again and raise :class:`NonFiniteError` naming the first non-finite one."""
        for t, here in enumerate(self.present):
            if here:
                self._check(t, self.inputs[t].delta(self.key, self.base()))


class _LazyInputDelta(Mapping):
    """One input's delta as a lazy mapping over the keys it has (for ``prepare`` passes and model-kind methods)."""

    def __init__(self, inp: _Input, base_read):
        self.inp, self.base_read, self._keys = inp, base_read, sorted(inp.delta_keys())

    def __getitem__(self, key):
        if key not in self.inp.delta_keys():
            raise KeyError(key)
        return self.inp.delta(key, self.base_read(key))

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


class _LazyBase(Mapping):
    def __init__(self, shapes: Mapping[str, tuple], read):
        self.shapes, self.read = shapes, read

    def __getitem__(self, key):
        if key not in self.shapes:
            raise KeyError(key)
        return self.read(key)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


# ------------------------------------------------------------------------------------------------ the merge pass


def _merged_keys(method, inputs: Sequence[_Input], shapes: Mapping[str, tuple], base_read, options, per_input, extra):
    """Yield ``(key, merged delta or None)`` in θ⁰'s key order (``None``: no input changes the key)."""
    from hf_cft.merging.registry import ModelContext, TensorContext

    key_sets = [inp.delta_keys() for inp in inputs]
    lazy = [_LazyInputDelta(inp, base_read) for inp in inputs]
    if method.kind == "model" or method.prepare is not None:
        mctx = ModelContext(
            options, per_input, _LazyBase(shapes, base_read), dict(shapes), extra.get("base_model"), extra
        )
    if method.kind == "model":
        result = method.fn(lazy, mctx)
        merged = dict(result.items() if isinstance(result, Mapping) else result)
        for key in shapes:
            yield key, merged.pop(key, None)
        if merged:
            raise DeltaError(f"Method {method.name!r} returned key {next(iter(merged))!r}, which θ⁰ does not have.")
        return
    state = method.prepare(lazy, mctx) if method.prepare is not None else {}
    keys = list(shapes)
    for i, key in enumerate(keys):
        present = [key in ks for ks in key_sets]
        if not any(present):
            yield key, None
            continue
        cache: dict[str, torch.Tensor] = {}

        def base(key=key, cache=cache):
            if "t" not in cache:
                cache["t"] = base_read(key)
            return cache["t"]

        ctx = TensorContext(key, options, per_input, present, base, i, len(keys), state)
        deltas = _KeyDeltas(inputs, present, key, shapes[key], base, check=not method.nonfinite_propagates)
        merged = method.fn(deltas, ctx)
        if method.nonfinite_propagates and isinstance(merged, torch.Tensor) and id(merged) not in _FINITE:
            from hf_cft.merging.deltas import all_finite

            if all_finite(merged):
                mark_finite(merged)  # _check_merged need not read it again
            else:  # a non-finite input shows here: name it (else the options overflowed: _check_merged says so)
                deltas.check_inputs()
        yield key, merged


#: the merged delta of the key being merged, by id, where it is known to be finite (cleared per check; the tensor is
#: kept, so its id cannot be reused by another one meanwhile)
_FINITE: dict[int, torch.Tensor] = {}


def mark_finite(merged: torch.Tensor) -> torch.Tensor:
    """Record that ``merged``, a method's result for the key being merged, is finite (its kernel counted it), so the
    streaming merge does not read it again to check."""
    _FINITE.clear()
    _FINITE[id(merged)] = merged
    return merged


def _nonzero(t: torch.Tensor) -> bool:
    """Whether ``t`` has a non-zero entry: a strided sample first (a changed key almost always shows there), the
    whole tensor only when the sample is all zeros."""
    flat = t.reshape(-1)
    return bool(flat[:: max(1, flat.numel() // 4096)].any()) or bool(flat.any())


def _check_merged(
    key: str, merged: torch.Tensor, shape: tuple, method: str, options=None, per_input=()
) -> torch.Tensor:
    from hf_cft.merging.deltas import all_finite

    known_finite = id(merged) in _FINITE
    _FINITE.clear()
    if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != tuple(shape):
        got = tuple(merged.shape) if isinstance(merged, torch.Tensor) else type(merged).__name__
        raise DeltaError(f"Method {method!r} returned {got} for key {key!r}, expected a tensor of shape {shape}.")
    if not known_finite and not all_finite(merged):
        weights = [row.get("weight") for row in per_input]
        parts = [f"its options {dict(options)}"] if options else []
        if any(w is not None for w in weights):  # a method without per-input weights: nothing to name there
            parts.append(f"the inputs' weights {weights}")
        given = " or ".join(parts) or "its inputs"
        raise MergeConfigError(
            f"The merged delta of {method!r} at key {key!r} holds NaN/inf: {given} scale finite inputs beyond the "
            "float range; use smaller values."
        )
    return merged


def merge_deltas(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    parameters: Mapping[str, Any] | None = None,
    inputs: Sequence[Mapping[str, Any]] | None = None,
    shapes: Mapping[str, tuple] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in-memory deltas with a registered method, key by key: ``{key: merged delta}`` (fp32).

    ``parameters``: method options (and defaults of per-input ones); ``inputs``: one dict of per-input options per
    delta (``weight``, ``density``, ...). Keys are the union of the deltas' keys (a delta without a key counts as
    zeros there, never materialised); ``shapes`` (key → shape) is needed only for keys no delta has, e.g. for a
    model-wide TIES trim over the whole model. ``extra`` reaches the methods that need more than the deltas
    (``ModelContext.extra``), e.g. RegMean's ``{"model": θ⁰ module, "calibration": [loader per input]}``. Example::

        merged = merge_deltas([d1, d2], "ties", {"density": 0.2}, inputs=[{"weight": 1.0}, {"weight": 0.5}])
    """
    from hf_cft.merging.registry import get_method

    if isinstance(deltas, Mapping) or not len(deltas):
        raise MergeConfigError("deltas must be a non-empty list of deltas (dicts of tensors).")
    m = get_method(method)
    options, per_input = m.resolve(parameters, inputs if inputs is not None else [{} for _ in deltas])
    if len(per_input) != len(deltas):
        raise MergeConfigError(f"inputs has {len(per_input)} entries for {len(deltas)} deltas.")
    all_shapes = dict(shapes or {})
    for t, d in enumerate(deltas):
        for key in d:
            s = tuple(d[key].shape)
            if all_shapes.setdefault(key, s) != s:
                raise DeltaError(f"key {key!r} has shape {s} in delta {t} but {all_shapes[key]} elsewhere.")
    srcs = [_DeltaInput(d, f"input {t}") for t, d in enumerate(deltas)]
    out = {}
    merged_keys = _merged_keys(
        m, srcs, dict(sorted(all_shapes.items())), lambda k: None, options, per_input, dict(extra or {})
    )
    for key, merged in merged_keys:
        out[key] = (
            torch.zeros(all_shapes[key])
            if merged is None
            else _check_merged(key, merged, all_shapes[key], m.name, options, per_input)
        )
    return out


# ------------------------------------------------------------------------------------------------ writing


class ShardedWriter:
    """Write tensors planned in advance into safetensors shards, in order, without holding a shard in memory.

    ``plan``: ``[(key, shape, dtype)]`` in writing order. Keys go into shards of at most ``max_shard_size`` bytes
    (a tensor larger than that gets a shard of its own); each shard's header (keys, dtypes, shapes, offsets) is
    written when the shard is opened, then every :meth:`write` appends the next key's bytes. One shard is named
    ``model.safetensors`` (``filename``); several are ``model-00001-of-0000N.safetensors`` with
    ``model.safetensors.index.json``. Within a shard tensors are ordered by element size (largest first), so every
    tensor is aligned to its element size, as safetensors' own writer does."""

    def __init__(
        self,
        folder: str | os.PathLike,
        plan,
        max_shard_size: int,
        metadata: dict | None = None,
        filename: str = "model.safetensors",
    ):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, tuple, torch.dtype]]] = [[]]
        size = 0
        for key, shape, dtype in plan:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + n > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((key, tuple(shape), dtype))
            size += n
        stem, suffix = filename.rsplit(".", 1)
        names = (
            [filename]
            if len(shards) == 1
            else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{suffix}" for i in range(len(shards))]
        )
        self.index_name = None if len(shards) == 1 else f"{filename}.index.json"
        self.order = [key for key, _, _ in plan]
        self._shard_of: dict[str, int] = {}
        self._layout: list[list[tuple[str, tuple, torch.dtype]]] = []
        for i, shard in enumerate(shards):
            shard = sorted(shard, key=lambda e: -torch.empty((), dtype=e[2]).element_size())
            self._layout.append(shard)
            for key, _, _ in shard:
                self._shard_of[key] = i
        self.names = names
        self.total_size = 0
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._next = [0] * len(shards)
        self._files: dict[int, Any] = {}
        self.written = 0

    def _open(self, i: int):
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for key, shape, dtype in self._layout[i]:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        data = json.dumps(header, separators=(",", ":")).encode("utf-8")
        data += b" " * (-len(data) % 8)
        fh = open(self.folder / self.names[i], "wb")  # noqa: SIM115 - closed in close() or when the shard is full
        fh.write(struct.pack("<Q", len(data)))
        fh.write(data)
        self._files[i] = fh
        self.total_size += offset

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write ``key`` (must be the plan's dtype and shape). Keys of a shard may come in any order; those that come
        before their turn in the shard's layout wait in memory until it comes (the plan's order never waits)."""
        i = self._shard_of.get(key)
        if i is None:
            raise DeltaError(f"Key {key!r} is not in the output plan.")
        layout = self._layout[i]
        spec = next(e for e in layout if e[0] == key)
        if tensor.dtype != spec[2] or tuple(tensor.shape) != spec[1]:
            raise DeltaError(
                f"Key {key!r}: writing {tensor.dtype} {tuple(tensor.shape)}, planned {spec[2]} {spec[1]}."
            )
        self._pending.setdefault(i, {})[key] = tensor
        if i not in self._files:
            self._open(i)
        fh = self._files[i]
        while self._next[i] < len(layout) and layout[self._next[i]][0] in self._pending[i]:
            t = self._pending[i].pop(layout[self._next[i]][0])
            if t.numel():
                t = _host_order(t)  # safetensors is little-endian whatever the host
                fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
            self._next[i] += 1
            self.written += 1
        if self._next[i] == len(layout):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()

    def close(self) -> list[str]:
        """Check every planned key was written, write the index; return the file names."""
        for i, layout in enumerate(self._layout):
            if self._next[i] != len(layout):
                missing = layout[self._next[i]][0]
                raise DeltaError(f"Output shard {self.names[i]!r} was not completed (key {missing!r} not written).")
        if self.index_name is not None:
            from hf_cft.utils import atomic_write_json

            weight_map = {key: self.names[self._shard_of[key]] for key in self.order}
            atomic_write_json(
                self.folder / self.index_name, {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            )
            return [*self.names, self.index_name]
        return list(self.names)

    def abort(self) -> None:
        for fh in self._files.values():
            if not fh.closed:
                fh.close()


# ------------------------------------------------------------------------------------------------ folders


def open_input(folder: Path, base: _Folder, what: str) -> _Input:
    """A LoRA adapter folder (``adapter_config.json``) or a full model folder (``config.json``)."""
    if (folder / "adapter_config.json").is_file():
        return _LoraInput(folder, base, what)
    if (folder / "config.json").is_file():
        return _ModelInput(folder, base, what)
    raise BundleError(f"{what}: {str(folder)!r} is neither a PEFT adapter folder nor a model folder (config.json).")


def _out_dtype(name: str | None, base_dtype: torch.dtype) -> torch.dtype:
    if name is None or not base_dtype.is_floating_point:
        return base_dtype
    return OUT_DTYPES[name]


def merge_folders(
    base: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    method: str,
    parameters: Mapping[str, Any] | None = None,
    *,
    out: str | os.PathLike,
    inputs: Sequence[Mapping[str, Any]] | None = None,
    out_dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    lora_rank: int | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    source_names: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge local input folders into θ⁰ (``base``, a model folder) with a registered method, streamed key by key,
    and write the result to ``out`` atomically (a staged sibling folder swapped in at the end).

    ``sources``: full fine-tuned model folders and/or LoRA adapter folders (same architecture as ``base``);
    ``inputs``: per-input options (``weight``, ``density``, ...); ``out_dtype``: ``float32`` / ``float16`` /
    ``bfloat16`` (default: each tensor keeps θ⁰'s dtype); ``max_shard_size``: bytes or ``"2GB"``;
    ``lora_rank``: write a PEFT LoRA adapter instead of a full model — per target of the LoRA inputs, the rank-r
    truncated SVD of the merged ΔW (``B = U_r·diag(S_r)``, ``A = V_rᵀ``, ``lora_alpha = r``), as peft's ``svd``
    combination; every input must then be a LoRA adapter. ``extra_files``: name → bytes written beside the weights
    (the card, the resolved config). ``extra``: what a ``kind="model"`` method needs beyond the deltas
    (``ModelContext.extra``: RegMean's and Fisher's calibration loaders, θ⁰ as a module, ...). Returns a summary
    (method, options, per-input options, keys merged, files).
    """
    from hf_cft.merging.registry import get_method
    from hf_cft.utils import staged_folder

    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise MergeConfigError(f"out_dtype must be one of {tuple(OUT_DTYPES)} or None, got {out_dtype!r}.")
    shard_bytes = parse_size(max_shard_size)
    m = get_method(method)
    base_folder = Path(base)
    names = list(source_names or [str(s) for s in sources])
    base_src = _Folder(base_folder, f"base model {str(base)!r}")
    srcs = [open_input(Path(s), base_src, f"input {t} ({names[t]})") for t, s in enumerate(sources)]
    options, per_input = m.resolve(parameters, inputs if inputs is not None else [{} for _ in srcs])
    shapes = {k: base_src.entry(k).shape for k in base_src.files}
    floating = {k for k in shapes if base_src.entry(k).dtype.is_floating_point}

    last: dict[str, torch.Tensor] = {}

    def base_read(key: str) -> torch.Tensor:  # θ⁰ at the key being merged, read once for its deltas and the output
        if key not in last:
            last.clear()
            last[key] = base_src.read(key).to(torch.float32)
        return last[key]

    merge_shapes = {k: s for k, s in shapes.items() if k in floating}
    changed = 0
    with staged_folder(out) as stage:
        if lora_rank is None:
            plan = [(k, shapes[k], _out_dtype(out_dtype, base_src.entry(k).dtype)) for k in shapes]
            writer = ShardedWriter(stage, plan, shard_bytes)
            try:
                merged_iter = dict.fromkeys(shapes)  # θ⁰'s order; the floating keys merged as they come
                stream = _merged_keys(
                    m, srcs, merge_shapes, base_read, options, per_input, {"base_model": base_folder, **(extra or {})}
                )
                for key in merged_iter:
                    if key not in floating:
                        writer.write(key, base_src.read(key))
                        continue
                    k2, merged = next(stream)
                    assert k2 == key
                    dtype = _out_dtype(out_dtype, base_src.entry(key).dtype)
                    if merged is None:
                        writer.write(key, base_src.read(key).to(dtype))
                        continue
                    merged = _check_merged(key, merged, shapes[key], m.name, options, per_input)
                    changed += _nonzero(merged)  # a key counts as changed only where its merged delta is not 0
                    writer.write(key, merged.add_(base_read(key)).to(dtype))
                files = writer.close()
            except BaseException:
                writer.abort()
                raise
            _write_model_side_files(base_folder, stage, out_dtype)
        else:
            changed, files = _write_lora(
                m,
                srcs,
                merge_shapes,
                base_read,
                options,
                per_input,
                lora_rank,
                base,
                stage,
                shard_bytes,
                out_dtype,
                base_folder,
                dict(extra or {}),
            )
        for name, data in (extra_files or {}).items():
            (stage / name).write_bytes(data)
    return {
        "method": m.name,
        "parameters": options,
        "inputs": per_input,
        "keys_merged": changed,
        "files": files,
    }


def _write_model_side_files(base_folder: Path, stage: Path, out_dtype: str | None) -> None:
    import shutil

    from hf_cft.utils import read_json_object

    config = read_json_object(base_folder / "config.json", BundleError, f"config.json of {str(base_folder)!r}")
    if out_dtype is not None:
        config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = out_dtype
    (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in SIDE_FILES:
        if (base_folder / name).is_file():
            shutil.copy2(base_folder / name, stage / name)


def _write_lora(
    m, srcs, shapes, base_read, options, per_input, rank, base, stage, shard_bytes, out_dtype, base_folder, extra
):
    """The merged ΔW of every LoRA target as a rank-``rank`` LoRA adapter (truncated SVD), streamed key by key."""
    from hf_cft.validation import check_int

    rank = check_int(rank, "lora_rank", low=1, error=MergeConfigError)
    if not all(isinstance(s, _LoraInput) for s in srcs):
        bad = next(s for s in srcs if not isinstance(s, _LoraInput))
        raise MergeConfigError(f"lora_rank: a LoRA output needs LoRA inputs only; {bad.description} is a full model.")
    if any(s.has_bias for s in srcs):
        bad = next(s for s in srcs if s.has_bias)
        raise MergeConfigError(
            f"lora_rank: {bad.description} trains LoRA biases (lora_bias), which an SVD of ΔW drops."
        )
    targets = sorted(set().union(*(s.delta_keys() for s in srcs)))
    too_big = [k for k in targets if rank > min(shapes[k])]
    if too_big:
        raise MergeConfigError(
            f"lora_rank={rank} exceeds the smaller dimension of {too_big[0]!r} {shapes[too_big[0]]}."
        )
    dtype = OUT_DTYPES[out_dtype] if out_dtype else torch.float32
    plan = []
    for key in targets:
        module = key[: -len(".weight")]
        plan.append((f"base_model.model.{module}.lora_A.weight", (rank, shapes[key][1]), dtype))
        plan.append((f"base_model.model.{module}.lora_B.weight", (shapes[key][0], rank), dtype))
    writer = ShardedWriter(stage, plan, shard_bytes, filename="adapter_model.safetensors")
    changed = 0
    try:
        for key, merged in _merged_keys(
            m,
            srcs,
            {k: shapes[k] for k in targets},
            base_read,
            options,
            per_input,
            {"base_model": base_folder, **extra},
        ):
            merged = (
                torch.zeros(shapes[key])
                if merged is None
                else _check_merged(key, merged, shapes[key], m.name, options, per_input)
            )
            changed += _nonzero(merged)
            u, s, vh = torch.linalg.svd(merged.double(), full_matrices=False)
            module = key[: -len(".weight")]
            writer.write(f"base_model.model.{module}.lora_A.weight", vh[:rank].to(dtype).contiguous())
            writer.write(f"base_model.model.{module}.lora_B.weight", (u[:, :rank] * s[:rank]).to(dtype).contiguous())
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    first = srcs[0].config
    config = {
        "peft_type": "LORA",
        "task_type": first.get("task_type"),
        "base_model_name_or_path": first.get("base_model_name_or_path") or str(base),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(k[: -len(".weight")] for k in targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (stage / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return changed, [*files, "adapter_config.json"]

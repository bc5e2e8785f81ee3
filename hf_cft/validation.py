"""Checks of what enters hf_cft from outside, in one place for the Python API and the ``hf-cft`` command line.

Every numeric option (λ, β, N, τ, k, ρ, shots, fractions, scales), every tensor read from a file or handed in by a
user (deltas, heads, ``logit_scale``, CoOp contexts), every template, label and path is checked once where it
enters, with a typed error (a subclass of :class:`~hf_cft.errors.HfCftError`) that names it. The CLI calls the same
functions as the library, so ``hf-cft merge --k 0`` and ``ties(deltas, k=0)`` fail with the same error.

Example::

    from hf_cft.validation import check_number, check_template

    k = check_number(k, "k", low=0, low_open=True, high=1)         # OptionError naming 'k' outside (0, 1]
    check_template("a photo of a {}.")                              # TemplateError for '{{}}', '{0} {}', ...
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from hf_cft.errors import ClassNamesError, DatasetFormatError, HfCftError, NonFiniteError, OptionError, TemplateError

__all__ = [
    "PROBE_CLASS_NAME",
    "check_choice",
    "check_finite_tensor",
    "check_int",
    "check_labels",
    "check_number",
    "check_state_keys",
    "check_template",
    "inside_folder",
    "safetensors_files",
]

#: The class name formatted into a template to check it: a template must hold it exactly once after formatting.
PROBE_CLASS_NAME = "hfcftprobe\u2063class"


def _fail(error: type[Exception], message: str):
    raise error(message)


def check_number(
    value,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    error: type[HfCftError] = OptionError,
) -> float:
    """``value`` as a finite float inside ``[low, high]`` (ends open with ``low_open`` / ``high_open``, ``None``
    for unbounded); else ``error`` naming ``name``, the interval and the value. Bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(error, f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    v = float(value)
    if not math.isfinite(v):
        _fail(error, f"{name} must be finite, got {value!r}.")
    below = low is not None and (v <= low if low_open else v < low)
    above = high is not None and (v >= high if high_open else v > high)
    if below or above:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"
        _fail(error, f"{name} must lie in {interval}, got {value!r}.")
    return v


def check_int(
    value,
    name: str,
    *,
    low: int | None = None,
    high: int | None = None,
    error: type[HfCftError] = OptionError,
    hint: str = "",
) -> int:
    """``value`` as an int in ``[low, high]`` (an integral float like ``5.0`` is accepted; bools are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(error, f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if isinstance(value, numbers.Integral):
        v = int(value)
    else:
        f = float(value)
        if not math.isfinite(f) or f != int(f):
            _fail(error, f"{name} must be an integer, got {value!r}.")
        v = int(f)
    if (low is not None and v < low) or (high is not None and v > high):
        bounds = f"at least {low}" if high is None else f"in [{low if low is not None else '-inf'}, {high}]"
        _fail(error, f"{name} must be {bounds}, got {value!r}.{' ' + hint if hint else ''}")
    return v


def check_choice(value, name: str, choices: Sequence, *, error: type[HfCftError] = OptionError):
    """``value`` if it is one of ``choices``, else ``error`` naming ``name`` and the allowed values."""
    if not any(value == c and type(value) is type(c) for c in choices):
        _fail(error, f"{name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def check_finite_tensor(tensor, name: str, *, error: type[HfCftError] = NonFiniteError):
    """``tensor`` unchanged when it holds only finite values (non-float tensors always do); else ``error`` naming
    ``name`` and the number of NaN/inf entries."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        _fail(error, f"{name} must be a tensor, got {type(tensor).__name__}.")
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            _fail(error, f"{name} holds {int((~finite).sum())} NaN/inf value(s).")
    return tensor


def check_template(template, owner: str = "") -> str:
    """``template`` if formatting a probe class name into it gives a string that contains the name exactly once
    (and no other placeholder is consumed); else :class:`TemplateError` naming the template.

    Refused: no ``{}`` (``"a photo"``), an escaped one (``"a photo of a {{}}."``: the class name disappears),
    positional or named fields (``"a {0} {}"``, ``"{name} {}"``), two placeholders, stray braces (``"photo of {}}"``).
    """
    where = f" of {owner}" if owner else ""
    if not isinstance(template, str):
        raise TemplateError(f"Template {template!r}{where} must be a string, got {type(template).__name__}.")
    try:
        text = template.format(PROBE_CLASS_NAME)
    except (IndexError, KeyError, ValueError, AttributeError, TypeError) as exc:  # "{.0}", "{[0]}", "{:d}"
        raise TemplateError(
            f"Template {template!r}{where} is not a valid format string with one '{{}}' for the class name "
            f"({type(exc).__name__}: {exc})."
        ) from None
    bare = template.replace("{{", "").replace("}}", "")  # escaped braces are literal text
    if text.count(PROBE_CLASS_NAME) != 1 or bare.count("{}") != 1 or bare.count("{") != 1 or bare.count("}") != 1:
        raise TemplateError(
            f"Template {template!r}{where} must contain exactly one '{{}}' placeholder for the class name."
        )
    return template


def check_labels(labels: Iterable, num_classes: int, owner: str = "", *, error: type[HfCftError] = DatasetFormatError):
    """Raise ``error`` naming the first label(s) that are not integers in ``0..num_classes-1``."""
    import numpy as np

    arr = np.asarray(list(labels) if not hasattr(labels, "__array__") else labels)
    where = f" of {owner}" if owner else ""
    if arr.size == 0:
        return
    if arr.dtype.kind not in "iu":
        bad = [v for v in arr.ravel().tolist() if not (isinstance(v, numbers.Integral) and not isinstance(v, bool))]
        if bad:
            _fail(error, f"Labels{where} must be integers; found {bad[:5]!r}.")
        arr = arr.astype(np.int64)
    out = arr[(arr < 0) | (arr >= num_classes)]
    if out.size:
        shown = sorted({int(v) for v in out.ravel().tolist()})[:5]
        _fail(
            error,
            f"Label(s) {shown}{where} lie outside 0..{num_classes - 1} ({num_classes} class names); "
            f"{out.size} row(s) affected.",
        )


def check_class_names_type(classnames, owner: str = "") -> list[str]:
    """``classnames`` as a list when it is a sequence of strings (not one string, not a mapping)."""
    where = f" of {owner}" if owner else ""
    if isinstance(classnames, (str, bytes, Mapping)) or not isinstance(classnames, Iterable):
        raise ClassNamesError(f"Class names{where} must be a list of strings, got {type(classnames).__name__}.")
    return list(classnames)


def inside_folder(folder: str | os.PathLike, name: str, error: type[HfCftError], what: str) -> Path:
    """``folder/name`` resolved, when it stays inside ``folder`` after following symlinks and ``..``; else
    ``error`` naming ``name`` and ``what`` (e.g. "index of model 'x'")."""
    root = Path(folder).resolve()
    if not isinstance(name, str) or not name or os.path.isabs(name):
        _fail(error, f"{what}: {name!r} must be a relative file name inside {str(folder)!r}.")
    target = (Path(folder) / name).resolve()
    if target != root and root not in target.parents:
        _fail(error, f"{what}: {name!r} resolves to {str(target)!r}, outside {str(folder)!r}.")
    return target


def check_state_keys(
    expected: Iterable[str],
    found: Iterable[str],
    what: str,
    *,
    error: type[HfCftError],
    strict: bool = True,
    allow_missing: Iterable[str] = (),
) -> None:
    """With ``strict``, ``error`` naming the keys of ``expected`` that ``found`` lacks (``allow_missing`` aside:
    buffers the model rebuilds) and the keys it has beyond ``expected``."""
    if not strict:
        return
    expected, found = set(expected), set(found)
    missing = sorted(expected - found - set(allow_missing))
    unexpected = sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} missing key(s) ({', '.join(map(repr, missing[:4]))}{', ...' if len(missing) > 4 else ''})"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key(s) ({', '.join(map(repr, unexpected[:4]))}"
                f"{', ...' if len(unexpected) > 4 else ''})"
            )
        _fail(
            error,
            f"{what} has {' and '.join(parts)}; refusing a partial load (pass strict=False to load it anyway, with "
            "the model's own values for missing keys).",
        )


def safetensors_files(
    folder: str | os.PathLike,
    error: type[HfCftError],
    what: str,
    pickle_suffixes: Sequence[str] = (),
    verb: str = "loads",
) -> dict[str, Path]:
    """Every tensor key of a model folder mapped to the safetensors file holding it: the files a
    ``model.safetensors.index.json`` names (each a ``.safetensors`` file inside the folder: never a pickle, never a
    ``../`` path, never a symlink out of the folder; every file present), else every ``*.safetensors`` file. Raises
    ``error`` naming ``what`` and the file."""
    import json

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        inside_folder(folder, index.name, error, what)
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise error(f"{what}: {index.name} is not valid JSON ({exc}).") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise error(f"{what}: {index.name} must hold a JSON object with a non-empty 'weight_map'.")
        names = {}
        for key, name in weight_map.items():
            if not isinstance(name, str) or not name.endswith(".safetensors"):
                raise error(
                    f"{what}: {index.name} maps {key!r} to {name!r}, which is not a safetensors file (hf_cft never "
                    "unpickles weights)."
                )
            names[key] = name
        files = {name: inside_folder(folder, name, error, f"{what}: {index.name}") for name in set(names.values())}
        for name, path in files.items():
            if not path.is_file():
                raise error(f"{what}: {index.name} names {name!r}, which does not exist.")
        keys: dict[str, Path] = {}
        for path in files.values():
            for key in _header_keys(path, error, what):
                keys[key] = path
        stray = sorted(k for k in names if names[k] and keys.get(k) != files[names[k]])
        if stray:
            raise error(f"{what}: {index.name} maps {stray[0]!r} to {names[stray[0]]!r}, which does not hold it.")
        return keys
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in tuple(pickle_suffixes))
        hint = f" It holds {', '.join(pickled)}: hf_cft {verb} safetensors only (never pickle)." if pickled else ""
        raise error(f"{what}: no safetensors weights in {str(folder)!r}.{hint}")
    keys = {}
    for path in paths:
        resolved = inside_folder(folder, path.name, error, what)
        for key in _header_keys(resolved, error, what):
            keys[key] = resolved
    return keys


def _header_keys(path: Path, error: type[HfCftError], what: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types for torn or foreign files
        raise error(f"{what}: {path.name!r} is not a readable safetensors file ({exc}).") from exc


def safetensors_dtypes(path: str | os.PathLike) -> dict[str, str]:
    """The dtype string (``F32``, ``I64``, ...) of every tensor in a safetensors file, from its header only."""
    import json
    import struct

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}

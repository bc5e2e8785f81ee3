"""Merging methods by name: the one table that ``hf-cft merge`` (flags or ``--config merge.yaml``), the merge config
(:mod:`hf_cft.merging.config`) and :func:`hf_cft.merging.merge_deltas` dispatch through.

A method is a :class:`MergeMethod`: a name, a *kind*, a function and an option schema (:class:`Option`).

- ``kind="tensor"``: the method merges **one key at a time** — ``fn(deltas, ctx) -> Tensor`` gets the fp32 deltas of
  every input at one key (``deltas[t]`` has the key's shape; an input without a delta at that key, e.g. a LoRA
  adapter that does not target it, gives zeros, and ``ctx.present[t]`` is ``False``) and a :class:`TensorContext`,
  and returns the merged delta of that key (fp32, same shape, a new tensor: the inputs must not be modified in
  place, they may be the caller's own tensors). Such methods are *streamed*: the merge reads one tensor of each input, merges it, writes it, and
  moves to the next key, so memory stays at one key of each input whatever the model size
  (:mod:`hf_cft.merging.streaming`). Element-wise methods and per-tensor ones (TIES' per-tensor trim, an SVD per
  weight matrix) are of this kind.
- ``kind="model"``: the method needs every key at once or more than the deltas (a model-wide trim, calibration
  data): ``fn(deltas, ctx) -> Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]`` gets one lazy mapping per input
  (key → fp32 delta, read on access; keys the input has no delta for are absent) and a :class:`ModelContext`, and
  returns the merged delta for any subset of the keys (a key left out keeps θ⁰).

Options are declared once and validated the same way for the flag form, the YAML config and the Python API:
a bad value raises :class:`~hf_cft.errors.MergeConfigError` naming the field (``parameters.k``, ``inputs[1].weight``,
or the command-line flag). An option with ``per_input=True`` may be given per input (each input's ``weight`` /
``density`` / ``parameters``) and at method level, where it is the default of every input; the function reads it
from ``ctx.inputs[t][name]``. Every other option is read from ``ctx.options[name]``.

Registering a method (e.g. in a module of ``hf_cft.merging``)::

    from hf_cft.merging.registry import MergeMethod, Option, register

    def _my_tensor(deltas, ctx):
        return sum(inp["weight"] * d for inp, d in zip(ctx.inputs, deltas)) * ctx.options["scale"]

    register(MergeMethod(
        name="my_method", kind="tensor", fn=_my_tensor,
        options=(Option("weight", 1.0, per_input=True, help="λ_t of each input"),
                 Option("scale", 1.0, low=0.0, help="global factor")),
        summary="Σ_t λ_t·τ_t, scaled", reference="arXiv:xxxx.xxxxx",
    ))

and add the module to :data:`PROVIDERS` so that it is imported (and its methods registered) before the first
look-up. ``hf-cft merge --method my_method --param scale=2`` and ``method: my_method`` in a merge config then work
with no further code. Names are unique: registering a taken name raises :class:`~hf_cft.errors.MergeConfigError`
unless ``replace=True``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hf_cft.errors import MergeConfigError

__all__ = [
    "METHOD_KINDS",
    "PROVIDERS",
    "MergeMethod",
    "ModelContext",
    "Option",
    "TensorContext",
    "get_method",
    "method_names",
    "register",
]

METHOD_KINDS = ("tensor", "model")
OPTION_KINDS = ("number", "int", "choice", "bool", "str", "numbers")
CALIBRATION_NEEDS = ("images", "classes")

#: Modules that register methods when imported (imported once, on the first look-up). Add yours here.
PROVIDERS: list[str] = ["hf_cft.merging.baselines", "hf_cft.merging.methods", "hf_cft.merging.data_dependent"]

_METHODS: dict[str, MergeMethod] = {}
_LOADED = False


@dataclass(frozen=True)
class Option:
    """One option of a merging method.

    ``kind``: ``"number"`` (a finite float within ``low`` / ``high``, ends open with ``low_open`` / ``high_open``),
    ``"int"``, ``"choice"`` (one of ``choices``), ``"bool"``, ``"str"`` or ``"numbers"`` (a list of numbers).
    ``default=None`` with ``required=False`` means "not set" (the function picks). ``per_input``: the option may be
    given per input (see the module docstring).
    """

    name: str
    default: Any = None
    kind: str = "number"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    per_input: bool = False
    required: bool = False
    help: str = ""

    def __post_init__(self):
        if self.kind not in OPTION_KINDS:
            raise MergeConfigError(f"Option {self.name!r}: kind must be one of {OPTION_KINDS}, got {self.kind!r}.")
        if self.kind == "choice" and not self.choices:
            raise MergeConfigError(f"Option {self.name!r} of kind 'choice' needs choices.")

    def check(self, value: Any, where: str) -> Any:
        """``value`` converted and checked; :class:`MergeConfigError` naming ``where`` (the field) otherwise."""
        from hf_cft.validation import check_choice, check_int, check_number

        if value is None:
            if self.required:
                raise MergeConfigError(f"{where} is required.")
            return None
        if self.kind == "number":
            return check_number(
                value,
                where,
                low=self.low,
                high=self.high,
                low_open=self.low_open,
                high_open=self.high_open,
                error=MergeConfigError,
            )
        if self.kind == "numbers":
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise MergeConfigError(f"{where} must be a list of numbers, got {value!r}.")
            return [
                check_number(
                    v,
                    f"{where}[{i}]",
                    low=self.low,
                    high=self.high,
                    low_open=self.low_open,
                    high_open=self.high_open,
                    error=MergeConfigError,
                )
                for i, v in enumerate(value)
            ]
        if self.kind == "int":
            low = None if self.low is None else math.ceil(self.low)
            high = None if self.high is None else math.floor(self.high)
            return check_int(value, where, low=low, high=high, error=MergeConfigError)
        if self.kind == "choice":
            return check_choice(value, where, self.choices, error=MergeConfigError)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise MergeConfigError(f"{where} must be true or false, got {value!r}.")
            return value
        if not isinstance(value, str):
            raise MergeConfigError(f"{where} must be a string, got {value!r} ({type(value).__name__}).")
        return value

    def describe(self) -> str:
        """One line for help texts and docs: name, default, range or choices, per-input, help."""
        if self.kind == "choice":
            what = "|".join(map(str, self.choices))
        elif self.kind in ("number", "int", "numbers") and (self.low is not None or self.high is not None):
            left = "(" if self.low_open or self.low is None else "["
            right = ")" if self.high_open or self.high is None else "]"
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            what = f"{self.kind} in {left}{lo}, {hi}{right}"
        else:
            what = self.kind
        extra = ", per input" if self.per_input else ""
        default = "required" if self.required else f"default {self.default!r}"
        head = f"{self.name} ({what}{extra}; {default})"
        return f"{head}: {self.help}" if self.help else head  # the help text as written (it may end in ":")


@dataclass
class TensorContext:
    """What a ``kind="tensor"`` method gets besides the deltas of one key.

    ``key``: the state-dict key; ``options``: the method-level options (validated, defaults filled);
    ``inputs``: per input, its per-input options (``weight``, ``density``, ... validated, defaults filled);
    ``present``: per input, whether it has a delta at this key (absent ones are passed as zeros);
    ``base()``: θ⁰ at this key as fp32 (read on first call, e.g. for SLERP of full weights);
    ``index``: the key's position in the merge order (0-based) and ``num_keys`` their number;
    ``state``: what the method's ``prepare`` pass returned (``{}`` without one).
    """

    key: str
    options: dict[str, Any]
    inputs: list[dict[str, Any]]
    present: list[bool]
    base: Callable[[], Any]
    index: int = 0
    num_keys: int = 1
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> list[float]:
        """Each input's ``weight`` (KeyError when the method declares no ``weight`` option)."""
        return [inp["weight"] for inp in self.inputs]


@dataclass
class ModelContext:
    """What a ``kind="model"`` method gets besides the lazy deltas: ``options`` / ``inputs`` as in
    :class:`TensorContext`; ``base``: a lazy mapping key → θ⁰ (fp32); ``shapes``: key → shape of every key of θ⁰;
    ``base_model``: the base model folder (or ``None`` for in-memory deltas) for methods that run the model
    (calibration statistics); ``extra``: anything the caller passes through (e.g. a calibration loader)."""

    options: dict[str, Any]
    inputs: list[dict[str, Any]]
    base: Mapping[str, Any]
    shapes: dict[str, tuple[int, ...]]
    base_model: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merging method (see the module docstring for ``kind`` and ``fn``).

    ``min_inputs`` / ``max_inputs``: how many inputs it merges (``max_inputs=None``: any number). ``summary``: one
    line (formula and defaults) for help texts and the merge card; ``reference``: the paper or code it follows.
    ``check``: an optional ``check(options, inputs, where)`` for constraints between options (raise
    :class:`MergeConfigError` naming the field; it may fill defaults that depend on other options).
    ``prepare``: an optional ``prepare(deltas, ctx) -> dict`` run before a ``"tensor"`` method's key-by-key pass,
    with the lazy deltas and a :class:`ModelContext` as a ``"model"`` method gets them, for statistics over the
    whole model (e.g. TIES' model-wide trim threshold); its result is ``TensorContext.state``.
    ``calibration``: what a data-dependent method needs from each input's calibration data (``"images"``: batches of
    ``pixel_values``; ``"classes"``: the dataset's class names and templates, with θ⁰'s tokenizer, for a zero-shot
    head); non-empty means a merge config must name each input's data (``inputs[t].calibration``), and
    ``hf-cft merge`` loads it into ``ModelContext.extra`` (RegMean, Fisher merging).
    ``nonfinite_propagates``: a NaN/inf in any input's delta always makes the merged delta non-finite (sums, masks
    applied by multiplication), so a streamed merge checks the inputs only when the merged delta is not finite —
    one read of every input per key less — and still names the offending input. Leave it ``False`` for a method
    that can drop a NaN (a max-magnitude selection, a trim by ranking)."""

    name: str
    kind: str
    fn: Callable
    options: tuple[Option, ...] = ()
    min_inputs: int = 1
    max_inputs: int | None = None
    summary: str = ""
    reference: str = ""
    check: Callable[[dict, list[dict], str], None] | None = None
    prepare: Callable[[list[Mapping[str, Any]], ModelContext], dict] | None = None
    calibration: tuple[str, ...] = ()
    nonfinite_propagates: bool = False

    def __post_init__(self):
        if self.kind not in METHOD_KINDS:
            raise MergeConfigError(f"Method {self.name!r}: kind must be one of {METHOD_KINDS}, got {self.kind!r}.")
        unknown = [c for c in self.calibration if c not in CALIBRATION_NEEDS]
        if unknown:
            raise MergeConfigError(
                f"Method {self.name!r}: calibration needs must be among {CALIBRATION_NEEDS}, got {tuple(unknown)}."
            )
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise MergeConfigError(f"Method {self.name!r} declares an option twice: {names}.")

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    @property
    def per_input_options(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options if o.per_input)

    def resolve(
        self,
        options: Mapping[str, Any] | None,
        inputs: Sequence[Mapping[str, Any]],
        where: str = "parameters",
        input_where: Callable[[int, str], str] | None = None,
        names: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Validate method-level ``options`` and per-input options; return ``(options, inputs)`` with defaults
        filled (per-input options appear in ``inputs`` only, resolved from the input, else the method level, else
        the default). ``where`` / ``input_where(t, name)`` / ``names`` (option → flag) name fields in errors."""
        names = dict(names or {})
        input_where = input_where or (lambda t, name: f"inputs[{t}].{name}")
        n = len(inputs)
        if n < self.min_inputs or (self.max_inputs is not None and n > self.max_inputs):
            want = (
                f"exactly {self.min_inputs}"
                if self.max_inputs == self.min_inputs
                else f"at least {self.min_inputs}"
                if self.max_inputs is None
                else f"{self.min_inputs} to {self.max_inputs}"
            )
            raise MergeConfigError(f"method {self.name!r} merges {want} input(s); got {n}.")
        options = dict(options or {})
        known = {o.name for o in self.options}
        for key in options:
            if key not in known:
                raise MergeConfigError(
                    f"{names.get(key, f'{where}.{key}')} is not an option of method {self.name!r}; its options: "
                    f"{', '.join(sorted(known)) or 'none'}."
                )
        resolved: dict[str, Any] = {}
        for opt in self.options:
            value = options.get(opt.name, opt.default)
            field_name = names.get(opt.name, f"{where}.{opt.name}")
            if opt.per_input and opt.name not in options:
                resolved[opt.name] = value if value is None else opt.check(value, field_name)
                continue
            resolved[opt.name] = opt.check(value, field_name)
        per: list[dict[str, Any]] = []
        for t, given in enumerate(inputs):
            given = dict(given or {})
            for key in given:
                opt = self.option(key)
                if opt is None or not opt.per_input:
                    allowed = ", ".join(self.per_input_options) or "none"
                    raise MergeConfigError(
                        f"{input_where(t, key)} is not a per-input option of method {self.name!r} "
                        f"(per-input options: {allowed})."
                    )
            row = {}
            for name in self.per_input_options:
                opt = self.option(name)
                if name in given:
                    row[name] = opt.check(given[name], input_where(t, name))
                else:
                    row[name] = resolved[name]
                    if row[name] is None and opt.required:
                        raise MergeConfigError(f"{input_where(t, name)} is required by method {self.name!r}.")
            per.append(row)
        for name in self.per_input_options:
            resolved.pop(name, None)
        if self.check is not None:
            self.check(resolved, per, where)
        return resolved, per


def _load_providers() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for module in PROVIDERS:
        importlib.import_module(module)


def register(method: MergeMethod, replace: bool = False) -> MergeMethod:
    """Add ``method`` to the table (see the module docstring); returns it."""
    if not isinstance(method, MergeMethod):
        raise MergeConfigError(f"register() takes a MergeMethod, got {type(method).__name__}.")
    if method.name in _METHODS and not replace and _METHODS[method.name] is not method:
        raise MergeConfigError(f"A merging method named {method.name!r} is already registered.")
    _METHODS[method.name] = method
    return method


def get_method(name: Any, where: str = "method") -> MergeMethod:
    """The registered method ``name``; :class:`MergeConfigError` naming ``where`` and the known names otherwise."""
    _load_providers()
    if not isinstance(name, str) or name not in _METHODS:
        raise MergeConfigError(f"{where} must be one of {', '.join(method_names())}; got {name!r}.")
    return _METHODS[name]


def method_names(kind: str | None = None) -> list[str]:
    """Registered method names (sorted), optionally of one kind."""
    _load_providers()
    return sorted(n for n, m in _METHODS.items() if kind is None or m.kind == kind)


def methods() -> dict[str, MergeMethod]:
    """name → :class:`MergeMethod` of every registered method."""
    _load_providers()
    return dict(sorted(_METHODS.items()))

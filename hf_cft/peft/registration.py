"""Out-of-tree registration of hf_cft's PEFT method types (the only module that touches PEFT's registry).

PEFT offers no public way to add a method type: ``register_peft_method`` accepts only names already in the
closed ``PeftType`` enum. ``PeftType`` is a ``str`` enum and ``PeftConfig.peft_type`` accepts plain strings, so
hf_cft writes its distinctive type strings (``HF_CFT_*``, which no upstream enum member will take) into the
module-level mapping dictionaries of ``peft.mapping``. After that, ``get_peft_model``, ``save_pretrained``,
``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained``, ``load_adapter``, ``set_adapter`` and
``disable_adapter`` work as for built-in methods.

Those dictionaries are private state, so the supported PEFT minor version is pinned (``peft>=0.21,<0.22``) and
checked here; nothing else in hf_cft imports this module back (``import hf_cft`` has :func:`register` run when
PEFT is imported, see ``hf_cft._after_import``).
"""

from __future__ import annotations

import warnings

from hf_cft.errors import HfCftError

SUPPORTED_PEFT = ((0, 21), (0, 22))  # [min, max)


def _methods():
    from hf_cft.peft.coop import COOP_PEFT_TYPE, CoOpConfig, CoOpModel
    from hf_cft.peft.head import HEAD_PEFT_TYPE, LinearHeadConfig, LinearHeadModel
    from hf_cft.peft.vpt import VPT_PEFT_TYPE, VPTConfig, VPTModel

    return [
        (COOP_PEFT_TYPE, CoOpConfig, CoOpModel, CoOpModel.prefix),
        (VPT_PEFT_TYPE, VPTConfig, VPTModel, VPTModel.prefix),
        (HEAD_PEFT_TYPE, LinearHeadConfig, LinearHeadModel, LinearHeadModel.prefix),
    ]


def _check_version():
    import peft

    from hf_cft.utils import user_stacklevel

    parts = tuple(int(p) for p in peft.__version__.split(".")[:2] if p.isdigit())
    lo, hi = SUPPORTED_PEFT
    if not (lo <= parts < hi):
        warnings.warn(
            f"hf_cft registers its PEFT method types through peft's private mapping dictionaries and was tested "
            f"with peft {lo[0]}.{lo[1]}.x; peft {peft.__version__} is installed and may have changed them.",
            stacklevel=user_stacklevel(),
        )


def _quiet_peft_deprecation() -> None:
    """PEFT 0.21's ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which transformers 5.x
    deprecated in favour of ``is_activation_checkpointing`` (same value): every ``get_peft_model`` /
    ``PeftModel.from_pretrained`` then warns about PEFT's own code, which a user can do nothing about. hf_cft pins
    PEFT 0.21, so it silences exactly that message (nothing else) here."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def register() -> None:
    """Register hf_cft's method types with PEFT. Idempotent; raises if a type string belongs to another class."""
    try:
        from peft import mapping
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise HfCftError("hf_cft's PEFT methods need peft installed") from exc
    _check_version()
    _quiet_peft_deprecation()
    tables = []
    for attr in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"):
        table = getattr(mapping, attr, None)
        if not isinstance(table, dict):
            raise HfCftError(
                f"peft.mapping.{attr} is missing in peft {getattr(__import__('peft'), '__version__', '?')}: "
                "hf_cft cannot register its method types with this PEFT release."
            )
        tables.append(table)
    config_map, tuner_map, prefix_map = tables
    for type_str, config_cls, tuner_cls, prefix in _methods():
        for table, value in ((config_map, config_cls), (tuner_map, tuner_cls), (prefix_map, prefix)):
            current = table.get(type_str)
            if (
                current is not None
                and current != value
                and getattr(current, "__qualname__", None) != getattr(value, "__qualname__", object())
            ):
                raise HfCftError(f"PEFT type {type_str!r} is already registered to {current!r}, not {value!r}.")
            table[type_str] = value


def is_registered() -> bool:
    from peft import mapping

    return all(t in mapping.PEFT_TYPE_TO_CONFIG_MAPPING for t, *_ in _methods())

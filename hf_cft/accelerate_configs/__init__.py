"""The ``accelerate`` config files shipped with hf_cft, installed with the package (``hf_cft/accelerate_configs/``):
a ``pip install`` user names them without a checkout::

    accelerate launch --config_file "$(hf-cft config path fsdp)" recipes/coop.py ...
    python -m hf_cft.accelerate_configs fsdp        # prints the same path; without a name, lists them

=====================  =================================================================================
``single_gpu``          one process (one GPU, or the CPU)
``multi_gpu_ddp``       DDP over the GPUs of one machine
``multi_node_ddp``      DDP over several machines (what changes from one machine is annotated in the file)
``fsdp``                FSDP2 over the GPUs of one machine, one encoder layer per unit, full state dict on save
``deepspeed_zero2``     DeepSpeed ZeRO-2 (needs ``deepspeed``)
``cpu_2proc``           two CPU processes (gloo), with ``ACCELERATE_USE_CPU=1``
=====================  =================================================================================
"""

from __future__ import annotations

from pathlib import Path

from hf_cft.errors import OptionError

FOLDER = Path(__file__).resolve().parent


def description(text: str) -> str:
    """The description a config file opens with: its leading comment lines, joined, up to the first indented one
    (``#   accelerate launch ...``, a table of keys) or the first line that is not a comment; a closing sentence
    that only introduces that indented block (ends with ``:``) is left out."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#") or line.startswith("#  ") or not line.strip("# "):
            break
        lines.append(line.lstrip("#").strip())
    out = " ".join(lines)
    if out.endswith(":"):
        cut = max(out.rfind(". ", 0, len(out) - 1), out.rfind("; ", 0, len(out) - 1))
        out = out[: cut + 1] if cut >= 0 else out
    return out


def available() -> dict[str, str]:
    """``{name: its whole description}`` (:func:`description`) for every shipped config, sorted by name."""
    return {file.stem: description(file.read_text(encoding="utf-8")) for file in sorted(FOLDER.glob("*.yaml"))}


def listing(width: int | None = None) -> str:
    """The text of ``hf-cft config list``: every shipped config's name and its whole description, wrapped to
    ``width`` columns (default: the terminal's, at least 60) under a hanging indent, never cut short."""
    import shutil
    import textwrap

    width = width or max(60, shutil.get_terminal_size((100, 24)).columns)
    names = available()
    pad = max(len(n) for n in names) + 2
    return "\n".join(
        textwrap.fill(
            what,
            width=width,
            initial_indent=name.ljust(pad),
            subsequent_indent=" " * pad,
            break_long_words=False,
            break_on_hyphens=False,
        )
        for name, what in names.items()
    )


def config_path(name: str) -> Path:
    """The path of the shipped config ``name`` (``"fsdp"`` or ``"fsdp.yaml"``); :class:`~hf_cft.errors.OptionError`
    naming the shipped ones for anything else."""
    stem = str(name).removesuffix(".yaml")
    file = FOLDER / f"{stem}.yaml"
    if not stem or "/" in stem or "\\" in stem or not file.is_file():
        raise OptionError(f"no shipped accelerate config {name!r}; shipped: {', '.join(available())}.")
    return file

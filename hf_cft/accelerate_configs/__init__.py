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


def available() -> dict[str, str]:
    """``{name: the file's first comment line}`` for every shipped config, sorted by name."""
    out = {}
    for file in sorted(FOLDER.glob("*.yaml")):
        first = file.read_text(encoding="utf-8").splitlines()[0]
        out[file.stem] = first.lstrip("#").strip()
    return out


def config_path(name: str) -> Path:
    """The path of the shipped config ``name`` (``"fsdp"`` or ``"fsdp.yaml"``); :class:`~hf_cft.errors.OptionError`
    naming the shipped ones for anything else."""
    stem = str(name).removesuffix(".yaml")
    file = FOLDER / f"{stem}.yaml"
    if not stem or "/" in stem or "\\" in stem or not file.is_file():
        raise OptionError(f"no shipped accelerate config {name!r}; shipped: {', '.join(available())}.")
    return file

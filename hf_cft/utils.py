"""Small shared helpers: atomic writes, hf_cft's cache folder."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: readers see old or new, never torn."""
    _atomic_write(Path(path), lambda fh: fh.write(data))


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode("utf-8"))


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save`` written atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def hf_cft_cache_dir(*parts: str) -> Path:
    """hf_cft's cache folder (the demo CLIP, decoded images): ``$HF_CFT_CACHE``, else ``~/.cache/hf_cft``; ``parts``
    are joined below it.

    Example::

        hf_cft_cache_dir("decoded")  # ~/.cache/hf_cft/decoded unless HF_CFT_CACHE is set
    """
    root = os.environ.get("HF_CFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_cft")
    return Path(root).expanduser().joinpath(*parts)

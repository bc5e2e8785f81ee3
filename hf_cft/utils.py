"""Small shared helpers: atomic writes, hf_cft's cache folder, and handing freed memory back to the operating
system."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the user's line that called into the library: the first frame
    outside the outermost hf_cft frame that is neither a decorator's nor an installed package's (a Trainer running
    an hf_cft callback), however deep the warning is raised. Use as ``warnings.warn(msg,
    stacklevel=user_stacklevel())`` in hf_cft code."""
    import sys

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    files, frame = [], sys._getframe(1)
    while frame is not None:
        files.append(os.path.abspath(frame.f_code.co_filename))
        frame = frame.f_back
    # stacklevel 1 is the hf_cft function that calls warnings.warn: the first hf_cft frame (a wrapper around this
    # function, e.g. a trampoline, may lie between)
    caller = next((i for i, f in enumerate(files) if f.startswith(package)), 0)
    files = files[caller:]
    outermost = max((i for i, f in enumerate(files) if f.startswith(package)), default=0)
    level = outermost + 1  # 0-based index of the frame just outside the library
    while level < len(files) - 1 and _not_user_code(files[level]):
        level += 1
    return level + 1


def _not_user_code(file: str) -> bool:
    """A frame between the user and hf_cft: an installed package's (transformers' Trainer running an hf_cft callback,
    torch's ``no_grad`` decorator, a test tool's trampoline) or the standard library's ``contextlib`` decorator."""
    parts = file.split(os.sep)
    return "site-packages" in parts or "dist-packages" in parts or file.endswith(os.sep + "contextlib.py")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; when the block succeeds it is fsynced and moved over ``path`` with
    ``os.replace`` (readers see the old file or the new one, never a torn one), else removed.

    Example::

        with atomic_path("out/model.safetensors") as tmp:
            save_file(tensors, tmp)       # streams to disk; no in-memory copy of the file
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_STAGING_TAG = ".hf-cft-staging-"
_OLD_TAG = ".hf-cft-old-"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def stale_staging(path: str | os.PathLike) -> list[Path]:
    """Leftovers of interrupted :func:`staged_folder` writes to ``path`` (siblings ``.<name>.hf-cft-*``)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefixes = (f".{path.name}{_STAGING_TAG}", f".{path.name}{_OLD_TAG}")
    return [p for p in path.parent.iterdir() if p.name.startswith(prefixes)]


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike, keep: Callable[[str], bool] | None = None):
    """Yield an empty sibling folder to write a whole output into; when the block succeeds it replaces ``path`` in
    one atomic step (``renameat2(RENAME_EXCHANGE)`` on Linux, else two renames) and the old folder is removed;
    when it fails (an error, Ctrl-C) the staging folder is removed and ``path`` is untouched. A process killed at
    any moment leaves the old folder or the new one, never a mix; its staging leftovers are removed by the next
    call. ``keep(name)``: entries of the old folder (top level: files and sub-folders) to carry into the new one;
    a kept file replaces one the block wrote under the same name (a user's README.md over a generated one).

    Example::

        with staged_folder("merged") as tmp:
            model.save_pretrained(tmp)
    """
    import shutil

    path = Path(os.path.abspath(path))  # "." or "out/.." name their folder, not a child of it
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_staging(path):
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}{_STAGING_TAG}", dir=str(path.parent)))
    try:
        # mkdtemp makes a private (0700) folder: give the output the old folder's mode, else the usual one
        os.chmod(stage, path.stat().st_mode & 0o7777 if path.is_dir() else 0o777 & ~_umask())
        yield stage
        if keep is not None and path.is_dir():
            for old in path.iterdir():
                if old.is_symlink() or not keep(old.name):
                    continue
                new = stage / old.name
                if old.is_file() and not new.is_dir():
                    shutil.copy2(old, new)
                elif old.is_dir() and not new.exists():
                    shutil.copytree(old, new, symlinks=True)
        _fsync_tree(stage)
        if path.is_dir() and not path.is_symlink():
            if _exchange(stage, path):
                shutil.rmtree(stage)  # now the old folder
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}{_OLD_TAG}", dir=str(path.parent)))
                os.replace(path, old / "x")
                os.replace(stage, path)
                shutil.rmtree(old)
        else:
            if path.is_symlink() or path.exists():
                path.unlink()
            os.replace(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def save_pretrained_atomic(artefact, save_directory: str | os.PathLike, **kwargs) -> Path:
    """``artefact.save_pretrained(save_directory, **kwargs)`` (a ``PeftModel``, a transformers model, a tokenizer,
    ...) made crash-safe: written into a sibling staging folder and swapped in whole (:func:`staged_folder`), so a
    kill leaves the previous save or the new one, never new weights beside an old config. Markdown files of the
    previous folder (its model card) are kept, over the card ``save_pretrained`` may generate.

    Example::

        save_pretrained_atomic(peft_model, "out/coop")   # adapter_config.json + adapter_model.safetensors
    """
    with staged_folder(save_directory, keep=lambda name: name.endswith(".md")) as stage:
        artefact.save_pretrained(str(stage), **kwargs)
    return Path(save_directory)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings (``.<name>.*.tmp``) that :func:`atomic_path` writes to ``path`` left by a
    killed process; return them. Call it where one process owns ``path`` (the command line's outputs)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.glob(f".{path.name}.*.tmp") if p.is_file() and not p.is_symlink()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def read_json_object(path: str | os.PathLike, error: type[Exception], what: str) -> dict:
    """The JSON object in ``path``; ``error(...)`` naming ``what`` (e.g. "manifest.json of bundle 'x'") when the
    file is missing, is not valid JSON or does not hold an object."""
    file = Path(path)
    if not file.is_file():
        raise error(f"{what}: {str(file)!r} does not exist.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{what}: {str(file)!r} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise error(f"{what}: {str(file)!r} must hold a JSON object, got {type(data).__name__}.")
    return data


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


_LIBC = None


def release_freed_memory() -> None:
    """Hand memory freed by torch back to the operating system (glibc ``malloc_trim``; a no-op elsewhere).

    Tensors below glibc's mmap threshold (which adapts up to 32 MiB) live on the heap, and freed heap memory stays
    resident until trimmed. Long key-by-key loops (ConDU sessions over a full-size model) free thousands of such
    tensors; without a trim the process keeps them as resident memory although nothing uses them."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util
        import sys

        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _LIBC = libc if hasattr(libc, "malloc_trim") else False
            except OSError:
                _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)

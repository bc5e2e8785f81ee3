"""Shared test data builders (importable from tests as ``tests_helpers``)."""

import numpy as np

from hf_cft.data import ImageTransform, apply_image_transform, from_arrays

CLASSES = ["cat", "dog", "sea lion"]


def raw_colour_dataset(n=24, seed=0, size=30, classnames=CLASSES, labels=None):
    """:func:`colour_dataset`'s images before any transform (a raw image dataset); ``labels`` replaces the row labels
    (the images keep the colour of ``i % 3``)."""
    rng = np.random.default_rng(seed)
    colours = [i % 3 for i in range(n)]
    imgs = []
    for lab in colours:
        img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        img[..., lab] += 150
        imgs.append(img)
    return from_arrays(imgs, labels or colours, classnames, ["a photo of a {}."], name="toy")["train"]


def colour_dataset(n=24, seed=0, size=30):
    """Images whose dominant colour channel is the class: learnable in a few steps by any method."""
    return apply_image_transform(raw_colour_dataset(n, seed, size), ImageTransform(size=size, crop_size=size))


def trainer_kwargs(tmp_path, **overrides) -> dict:
    """Small, deterministic CPU settings for Trainer-based tests."""
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=12,
        learning_rate=0.05,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        optim="sgd",
        lr_scheduler_type="constant",
    )
    base.update(overrides)
    return base


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` as module ``recipe_<name>`` (the library's own loader for recipe scripts)."""
    from pathlib import Path

    from hf_cft.recipe_utils import load_sibling_recipe

    return load_sibling_recipe(str(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"), name)


def load_benchmark(name: str, module_name: str | None = None):
    """Import ``benchmarks/<name>.py`` as module ``module_name`` (default ``bench_<name>``), registered in
    ``sys.modules`` before it runs (dataclasses need it) and with ``benchmarks/`` importable (the scripts import each
    other, e.g. crossdata imports b2n, as the harness does)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(module_name or f"bench_{name}", bench / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod

"""Helpers shared by the recipes in ``recipes/``: argument parsing with ``--config file.yaml`` and loading a
CLIP-like model with its tokenizer and image transform from a folder or Hub id."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml


def parse_recipe_args(*dataclass_types, args: list[str] | None = None, defaults: dict | None = None):
    """``HfArgumentParser`` over ``dataclass_types``; ``defaults`` (the recipe's own), then ``--config file.yaml``,
    then explicit command-line flags, each overriding the previous. Returns one instance per dataclass type."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if args is None else args)
    config: dict = {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SystemExit("--config needs a YAML file")
        path = Path(argv[i + 1])
        if not path.is_file():
            raise SystemExit(f"--config: {path} does not exist")
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict):
            raise SystemExit(f"--config: {path} must hold a mapping of argument names to values")
        del argv[i : i + 2]
    parser = HfArgumentParser(dataclass_types)
    if defaults:
        parser.set_defaults(**defaults)
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        raise SystemExit(f"--config: unknown argument(s) {unknown}")
    parser.set_defaults(**config)
    return parser.parse_args_into_dataclasses(args=argv)


def load_clip(name_or_path: str, tokenizer_name_or_path: str | None = None):
    """Load ``(model, tokenizer, transform)`` from a folder or Hub id; the transform comes from the saved image
    processor when there is one, else from the model's image size with CLIP statistics."""
    from transformers import AutoImageProcessor, AutoModel

    from hf_cft.data.transforms import ImageTransform
    from hf_cft.models.clip import check_clip_like
    from hf_cft.models.tokenizer import load_tokenizer

    model = AutoModel.from_pretrained(name_or_path)
    check_clip_like(model)
    tokenizer = load_tokenizer(tokenizer_name_or_path or name_or_path)
    try:
        transform = ImageTransform.from_processor(AutoImageProcessor.from_pretrained(name_or_path))
    except (OSError, ValueError):
        transform = ImageTransform.from_model(model)
    return model.eval(), tokenizer, transform


def demo_clip(prompts: list[str], image_size: int, seed: int = 0, **config_kwargs):
    """A tiny random CLIP with a small BPE tokenizer learned on ``prompts`` (the recipes' offline default)."""
    from hf_cft.models.tokenizer import train_clip_tokenizer
    from hf_cft.testing import tiny_clip

    tokenizer = train_clip_tokenizer(prompts, vocab_size=1024)
    kwargs = dict(patch_size=4, image_size=image_size)
    kwargs.update(config_kwargs)
    model = tiny_clip(
        seed=seed,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    return model, tokenizer


def load_task(name: str, data_dir: str | None = None):
    """A dataset by name/folder/Hub id; ``digits`` is scikit-learn's digits (offline)."""
    from hf_cft.data import load_classification_dataset, load_digits_dataset

    if name == "digits":
        return load_digits_dataset(image_size=16)
    return load_classification_dataset(name, data_dir=data_dir)


def base_novel_task(
    task, shots: int, seed: int, base_to_novel: bool = True, downstream_pool: bool = False, val_shots: int = 0
):
    """Few-shot training data on the base classes and test splits for base and novel classes (CoCoOp protocol).

    Returns ``(train, splits, names)``: ``splits`` maps ``base``/``novel`` (and ``val`` with ``val_shots``) to
    ``(class ids, dataset relabelled from 0)``, ``names`` the class names of each split. Base = the first
    ceil(n/2) class ids; ``downstream_pool`` samples the shots from the 30% downstream pool of the train split.
    """
    from hf_cft.data import base_novel_classes, few_shot_indices, labels_of, select_classes, split_per_class

    train = task["train"]
    if downstream_pool:
        _, train = split_per_class(train, 0.7, seed=0)
    n = task.num_classes
    base_ids, novel_ids = base_novel_classes(n) if base_to_novel else (list(range(n)), [])
    splits = {"base": (base_ids, select_classes(task["test"], base_ids))}
    if novel_ids:
        splits["novel"] = (novel_ids, select_classes(task["test"], novel_ids))
    train = select_classes(train, base_ids)
    if shots:
        idx = few_shot_indices(
            labels_of(train), shots + val_shots, seed=seed, class_names=task.classnames, dataset_name=task.name
        )
        if val_shots:
            import numpy as np

            labels = labels_of(train)[idx]
            val = np.concatenate([idx[labels == c][shots:] for c in np.unique(labels)])
            splits["val"] = (base_ids, train.select(np.sort(val)))
            idx = np.setdiff1d(idx, val)
        train = train.select(idx)
    names = {k: [task.classnames[i] for i in ids] for k, (ids, _) in splits.items()}
    return train, splits, names

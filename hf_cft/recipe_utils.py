"""Helpers shared by the recipes in ``recipes/``: argument parsing with ``--config file.yaml``, loading a
CLIP-like model with its tokenizer and image transform from a folder or Hub id, and the common body of the
continual-learning recipes (``recipes/condu.py``, ``recipes/pam.py``, ``recipes/mtil.py``): stream arguments, task
streams (digits demo, MTIL-mini, real MTIL) and :func:`run_continual_recipe`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
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
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    parser = HfArgumentParser(
        dataclass_types, description=doc or None, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if defaults:
        parser.set_defaults(**defaults)
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        raise SystemExit(f"--config: unknown argument(s) {unknown}")
    parser.set_defaults(**config)
    if "-h" in argv or "--help" in argv:  # listed for --help only: parsing has already consumed it above
        parser.add_argument(
            "--config", metavar="FILE.yaml", help="argument values from a YAML mapping; command-line flags override it"
        )
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as exc:  # e.g. "Some specified arguments are not used by the HfArgumentParser: ['--bogus']"
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def user_errors():
    """Around a recipe's ``main``: a typed hf_cft error (bad dataset name, missing file, bad option) ends in one
    line on stderr and exit status 2, as the ``hf-cft`` commands do; anything else keeps its traceback."""
    from hf_cft.errors import HfCftError

    try:
        yield
    except HfCftError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


#: The project's small pretrained CLIPs (the benchmark harness's designs): design → (pretraining config in
#: ``recipes/configs/``, folder under ``~/.cache/hf_cft``; the model is its ``model/`` subfolder).
PRETRAIN_DESIGNS = {
    "C": ("pretrain_clip_described.yaml", "benchmark-clip-described"),
    "F": ("pretrain_clip_web.yaml", "benchmark-clip-web"),
}
QUICK_PRETRAIN_STEPS = 150  # the harness's --quick model (the configs' own budget is 5,000 steps)


def design_checkpoint(design: str, quick: bool = False) -> Path:
    """Where the model of pretraining ``design`` is kept (``-quick``: the short pretraining of ``--quick`` runs)."""
    if design not in PRETRAIN_DESIGNS:
        raise SystemExit(f"unknown design {design!r}; choose one of {sorted(PRETRAIN_DESIGNS)}")
    folder = PRETRAIN_DESIGNS[design][1] + ("-quick" if quick else "")
    return Path(f"~/.cache/hf_cft/{folder}/model").expanduser()


def pretrain_command(design: str, quick: bool = False) -> str:
    """The command (from the repository root) that pretrains ``design`` into :func:`design_checkpoint`."""
    config = PRETRAIN_DESIGNS[design][0]
    cmd = f"accelerate launch recipes/pretrain_clip.py --config recipes/configs/{config}"
    if quick:
        folder = design_checkpoint(design, quick=True).parent.name
        cmd += f" --max_steps {QUICK_PRETRAIN_STEPS} --output_dir ~/.cache/hf_cft/{folder}"
    return cmd


def resolve_checkpoint(name_or_path: str) -> str:
    """``name_or_path`` ready for ``from_pretrained``: ``~`` expanded; a Hub id as it is. A local path that does not
    exist raises :class:`~hf_cft.errors.MissingCheckpointError` in one line, naming the command that builds it when
    it is one of the project's pretrained CLIPs (:data:`PRETRAIN_DESIGNS`, e.g. the checkpoint of
    ``recipes/configs/condu.yaml``)."""
    from hf_cft.errors import MissingCheckpointError

    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    for design in PRETRAIN_DESIGNS:
        for quick in (False, True):
            if path == design_checkpoint(design, quick) or path == design_checkpoint(design, quick).parent:
                steps = f"{QUICK_PRETRAIN_STEPS} steps" if quick else "5,000 steps, about an hour on a CPU"
                raise MissingCheckpointError(
                    f"checkpoint {text} has not been pretrained yet: build it with "
                    f"`{pretrain_command(design, quick)}` ({steps}), or pass --checkpoint <CLIP folder or Hub id>"
                )
    if text.startswith(("~", "/", ".")) or text.count("/") > 1 or "\\" in text:
        raise MissingCheckpointError(f"checkpoint {text} does not exist (no such folder, and not a Hub repo id)")
    return text


def load_clip(name_or_path: str, tokenizer_name_or_path: str | None = None):
    """Load ``(model, tokenizer, transform)`` from a folder or Hub id; the transform comes from the saved image
    processor when there is one, else from the defaults of the model's family at its image size. A local folder
    that does not exist raises :class:`~hf_cft.errors.MissingCheckpointError` (:func:`resolve_checkpoint`)."""
    from transformers import AutoImageProcessor, AutoModel

    name_or_path = resolve_checkpoint(name_or_path)

    from hf_cft.data.transforms import model_transform
    from hf_cft.models.clip import check_clip_like
    from hf_cft.models.tokenizer import load_tokenizer

    model = AutoModel.from_pretrained(name_or_path)
    check_clip_like(model)
    tokenizer = load_tokenizer(tokenizer_name_or_path or name_or_path)
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        processor = None
    return model.eval(), tokenizer, model_transform(model, processor)


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


def load_sibling_recipe(caller_file: str, name: str):
    """Import ``<folder of caller_file>/<name>.py`` (a recipe script, not a package module) and return it; the
    recipes share helpers this way (e.g. the digits demo CLIP of ``recipes/mergetune.py``)."""
    import importlib.util

    path = Path(caller_file).with_name(f"{name}.py")
    if not path.is_file():
        raise SystemExit(f"recipe {name!r} not found next to {caller_file} ({path})")
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ continual recipes

CONTINUAL_BENCHMARKS = ("digits", "mtil_mini", "mtil")
DIGITS_DEMO_GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
# The digits demo's training budget, shared by the continual recipes (each adds its output_dir and overrides).
CONTINUAL_DEMO_DEFAULTS = {
    "max_steps": 60,
    "learning_rate": 5e-4,
    "per_device_train_batch_size": 32,
    "warmup_steps": 6,
    "eval_batch_size": 256,
    "logging_steps": 20,
    "lora_r": 8,
    "seed": 42,
}


def build_strategies(names, kwargs_for) -> dict:
    """``{name: make_strategy(name, **kwargs_for(name))}`` for a recipe's ``--strategy`` list; an unknown name or a
    bad option exits with the driver's message (no traceback)."""
    from hf_cft.continual import STRATEGIES, make_strategy
    from hf_cft.errors import ContinualError

    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"--strategy: unknown {unknown}; known: {list(STRATEGIES)}")
    try:
        return {name: make_strategy(name, **kwargs_for(name)) for name in names}
    except ContinualError as exc:
        raise SystemExit(str(exc)) from exc


@dataclass
class ContinualStreamArguments:
    """Command-line arguments every continual recipe shares (``recipes/condu.py``, ``pam.py``, ``mtil.py``)."""

    checkpoint: str | None = field(
        default=None, metadata={"help": "Pretrained CLIP folder or Hub id (default: the cached digits demo CLIP)."}
    )
    benchmark: str = field(
        default="auto",
        metadata={
            "help": "'digits' (offline demo), 'mtil_mini' (Protocol B over ../shared/data), 'mtil' (the 11 real MTIL "
            "datasets by Hub id), or 'auto': digits unless a checkpoint, datasets or a data_dir is given, then "
            "mtil_mini."
        },
    )
    order: str = field(default="I", metadata={"help": "Task order: I or II (MTIL-mini or MTIL)."})
    datasets: list[str] | None = field(default=None, metadata={"help": "An explicit task stream (overrides order)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of local datasets (default ../shared/data)."})
    shots: int = field(default=0, metadata={"help": "Images per class for training (0: all; 5: few-shot)."})
    shot_seed: int = field(
        default=0, metadata={"help": "Seed of the few-shot draw (--shots); change it with --seed for repeated runs."}
    )
    max_test: int | None = field(default=None, metadata={"help": "Keep N test rows per dataset (quick runs)."})
    strategy: list[str] = field(
        default_factory=lambda: ["zeroshot", "sequential", "independent"],
        metadata={"help": "Strategies to run, each into output_dir/<name> (any of hf_cft.continual.STRATEGIES)."},
    )
    output_dir: str = field(default="outputs/continual", metadata={"help": "Output folder."})
    demo_pretrain_steps: int = field(default=200, metadata={"help": "Pretraining steps of the digits demo CLIP."})


def continual_benchmark(args) -> str:
    """The benchmark ``args`` asks for (resolving ``"auto"``)."""
    if args.benchmark == "auto":
        return "mtil_mini" if (args.checkpoint or args.datasets or args.data_dir) else "digits"
    if args.benchmark not in CONTINUAL_BENCHMARKS:
        raise SystemExit(f"--benchmark must be auto or one of {CONTINUAL_BENCHMARKS}, got {args.benchmark!r}")
    return args.benchmark


def continual_tasks(args, benchmark: str, mtil_loader=None):
    """``(tasks, stream description)`` of a continual recipe: the digits demo (3 tasks of disjoint classes),
    MTIL-mini (downstream pools of ../shared/data) or the real MTIL stream from the specs (Hub)."""
    from hf_cft.continual import class_split_tasks, mtil_mini_tasks, mtil_tasks

    if benchmark == "digits":
        return class_split_tasks(load_task("digits"), DIGITS_DEMO_GROUPS), "scikit-learn digits (offline)"
    stream = "custom" if args.datasets else f"Order {args.order}"
    shots = f", {args.shots}-shot (draw seed {args.shot_seed})" if args.shots else ""
    if benchmark == "mtil":
        tasks = mtil_tasks(
            args.datasets or args.order,
            shots=args.shots,
            shot_seed=args.shot_seed,
            max_test=args.max_test,
            loader=mtil_loader,
        )
        return tasks, f"MTIL {stream}{shots}"
    tasks = mtil_mini_tasks(
        args.datasets or args.order, args.data_dir, shots=args.shots, shot_seed=args.shot_seed, max_test=args.max_test
    )
    return tasks, f"MTIL-mini {stream}{shots}"


def continual_data_note(benchmark: str, stream: str) -> str:
    if benchmark == "mtil_mini":
        return (
            f"Stream: {stream}. The ../shared/data datasets are small re-encoded subsets, not the official datasets; "
            "numbers are not comparable with published MTIL results."
        )
    if benchmark == "mtil":
        return (
            f"Stream: {stream}, the Hub copies named in hf_cft/data/resources/mtil.json (some splits differ from "
            "ZSCL's; see each spec's notes)."
        )
    return f"Stream: {stream}, classes {DIGITS_DEMO_GROUPS} as three tasks (a demo, not a benchmark)."


def run_continual_recipe(
    args,
    config,
    strategies: dict,
    demo_model=None,
    labels: dict | None = None,
    title: str = "Continual learning",
    mtil_loader=None,
) -> dict:
    """Run ``strategies`` (``{name: Strategy}``, built by the recipe) one after the other on the recipe's stream with
    :class:`~hf_cft.continual.ContinualRunner` into ``output_dir/<name>`` (resumable), write a model card per
    strategy and ``results.{json,md}`` comparing them (ACC (Last) / BWT / Plasticity / Transfer / Average, and the
    sign-misalignment log of the PAM strategies). Returns the summary written to ``results.json``.

    ``demo_model(steps) -> path`` provides the digits demo CLIP when no ``--checkpoint`` is given; ``labels`` maps
    a strategy name to its row label (default: the name, with the fine-tuning mode).
    """
    import platform
    import time

    import torch
    from accelerate import PartialState

    from hf_cft.continual import ContinualRunner, continual_card
    from hf_cft.continual.report import results_markdown, strategy_card_text
    from hf_cft.errors import ContinualError
    from hf_cft.utils import atomic_write_bytes, atomic_write_json

    state = PartialState()
    t_start = time.perf_counter()
    for name, strategy in strategies.items():  # refuse a bad combination before any training
        try:
            strategy.check_config(config)
        except ContinualError as exc:
            raise SystemExit(f"--strategy {name}: {exc}") from exc
    benchmark = continual_benchmark(args)
    checkpoint = None
    if args.checkpoint:
        from hf_cft.errors import MissingCheckpointError

        try:
            checkpoint = resolve_checkpoint(args.checkpoint)
        except MissingCheckpointError as exc:  # one line, before any work
            raise SystemExit(f"error: {exc}") from exc
    if checkpoint is None and demo_model is None:
        raise SystemExit("--checkpoint is required (this recipe has no demo model)")
    model_path = checkpoint or str(demo_model(args.demo_pretrain_steps))
    model, tokenizer, transform = load_clip(model_path)
    n_params = sum(p.numel() for p in model.parameters())
    model_desc = args.checkpoint or (
        f"digits demo CLIP ({n_params:,} parameters, pretrained {args.demo_pretrain_steps} steps on scikit-learn's "
        "digits)"
    )
    device = torch.device("cpu") if config.use_cpu else state.device
    model.to(device)
    if benchmark == "digits" and device.type == "cpu":
        # The demo model's ops are tiny: intra-op threads only add synchronisation (on a shared 2-core machine
        # one thread trained the demo ~20x faster than two).
        torch.set_num_threads(1)
    tasks, stream = continual_tasks(args, benchmark, mtil_loader)
    finetune = "FT" if config.finetune == "full" else "LoRA"
    out = Path(args.output_dir)
    results: dict[str, dict] = {}
    for name, strategy in strategies.items():
        label = (labels or {}).get(name) or (name + (f" ({finetune})" if name != "zeroshot" else ""))
        t0 = time.perf_counter()
        result = ContinualRunner(
            strategy, tasks, model, tokenizer, out / name, config, transform=transform, title=f"{label} — {stream}"
        ).run()
        results[name] = {
            "label": label,
            "metrics": result.metrics,
            "matrix": result.matrix.values.tolist(),
            "history": result.history,
            "seconds": time.perf_counter() - t0,
            "resumed_at": result.resumed_at,  # 0: trained from scratch; T: a finished run re-read
        }
        if state.is_main_process:
            description, files_note = strategy_card_text(name)
            card = continual_card(
                model_name=f"{name}-{benchmark}-{config.finetune}",
                strategy=name,
                base_model=model_desc,
                matrix=result.matrix,
                tasks=[t.describe() for t in tasks],
                hyperparameters={
                    "fine-tuning": config.finetune,
                    "steps per task": config.max_steps,
                    "learning rate": config.learning_rates or config.learning_rate,
                    "batch": config.per_device_train_batch_size,
                    "label smoothing": config.label_smoothing,
                    "seed": config.seed,
                    **({"LoRA rank": config.lora_r} if config.finetune == "lora" else {}),
                    **strategy.settings(),
                },
                description=description,
                files_note=files_note,
                data_note=continual_data_note(benchmark, stream),
            )
            card.save(str(out / name / "README.md"))
    summary = {
        "benchmark": benchmark,
        "stream": stream,
        "tasks": [t.describe() for t in tasks],
        "model": model_desc,
        "config": config.to_dict(),
        "results": results,
        "total_seconds": time.perf_counter() - t_start,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(state.device)},
    }
    if state.is_main_process:
        atomic_write_json(out / "results.json", summary)
        table = results_markdown(results, f"{title} on {stream}", f"Model: {model_desc}.", [t.name for t in tasks])
        atomic_write_bytes(out / "results.md", table.encode("utf-8"))
        print("\n" + table)
        print(f"written to {out}: results.{{json,md}} and one folder per strategy; {summary['total_seconds']:.0f}s")
    return summary

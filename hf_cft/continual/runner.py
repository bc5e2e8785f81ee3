"""``ContinualRunner``: the task-stream driver — learn task t, evaluate every task, checkpoint, repeat — with
exact resume.

For each task t (``docs/methods/condu.md`` §10, "Protocol"): seed everything from (seed, t); ``strategy.learn``;
``strategy.evaluate`` on every task's test split (``learned`` = column ≤ t) → row t of the accuracy matrix; write an
atomic checkpoint (the strategy's state + ``manifest.json`` with the matrix so far, the config, the task list and
the seeds). ``run()`` on a folder holding a checkpoint continues after the last finished task; because every task
is seeded from (seed, t) alone and the strategy state is restored exactly, the resumed run produces the same
matrix and state as an uninterrupted one. A checkpoint written with another config, strategy, task stream or base
model is refused with a :class:`~hf_cft.errors.ContinualError` naming the difference.

Layout of ``output_dir``::

    checkpoint/manifest.json       progress, matrix so far, config, tasks, seeds, per-task timings
    checkpoint/strategy.*          the strategy's state (safetensors + JSON, or e.g. a merger bundle)
    store/                         files a strategy keeps across tasks (expert deltas), and trainer scratch
    accuracy_matrix.{json,md}      the matrix so far (rewritten after every task) and its metrics
    accuracy_matrix.png            the heatmap (at the end)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hf_cft.continual.config import RESULT_NEUTRAL_FIELDS, ContinualConfig, task_seed
from hf_cft.continual.evaluation import DeltaEvaluator
from hf_cft.continual.report import _jsonable, write_matrix_outputs
from hf_cft.continual.strategies import RunContext, Strategy
from hf_cft.continual.tasks import TaskSpec, validate_tasks
from hf_cft.errors import BundleError, ContinualError
from hf_cft.metrics import AccuracyMatrix

logger = logging.getLogger("hf_cft.continual")

FORMAT = "hf_cft.continual/1"
MANIFEST = "manifest.json"


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer of θ⁰ (names, shapes, bytes): a resumed run must start from the same."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(list(model.named_parameters()) + list(model.named_buffers()), key=lambda x: x[0]):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs (all devices) from one seed."""
    from transformers import set_seed

    set_seed(seed)


@dataclass
class ContinualResult:
    """What :meth:`ContinualRunner.run` returns."""

    matrix: AccuracyMatrix
    strategy: str
    output_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    resumed_at: int = 0  # index of the first task this call trained (0: a fresh run)

    @property
    def metrics(self) -> dict[str, float]:
        return self.matrix.metrics()


def _check_expert_cache(folder: str) -> None:
    """Fail before any training when ``ContinualConfig.expert_cache`` is not a folder this process can write (a
    file, a read-only folder or mount): otherwise the first expert would be trained and then lost at its save."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ContinualError(f"ContinualConfig.expert_cache {str(path)!r} is not a writable folder: {exc}") from exc


class ContinualRunner:
    """Drive ``strategy`` over ``tasks`` and fill the accuracy matrix, checkpointing after every task.

    Args:
        strategy: a :class:`~hf_cft.continual.Strategy`.
        tasks: the stream (unique names); see :class:`~hf_cft.continual.TaskSpec`.
        base_model: θ⁰, a ``CLIPModel``-like model; never modified.
        tokenizer: its tokenizer.
        output_dir: where checkpoints and outputs go; a folder with a checkpoint is resumed.
        config: :class:`~hf_cft.continual.ContinualConfig` (defaults: condu.md §6).
        transform: an :class:`~hf_cft.data.ImageTransform` when the tasks hold raw image/label rows (training
            rows get a fresh augmentation seeded per task); ``None`` when they are model-ready already.
        evaluator: replaces the default :class:`~hf_cft.continual.DeltaEvaluator` (any object with its methods).
        resume: with ``False``, an existing checkpoint in ``output_dir`` is an error instead of being continued.
        title: heading of the Markdown table and heatmap.
        plot: write the heatmap PNG at the end (needs matplotlib).

    Example::

        runner = ContinualRunner(IndependentExperts(), tasks, clip, tokenizer, "outputs/independent",
                                 ContinualConfig(max_steps=500), transform=ImageTransform.from_model(clip))
        result = runner.run()
        print(result.metrics)  # transfer / average / last / bwt
    """

    def __init__(
        self,
        strategy: Strategy,
        tasks: Sequence[TaskSpec],
        base_model: nn.Module,
        tokenizer,
        output_dir: str | os.PathLike,
        config: ContinualConfig | None = None,
        transform=None,
        evaluator: DeltaEvaluator | None = None,
        resume: bool = True,
        title: str = "",
        plot: bool = True,
    ):
        if not isinstance(strategy, Strategy):
            raise ContinualError(f"strategy must be a hf_cft.continual.Strategy, got {type(strategy).__name__}")
        self.strategy = strategy
        self.tasks = validate_tasks(tasks)
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir)
        self.config = config or ContinualConfig()
        self.transform = transform
        self.resume = resume
        self.title = title or strategy.name
        self.plot = plot
        self.evaluator = evaluator or DeltaEvaluator(
            base_model,
            tokenizer,
            batch_size=self.config.eval_batch_size,
            num_workers=self.config.dataloader_num_workers,
            progress=self.config.progress,
        )
        self._test_ready: list[TaskSpec] | None = None

    # ------------------------------------------------------------------------------------------- tasks

    def _prepare(self, task: TaskSpec, train_seed: int | None) -> TaskSpec:
        """Model-ready copy of ``task``: eval transform on ``test``; with ``train_seed``, a fresh train transform
        (random resized crop if ``config.augment``) seeded with it on ``train``."""
        if self.transform is None:
            return task
        from hf_cft.data.transforms import apply_image_transform

        train = task.train
        if train_seed is not None:
            t = dataclasses.replace(self.transform, train=self.config.augment, seed=train_seed)
            train = apply_image_transform(task.train, t, name=task.name)
        test = apply_image_transform(task.test, dataclasses.replace(self.transform, train=False), name=task.name)
        return TaskSpec(task.name, train, test, task.classnames, task.templates, dict(task.meta))

    @property
    def eval_tasks(self) -> list[TaskSpec]:
        if self._test_ready is None:
            self._test_ready = [self._prepare(t, None) for t in self.tasks]
        return self._test_ready

    # ------------------------------------------------------------------------------------------- manifest

    def _identity(self) -> dict:
        return {
            "format": FORMAT,
            "strategy": self.strategy.name,
            "strategy_settings": _jsonable(self.strategy.settings()),
            "config": self.config.to_dict(),
            "tasks": [{"name": t.name, "fingerprint": t.fingerprint()} for t in self.tasks],
            "base_model": model_fingerprint(self.base_model),
            "transform": self.transform.key() if hasattr(self.transform, "key") else repr(self.transform),
        }

    def _check_identity(self, saved: dict, mine: dict, where: Path) -> None:
        def refuse(what: str) -> None:
            raise ContinualError(
                f"the checkpoint in {where} belongs to another run: {what}. Resume with the same settings, or use a "
                "new output_dir."
            )

        if saved.get("format") != FORMAT:
            refuse(f"format {saved.get('format')!r}, expected {FORMAT!r}")
        if saved["strategy"] != mine["strategy"]:
            refuse(f"strategy {saved['strategy']!r} there, {mine['strategy']!r} here")
        s_set, m_set = saved.get("strategy_settings", {}), mine["strategy_settings"]
        diff = sorted(k for k in set(s_set) | set(m_set) if s_set.get(k) != m_set.get(k))
        if diff:
            refuse(
                "strategy setting(s) " + ", ".join(f"{k}={s_set.get(k)!r} there, {m_set.get(k)!r} here" for k in diff)
            )
        s_cfg, m_cfg = saved["config"], mine["config"]
        diff = sorted(
            k for k in set(s_cfg) | set(m_cfg) if k not in RESULT_NEUTRAL_FIELDS and s_cfg.get(k) != m_cfg.get(k)
        )
        if diff:
            refuse("config " + ", ".join(f"{k}={s_cfg.get(k)!r} there, {m_cfg.get(k)!r} here" for k in diff))
        s_names = [t["name"] for t in saved["tasks"]]
        m_names = [t["name"] for t in mine["tasks"]]
        if s_names != m_names:
            refuse(f"task stream {s_names} there, {m_names} here")
        for s, m in zip(saved["tasks"], mine["tasks"]):
            if s["fingerprint"] != m["fingerprint"]:
                refuse(f"task {s['name']!r} has other data, classes or templates")
        if saved["base_model"] != mine["base_model"]:
            refuse("the base model's weights differ")
        if saved.get("transform") != mine["transform"]:
            refuse(f"image transform {saved.get('transform')} there, {mine['transform']} here")

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoint"

    def _find_checkpoint(self) -> Path | None:
        for d in (self.checkpoint_dir, self.output_dir / "checkpoint.old"):  # .old: a crash between two renames
            if (d / MANIFEST).is_file():
                return d
        return None

    def _write_checkpoint(self, manifest: dict) -> Path:
        """Strategy state + manifest into a fresh folder, then swapped in by renames: a crash leaves the previous
        checkpoint or the new one, never a torn one."""
        from hf_cft.utils import atomic_write_json

        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=self.output_dir))
        try:
            self.strategy.save_checkpoint(tmp)
            atomic_write_json(tmp / MANIFEST, manifest)  # the manifest last: its presence marks a whole checkpoint
            old = self.output_dir / "checkpoint.old"
            if old.exists():
                shutil.rmtree(old)
            if self.checkpoint_dir.exists():
                os.replace(self.checkpoint_dir, old)
            os.replace(tmp, self.checkpoint_dir)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.checkpoint_dir

    # ------------------------------------------------------------------------------------------- run

    def run(self) -> ContinualResult:
        """Train and evaluate the remaining tasks; return the matrix and the output files."""
        from accelerate import PartialState

        state = PartialState()
        names = [t.name for t in self.tasks]
        T = len(self.tasks)
        identity = self._identity()
        if self.config.expert_cache:
            _check_expert_cache(self.config.expert_cache)
        workdir = self.output_dir / "store"
        context = RunContext(
            self.base_model,
            self.tokenizer,
            self.config,
            self.evaluator,
            self.tasks,
            workdir,
            expert_identity={k: identity[k] for k in ("base_model", "transform", "tasks")},
        )
        self.strategy.bind(context)
        for stale in self.output_dir.glob(".checkpoint-*") if state.is_main_process else ():
            shutil.rmtree(stale, ignore_errors=True)  # torn temporaries of an interrupted write

        matrix = AccuracyMatrix(names)
        history: list[dict] = []
        start = 0
        found = self._find_checkpoint()
        if found is not None:
            if not self.resume:
                raise ContinualError(f"{self.output_dir} already holds a checkpoint and resume=False")
            try:
                saved = json.loads((found / MANIFEST).read_text())
            except json.JSONDecodeError as exc:
                raise BundleError(f"{found / MANIFEST} is not valid JSON: {exc}") from exc
            if not isinstance(saved, dict):
                raise ContinualError(f"{found / MANIFEST} must hold a JSON object.")
            self._check_identity(saved, identity, found)
            start = saved.get("completed")
            if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start <= T:
                raise ContinualError(
                    f"{found / MANIFEST}: 'completed' must be the number of finished tasks, 1..{T}, got {start!r}; "
                    "the checkpoint is corrupt (remove it to start over)."
                )
            values = [[float("nan") if v is None else v for v in row] for row in saved["matrix"]]
            matrix = AccuracyMatrix(names, values)
            history = list(saved.get("history", []))
            self.strategy.load_checkpoint(found)
            logger.info(
                "resuming %s in %s after task %d/%d (%s)", self.strategy.name, found, start, T, names[start - 1]
            )

        for t in range(start, T):
            task = self.tasks[t]
            seed = task_seed(self.config.seed, t)
            logger.info("[%s] task %d/%d %r: learning (seed %d)", self.strategy.name, t + 1, T, task.name, seed)
            seed_everything(seed)
            t0 = time.perf_counter()
            self.strategy.learn(self._prepare(task, seed), t)
            learn_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            row = [self.strategy.evaluate(self.eval_tasks[j], learned=j <= t) for j in range(T)]
            eval_s = time.perf_counter() - t0
            matrix.set_row(t, row)
            history.append(
                {
                    "task": task.name,
                    "index": t,
                    "seed": seed,
                    "learn_s": learn_s,
                    "eval_s": eval_s,
                    **{k: float(v) for k, v in self.strategy.timings.items()},
                    **{k: float(v) for k, v in getattr(self.strategy, "task_metrics", {}).items()},
                }
            )
            logger.info(
                "[%s] after %r (learn %.1fs, eval %.1fs): %s",
                self.strategy.name,
                task.name,
                learn_s,
                eval_s,
                ", ".join(f"{n} {v:.1f}" for n, v in zip(names, row)),
            )
            if state.is_main_process:
                manifest = {
                    **identity,
                    "completed": t + 1,
                    "matrix": _jsonable(matrix.values.tolist()),
                    "seeds": {
                        "seed": self.config.seed,
                        "task_seeds": [task_seed(self.config.seed, i) for i in range(T)],
                    },
                    "history": history,
                    "versions": _versions(),
                }
                self._write_checkpoint(manifest)
                write_matrix_outputs(self.output_dir, matrix, self.strategy.name, self.title, plot=False)
            state.wait_for_everyone()

        files = {}
        if state.is_main_process:
            files = write_matrix_outputs(
                self.output_dir,
                matrix,
                self.strategy.name,
                self.title,
                extra={
                    "config": self.config.to_dict(),
                    "strategy_settings": self.strategy.settings(),
                    "tasks": [t.describe() for t in self.tasks],
                    "history": history,
                },
                plot=self.plot,
            )
        if matrix.complete:
            m = matrix.metrics()
            logger.info(
                "[%s] done: Transfer %.2f, Average %.2f, Last %.2f, BWT %.2f",
                self.strategy.name,
                *(m[k] for k in ("transfer", "average", "last", "bwt")),
            )
        return ContinualResult(matrix, self.strategy.name, self.output_dir, files, history, resumed_at=start)


def _versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    with contextlib.suppress(ImportError):
        import peft

        out["peft"] = peft.__version__
    return out

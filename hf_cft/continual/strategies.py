"""Continual-learning strategies: what is learned from each task and which model answers each evaluation.

A :class:`Strategy` is driven by :class:`~hf_cft.continual.ContinualRunner`: ``bind(context)`` once, then per task
``learn(task, index)`` and ``evaluate(other_task, learned=...)`` for every task of the stream; between tasks the
runner checkpoints it with ``save_checkpoint(dir)`` / ``load_checkpoint(dir)`` (by default ``state_dict()``'s
tensors as safetensors plus its JSON metadata). Implemented:

| strategy | learns | evaluates task j after task t |
|---|---|---|
| :class:`ZeroShotStrategy` | nothing | θ⁰ |
| :class:`SequentialFineTuning` | each task from the *previous* model | the current model, every j |
| :class:`IndependentExperts` | one expert per task from θ⁰ (on disk) | expert j if learned (task id known), else θ⁰ |
| :class:`DeltaMergeStrategy` | experts from θ⁰ (or a sequential chain), merged by a function or a stateful merger | θ⁰ + merged delta, every j |
| :class:`ConDUStrategy` | experts from θ⁰, unified by ``DeltaFusionMerger`` | ``docs/methods/condu.md`` §7 table |

Every expert is trained from θ⁰ except in sequential fine-tuning (condu.md §2.1) and in merges of a sequential
chain (MagMax, WiSE-FT of the sequential model); all weights are handled as dense deltas from θ⁰ and evaluated
through ``functional_call`` (no model copy). The merging baselines (``hf_cft.continual.baseline_strategies``) and
PAM (``hf_cft.continual.pam_strategy``) register themselves in :data:`STRATEGIES` through
:func:`register_strategy`; :func:`make_strategy` builds any of them by name.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hf_cft.continual.config import ContinualConfig, task_seed
from hf_cft.continual.evaluation import DeltaEvaluator
from hf_cft.continual.tasks import TaskSpec
from hf_cft.continual.weights import Delta, DeltaStore, check_finite
from hf_cft.errors import BundleError, ContinualError, HfCftError

logger = logging.getLogger("hf_cft.continual")

START_FROM = ("theta0", "previous")
STATE_TENSORS = "strategy.safetensors"
STATE_META = "strategy.json"
EXPERT_CACHE_FORMAT = "hf_cft.expert-cache/1"


@dataclass
class RunContext:
    """What a strategy may use: θ⁰ (never modified), its tokenizer, the run's config and evaluator, the whole task
    stream, and ``workdir``, a folder the strategy owns for files that outlive one task (expert deltas)."""

    base_model: nn.Module
    tokenizer: object
    config: ContinualConfig
    evaluator: DeltaEvaluator
    tasks: list[TaskSpec]
    workdir: Path
    # What identifies an expert beyond the config (θ⁰'s fingerprint, the image transform, each task's data
    # fingerprint by name); set by the runner, used to key ``config.expert_cache``.
    expert_identity: dict | None = None


class Strategy:
    """Base class of continual strategies (see the module docstring for the protocol).

    Subclasses implement :meth:`learn` and :meth:`evaluate`, and :meth:`state_dict` / :meth:`load_state_dict`
    (tensors that safetensors can store + JSON-able metadata) or override :meth:`save_checkpoint` /
    :meth:`load_checkpoint`. :meth:`settings` returns the JSON-able options that change results; a run resumed
    with other settings is refused.

    Example (a strategy that keeps θ⁰ but logs what it sees)::

        class Watcher(Strategy):
            name = "watcher"
            def learn(self, task, index):
                print("learning", task.name)
            def evaluate(self, task, learned):
                return self.ctx.evaluator.accuracy(task)
    """

    @property
    def store(self) -> DeltaStore:
        """Where the strategies that keep expert deltas on disk keep them (``<workdir>/experts``)."""
        return DeltaStore(self.context.workdir / "experts")

    name = "strategy"

    def __init__(self):
        self.ctx: RunContext | None = None
        self.timings: dict[str, float] = {}
        # Per-task scalar diagnostics of the last learn() (e.g. PAM's misalignment rate); the runner records them
        # in the run's history next to the timings.
        self.task_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ protocol

    def check_config(self, config: ContinualConfig) -> None:
        """Raise :class:`~hf_cft.errors.ContinualError` if the strategy cannot run with ``config`` (called by
        :meth:`bind`, i.e. before any training; recipes may call it up front for every strategy)."""

    def bind(self, context: RunContext) -> None:
        self.check_config(context.config)
        self.ctx = context

    def learn(self, task: TaskSpec, index: int) -> None:
        raise NotImplementedError

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
        if tensors or metadata:
            raise ContinualError(f"strategy {self.name!r} keeps no state, but the checkpoint holds some")

    def save_checkpoint(self, directory: Path) -> None:
        from hf_cft.utils import atomic_save_safetensors, atomic_write_json

        tensors, meta = self.state_dict()
        atomic_save_safetensors(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, directory / STATE_TENSORS
        )
        atomic_write_json(directory / STATE_META, meta)

    def load_checkpoint(self, directory: Path) -> None:
        from safetensors.torch import load_file

        for f in (STATE_TENSORS, STATE_META):
            if not (directory / f).is_file():
                raise BundleError(f"checkpoint {directory} of strategy {self.name!r} lacks {f}")
        self.load_state_dict(
            load_file(str(directory / STATE_TENSORS)), json.loads((directory / STATE_META).read_text())
        )

    # ------------------------------------------------------------------ helpers

    @property
    def context(self) -> RunContext:
        if self.ctx is None:
            raise ContinualError(f"strategy {self.name!r} is not bound to a run (ContinualRunner binds it)")
        return self.ctx

    def train_expert(
        self, task: TaskSpec, index: int, start: Delta | None = None, factors_reference: nn.Module | None = None
    ) -> Delta:
        """Train on ``task`` from θ⁰ (+ ``start``) with the run's config and the task's seed; time it, and keep its
        last logged training loss in :attr:`task_metrics` (``train_loss``, recorded in the run's history).
        ``factors_reference``: return LoRA factor deltas (:func:`~hf_cft.continual.training.train_expert`)."""
        from hf_cft.continual.training import train_expert

        ctx = self.context
        t0 = time.perf_counter()
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        self.task_metrics = {}  # this task's: the last logged training loss, then whatever learn() adds
        cached = self._expert_cache_entry(task, index, start, factors_reference)
        reused = _read_cached_expert(*cached, task) if cached is not None and cached[1] in cached[0] else None
        if reused is not None:
            delta, meta = reused
            self.task_metrics.update({k: float(v) for k, v in meta.items() if k == "train_loss"})
            self.task_metrics["expert_cache_hit"] = 1.0
            logger.info("[%s] task %r: expert reused from %s", self.name, task.name, cached[0].path(cached[1]))
            self.timings["train_s"] = time.perf_counter() - t0
            return delta
        with tempfile.TemporaryDirectory(prefix=f"train-{index:03d}-", dir=ctx.workdir) as scratch:
            delta = train_expert(
                ctx.base_model,
                ctx.tokenizer,
                task,
                ctx.config,
                seed=task_seed(ctx.config.seed, index),
                index=index,
                output_dir=scratch,
                start=start,
                metrics=self.task_metrics,
                factors_reference=factors_reference,
            )
        if cached is not None:
            meta = {"task": task.name}
            if "train_loss" in self.task_metrics:
                meta["train_loss"] = repr(float(self.task_metrics["train_loss"]))
            save_expert(cached[0], cached[1], delta, meta)
        self.timings["train_s"] = time.perf_counter() - t0
        return delta

    def _expert_cache_entry(
        self, task: TaskSpec, index: int, start: Delta | None, factors_reference: nn.Module | None
    ) -> tuple[DeltaStore, str] | None:
        """``(store, key)`` of this expert in ``config.expert_cache``, or ``None`` when there is no cache or the
        expert does not start from θ⁰ (a chain's expert depends on the strategy's own history). The key hashes
        everything that decides the trained weights: every result-changing config field, θ⁰, the transform, the
        task's name and data fingerprint, its position (seed, learning rate) and the delta's form (dense or LoRA
        factors)."""
        ctx = self.context
        if not ctx.config.expert_cache or start or ctx.expert_identity is None:
            return None
        from hf_cft.continual.config import RESULT_NEUTRAL_FIELDS

        ident = ctx.expert_identity
        fingerprints = {t["name"]: t["fingerprint"] for t in ident["tasks"]}
        if task.name not in fingerprints:
            return None
        record = {
            "format": EXPERT_CACHE_FORMAT,
            "config": {k: v for k, v in ctx.config.to_dict().items() if k not in RESULT_NEUTRAL_FIELDS},
            "base_model": ident["base_model"],
            "transform": ident["transform"],
            "task": [task.name, fingerprints[task.name]],
            "index": index,
            "seed": task_seed(ctx.config.seed, index),
            "factors": factors_reference is not None,
        }
        digest = hashlib.blake2b(json.dumps(record, sort_keys=True, default=str).encode(), digest_size=16)
        return DeltaStore(Path(ctx.config.expert_cache).expanduser()), f"{task.name}-{digest.hexdigest()}"


def _read_cached_expert(store: DeltaStore, key: str, task: TaskSpec) -> tuple[Delta, dict[str, str]] | None:
    """The expert ``key`` of the expert cache and its metadata, or ``None`` (with a warning naming the file) when
    the entry cannot be used: torn or foreign (not readable safetensors), NaN/inf, or saved for another task. The
    caller then trains the expert again and :func:`save_expert` replaces the entry atomically."""
    try:
        delta, meta = store.load_with_metadata(key)
        check_finite(delta, f"expert cache entry {store.path(key)}")
        if meta.get("task") != task.name:
            raise BundleError(f"it was saved for task {meta.get('task')!r}, not {task.name!r}")
    except HfCftError as exc:
        logger.warning("expert cache entry %s is unusable (%s): training the expert again", store.path(key), exc)
        return None
    return delta, meta


def save_expert(store: DeltaStore, key: str, delta: Delta, metadata: dict[str, str] | None = None) -> None:
    """``store.save(key, delta, metadata)`` in a run of one or more processes (``accelerate launch``): every process
    trained the same expert (DDP keeps the replicas equal), so the main process writes it and every process waits
    until it is on disk before anyone reads it back. Every process must call this."""
    from accelerate import PartialState

    check_finite(delta, f"expert {key!r}")  # on every process: all raise, none is left waiting at the barrier
    state = PartialState()
    if state.is_main_process:
        store.save(key, delta, metadata)
    state.wait_for_everyone()


class ZeroShotStrategy(Strategy):
    """θ⁰ throughout: the zero-shot row of the tables (every row identical)."""

    name = "zeroshot"

    def learn(self, task: TaskSpec, index: int) -> None:
        self.timings = {}

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        return self.context.evaluator.accuracy(task)


class SequentialFineTuning(Strategy):
    """Continual fine-tuning: task t trains from the model left by task t−1 (θ⁰ for the first); after each task
    that one model answers every dataset. The delta u = θ − θ⁰ is the state."""

    name = "sequential"

    def __init__(self):
        super().__init__()
        self.delta: Delta = {}
        self.learned: list[str] = []

    def learn(self, task: TaskSpec, index: int) -> None:
        self.timings = {}
        self.delta = self.train_expert(task, index, start=self.delta or None)
        self.learned.append(task.name)

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        return self.context.evaluator.accuracy(task, self.delta or None)

    def state_dict(self):
        return dict(self.delta), {"learned": list(self.learned)}

    def load_state_dict(self, tensors, metadata):
        self.delta = {k: v.float() for k, v in tensors.items()}
        self.learned = list(metadata.get("learned", []))


class IndependentExperts(Strategy):
    """One expert per task, trained from θ⁰ and kept on disk (``workdir/experts``); with the task id known, task j is
    answered by its own expert once learned and by θ⁰ before (the upper bound with task id of Protocol B)."""

    name = "independent"

    def __init__(self):
        super().__init__()
        self.experts: dict[str, str] = {}  # task name -> store key
        self._accuracy: dict[str, float] = {}  # an expert never changes: its accuracy is computed once

    def learn(self, task: TaskSpec, index: int) -> None:
        self.timings = {}
        delta = self.train_expert(task, index)
        key = f"{index:03d}"
        save_expert(self.store, key, delta, {"task": task.name})
        self.experts[task.name] = key

    def expert_delta(self, name: str) -> Delta:
        if name not in self.experts:
            raise ContinualError(f"no expert for task {name!r}; learned: {list(self.experts)}")
        return self.store.load(self.experts[name])

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        ev = self.context.evaluator
        if not learned or task.name not in self.experts:
            return ev.accuracy(task)
        if task.name not in self._accuracy:
            self._accuracy[task.name] = ev.accuracy(task, self.expert_delta(task.name))
        return self._accuracy[task.name]

    def state_dict(self):
        return {}, {"experts": dict(self.experts)}

    def load_state_dict(self, tensors, metadata):
        self.experts = dict(metadata.get("experts", {}))
        self._accuracy = {}
        missing = [n for n, k in self.experts.items() if k not in self.store]
        if missing:
            raise BundleError(f"expert deltas of task(s) {missing} are missing from {self.store.directory}")


class DeltaMergeStrategy(Strategy):
    """Experts kept on disk, merged into one delta after each task; θ⁰ + merged answers every dataset. The merge is
    either

    - a one-shot function ``merge_fn(list_of_deltas) -> delta`` over all experts so far (task arithmetic, TIES,
      one-shot EMR...), re-run after each task; or
    - a stateful merger from ``merger_factory()`` with ``.add(delta) -> merged_delta`` (MagMax, OPCM...); on resume
      its state is rebuilt by replaying ``add`` over the stored experts in order.

    ``start_from`` says where each expert's training starts: ``"theta0"`` (default: independent experts from θ⁰,
    condu.md §2.1) or ``"previous"``: a sequential fine-tuning chain, θ_t starts from θ_{t−1} (the previous
    *expert*, never the merged model) so that τ_t = θ_t − θ⁰ is cumulative, as MagMax assumes (pam.md §9). On
    resume the chain continues from the last stored expert.

    Example::

        def task_arithmetic(deltas, lam=0.3):
            return {k: lam * sum(d[k] for d in deltas) for k in deltas[0]}

        ta = DeltaMergeStrategy.from_function("task_arithmetic", task_arithmetic, lam=0.3)
        magmax = DeltaMergeStrategy.from_merger("magmax", MagMaxMerger)  # MagMaxMerger().add(delta) -> merged
    """

    def __init__(
        self,
        name: str,
        merge_fn: Callable[[list[Delta]], Delta] | None = None,
        merger_factory: Callable[[], object] | None = None,
        settings: dict | None = None,
        start_from: str = "theta0",
    ):
        super().__init__()
        if (merge_fn is None) == (merger_factory is None):
            raise ContinualError(f"DeltaMergeStrategy {name!r}: give exactly one of merge_fn and merger_factory")
        if start_from not in START_FROM:
            raise ContinualError(
                f"DeltaMergeStrategy {name!r}: start_from must be one of {START_FROM}, got {start_from!r}"
            )
        self.name = name
        self.start_from = start_from
        self.merge_fn = merge_fn
        self.merger_factory = merger_factory
        self._settings = dict(settings or {})
        self.merger = merger_factory() if merger_factory is not None else None
        self.experts: list[str] = []  # store keys in learning order
        self.merged: Delta = {}

    @classmethod
    def from_function(
        cls, name: str, merge_fn: Callable[[list[Delta]], Delta], start_from: str = "theta0", **settings
    ) -> DeltaMergeStrategy:
        return cls(name, merge_fn=merge_fn, settings=settings, start_from=start_from)

    @classmethod
    def from_merger(
        cls, name: str, merger_factory: Callable[[], object], start_from: str = "theta0", **settings
    ) -> DeltaMergeStrategy:
        return cls(name, merger_factory=merger_factory, settings=settings, start_from=start_from)

    def settings(self) -> dict:
        out = {"merge": "function" if self.merge_fn is not None else "stateful", **self._settings}
        if self.start_from != "theta0":  # absent by default, so checkpoints of earlier versions still resume
            out["start_from"] = self.start_from
        return out

    def training_start(self) -> Delta | None:
        """Where the next expert starts: θ⁰ (``None``), or the last expert of a sequential chain."""
        if self.start_from == "theta0" or not self.experts:
            return None
        return {k: v.float() for k, v in self.store.load(self.experts[-1]).items()}

    def learn(self, task: TaskSpec, index: int) -> None:
        self.timings = {}
        delta = self.train_expert(task, index, start=self.training_start())
        key = f"{index:03d}"
        save_expert(self.store, key, delta, {"task": task.name})
        self.experts.append(key)
        t0 = time.perf_counter()
        if self.merge_fn is not None:
            del delta  # one-shot merges read every expert back from disk
            merged = self.merge_fn([self.store.load(k) for k in self.experts])
        else:
            merged = self.merger.add(delta)
        check_finite(merged, f"the {self.name} merge after task {task.name!r}")
        self.merged = {k: v.detach().float().cpu() for k, v in merged.items()}
        self.timings["merge_s"] = time.perf_counter() - t0

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        return self.context.evaluator.accuracy(task, self.merged or None)

    def state_dict(self):
        return dict(self.merged), {"experts": list(self.experts)}

    def load_state_dict(self, tensors, metadata):
        self.experts = list(metadata.get("experts", []))
        self.merged = {k: v.float() for k, v in tensors.items()}
        if self.merger_factory is not None:  # rebuild the stateful merger's state
            self.merger = self.merger_factory()
            for k in self.experts:
                self.merger.add(self.store.load(k))


class ConDUStrategy(Strategy):
    """ConDU (``docs/methods/condu.md``): each task trains an expert from θ⁰; its delta joins the
    ``DeltaFusionMerger`` (decouple every stored expert, add the new delta, re-unify; §2) together with the task's
    prototypes computed with θ⁰ (§7); the delta is then dropped.

    Evaluation (§7 table): a learned task with known id → the single rebuilt expert θ⁰ + δ̃^i with the dataset's own
    head; a task not learned yet (Transfer entries), or every task with ``task_agnostic=True`` → the
    ``SemanticRouter`` aggregation over θ⁰ and the top-K routed experts; nothing learned yet → θ⁰.

    The merger, router and prototype function default to ``hf_cft.merging``'s ``DeltaFusionMerger``,
    ``SemanticRouter`` and ``compute_prototypes``; pass factories to use others with the same contract.

    ``lora_merge`` (with ``finetune="lora"``): ``"dense"`` (default, the project rule: every expert reaches the
    merger as s·B@A per adapted linear) or ``"factors"``, the released ConDU (LoRA) (condu.md §5): each expert
    reaches the merger as its factor deltas A − A⁰ and B − B⁰ (B⁰ = 0, A⁰ the run's fixed seed), A and B are
    unified as tensors of their own with one λ per task, and a rebuilt expert is θ⁰ + s·(λM_B⊙u_B)(A⁰ + λM_A⊙u_A),
    run on θ⁰ as its dense delta (:func:`hf_cft.merging.dense_delta_from_factors`); routing runs on the reference
    ``PeftModel`` (θ⁰ + the initial adapter, held once per run). ``rescaler_groups``: see
    :class:`hf_cft.merging.DeltaFusionMergerConfig` (``"openai"`` gives the released λ for full fine-tuning).
    ``merge_device``: where the merger's sessions compute (``"cuda"``: on the GPU, equal to the CPU's up to float
    rounding; default the CPU, condu.md §3 "Device"); a runtime choice, so a run may resume with another.

    Example::

        runner = ContinualRunner(ConDUStrategy(top_k=4), tasks, clip, tokenizer, "outputs/condu")
    """

    name = "condu"

    def __init__(
        self,
        top_k: int = 4,
        weighting: str = "uniform",
        include_zero_shot: bool = True,
        task_agnostic: bool = False,
        rescaler: str = "mean",
        lora_merge: str = "dense",
        track_fidelity: bool = False,
        rescaler_groups: str = "tensor",
        merger_factory: Callable[[], object] | None = None,
        merger_loader: Callable[[Path], object] | None = None,
        router_factory: Callable[..., object] | None = None,
        prototype_fn: Callable[..., torch.Tensor] | None = None,
        merge_device: str | None = None,
    ):
        super().__init__()
        if top_k < 1:
            raise ContinualError(f"ConDUStrategy: top_k must be ≥ 1, got {top_k}")
        if merge_device is not None:  # refused by name now rather than at the first session
            from hf_cft.merging.condu import compute_device

            compute_device(merge_device)
        self.merge_device = merge_device
        check_choice("condu", "lora_merge", lora_merge, ("dense", "factors"))
        check_choice("condu", "rescaler_groups", rescaler_groups, ("tensor", "openai"))
        self.top_k, self.weighting, self.include_zero_shot = top_k, weighting, include_zero_shot
        self.task_agnostic, self.rescaler, self.lora_merge = task_agnostic, rescaler, lora_merge
        self.rescaler_groups = rescaler_groups
        self._reference: nn.Module | None = None  # lora_merge="factors": θ⁰ + the initial adapter
        self.track_fidelity = bool(track_fidelity)
        self._merger_factory = merger_factory
        self._merger_loader = merger_loader
        self._router_factory = router_factory
        self._prototype_fn = prototype_fn
        self.merger = None
        self._router = None

    def settings(self) -> dict:
        return {
            "top_k": self.top_k,
            "weighting": self.weighting,
            "include_zero_shot": self.include_zero_shot,
            "task_agnostic": self.task_agnostic,
            "rescaler": self.rescaler,
            "lora_merge": self.lora_merge,
            # absent by default, so that checkpoints of earlier versions still resume
            **({"rescaler_groups": self.rescaler_groups} if self.rescaler_groups != "tensor" else {}),
        }

    def check_config(self, config: ContinualConfig) -> None:
        if self.lora_merge == "factors" and config.finetune != "lora":
            raise ContinualError(
                f"ConDUStrategy(lora_merge='factors') unifies LoRA factors: it needs finetune='lora', got "
                f"{config.finetune!r}"
            )

    def reference_model(self) -> nn.Module:
        """``lora_merge="factors"``: the ``PeftModel`` holding θ⁰ and the initial adapter every expert starts from
        (built once, frozen); the model factor deltas are taken against and routing runs on."""
        if self._reference is None:
            from hf_cft.continual.training import build_training_model

            ctx = self.context
            self._reference = build_training_model(ctx.base_model, ctx.config).eval()
            for p in self._reference.parameters():
                p.requires_grad_(False)
        return self._reference

    @property
    def _merge_base(self) -> nn.Module:
        """The model the merger's deltas are taken from: θ⁰, or the factor reference."""
        return self.reference_model() if self.lora_merge == "factors" else self.context.base_model

    # -------------------------------------------------------------- the hf_cft.merging contract

    @staticmethod
    def _merging(name: str):
        try:
            import hf_cft.merging as merging

            return getattr(merging, name)
        except (ImportError, AttributeError) as exc:
            raise ContinualError(
                f"ConDUStrategy needs hf_cft.merging.{name}, which this installation lacks ({exc}); "
                "pass a factory with the same contract instead"
            ) from exc

    def new_merger(self):
        if self._merger_factory is not None:
            return self._merger_factory()
        cls = self._merging("DeltaFusionMerger")
        return cls(
            rescaler=self.rescaler,
            lora_merge=self.lora_merge,
            rescaler_groups=self.rescaler_groups,
            strict=False,
            base_model=self._merge_base,
            device=self.merge_device,
        )

    def load_merger(self, directory: Path):
        if self._merger_loader is not None:
            return self._merger_loader(directory)
        return self._merging("DeltaFusionMerger").from_pretrained(
            directory, base_model=self._merge_base, device=self.merge_device
        )

    def prototypes(self, task: TaskSpec) -> torch.Tensor:
        """P^t with θ⁰ over one pass of the task's training rows through the train transform (§7): the function
        gets a ``DataLoader`` of ``pixel_values``/``labels`` batches."""
        ctx = self.context
        fn = self._prototype_fn or self._merging("compute_prototypes")
        return fn(ctx.base_model, ctx.tokenizer, ctx.evaluator.loader(task.train), task.classnames, task.templates)

    def router(self):
        if self._router is None:
            ctx = self.context
            factory = self._router_factory or self._merging("SemanticRouter")
            self._router = factory(
                self.merger,
                self._merge_base,
                ctx.tokenizer,
                top_k=self.top_k,
                weighting=self.weighting,
                include_zero_shot=self.include_zero_shot,
            )
        return self._router

    # -------------------------------------------------------------- protocol

    def bind(self, context: RunContext) -> None:
        super().bind(context)
        if self.merger is None:
            self.merger = self.new_merger()

    @property
    def learned(self) -> list[str]:
        return list(self.merger.task_names) if self.merger is not None else []

    def learn(self, task: TaskSpec, index: int) -> None:
        self.timings = {}
        factors = self.reference_model() if self.lora_merge == "factors" else None
        delta = self.train_expert(task, index, factors_reference=factors)  # from θ⁰, never from u (§2.1)
        t0 = time.perf_counter()
        protos = self.prototypes(task)  # with θ⁰, on the data trained on (§7, §9)
        self.timings["prototypes_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.merger.add_task(
            delta,
            name=task.name,
            prototypes=protos,
            classnames=list(task.classnames),
            templates=list(task.templates),
            dataset=task.meta.get("source", task.name),
        )
        self.timings["merge_s"] = time.perf_counter() - t0
        if self.track_fidelity:
            save_expert(self._fidelity_store(), f"{index:03d}", delta, {"task": task.name})
            self.task_metrics.update(self.fidelity())
        del delta  # §2.5: θ^t and δ^t are dropped
        self._router = None  # every expert changed: heads cached by the router are stale

    # -------------------------------------------------------------- expert fidelity (benchmark diagnostics)

    def _fidelity_store(self) -> DeltaStore:
        """Where ``track_fidelity`` keeps each original δ^t (a benchmark diagnostic; ConDU itself drops it, §2.5)."""
        return DeltaStore(self.context.workdir / "fidelity")

    def fidelity(self) -> dict[str, float]:
        """For every stored task i, after the current session (docs/benchmarks.md Protocol B plots): the cosine
        between the rebuilt delta δ̃^i = λ^i M^i⊙u and the original δ^i, the relative error ‖δ̃^i − δ^i‖/‖δ^i‖, the
        mask density |M^i|/numel and λ^i; streamed key by key from the originals kept with ``track_fidelity``."""
        from hf_cft.merging import LazyDelta

        out = {}
        for index, name in enumerate(self.learned):
            original = LazyDelta.from_file(self._fidelity_store().path(f"{index:03d}"))
            dot = n_orig = n_rebuilt = n_err = 0.0
            ones = total = 0
            for key, rebuilt in self.merger.iter_expert_delta(name):
                d = original[key].to(rebuilt.device).double()
                r = rebuilt.double()
                dot += float((d * r).sum())
                n_orig += float((d * d).sum())
                n_rebuilt += float((r * r).sum())
                n_err += float(((r - d) ** 2).sum())
                ones += self.merger.packed_mask(name, key).count()
                total += d.numel()
            denom = (n_orig * n_rebuilt) ** 0.5
            out[f"fidelity_cos/{name}"] = dot / denom if denom > 0 else 0.0
            out[f"fidelity_rel_err/{name}"] = (n_err / n_orig) ** 0.5 if n_orig > 0 else 0.0
            out[f"mask_density/{name}"] = ones / total if total else 0.0
            out[f"lambda/{name}"] = float(self.merger.record(name).lam)
        return out

    def expert_weights_delta(self, name: str) -> Delta:
        """The rebuilt expert of task ``name`` as a delta of θ⁰'s weights: δ̃ = λM⊙u, or with
        ``lora_merge="factors"`` the dense s·B̃Ã − s·B⁰A⁰ of its rebuilt factors."""
        delta = self.merger.expert_delta(name)
        if self.lora_merge != "factors":
            return delta
        from hf_cft.merging import dense_delta_from_factors

        return dict(dense_delta_from_factors(delta, self.reference_model()))

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        ev = self.context.evaluator
        names = self.learned
        if not names:
            return ev.accuracy(task)  # nothing learned yet: θ⁰
        if learned and not self.task_agnostic:
            if task.name not in names:
                raise ContinualError(f"task {task.name!r} is marked learned but the merger holds only {names}")
            return ev.accuracy(task, self.expert_weights_delta(task.name))
        router = self.router()
        return ev.accuracy_from_logits(task, lambda px: router.logits(px, task.classnames, task.templates))

    def save_checkpoint(self, directory: Path) -> None:
        from hf_cft.utils import atomic_write_json

        self.merger.save_pretrained(str(directory / "merger"))
        atomic_write_json(directory / STATE_META, {"learned": self.learned})

    def load_checkpoint(self, directory: Path) -> None:
        if not (directory / "merger").is_dir():
            raise BundleError(f"checkpoint {directory} of strategy 'condu' lacks the merger folder")
        self.merger = self.load_merger(directory / "merger")
        self._router = None
        meta = json.loads((directory / STATE_META).read_text())
        if list(meta.get("learned", [])) != self.learned:
            raise BundleError(
                f"checkpoint {directory}: the merger holds tasks {self.learned}, the manifest {meta.get('learned')}"
            )


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "zeroshot": ZeroShotStrategy,
    "sequential": SequentialFineTuning,
    "independent": IndependentExperts,
    "condu": ConDUStrategy,
}


def register_strategy(name: str, factory: Callable[..., Strategy], replace: bool = False) -> None:
    """Make ``factory(**options) -> Strategy`` available to :func:`make_strategy` (and the recipes) as ``name``.

    Example::

        register_strategy("ta_half", lambda: DeltaMergeStrategy.from_merger("ta_half", lambda: RunningSum()))
    """
    if not isinstance(name, str) or not name.strip():
        raise ContinualError(f"a strategy name must be a non-empty string, got {name!r}")
    if name in STRATEGIES and not replace and STRATEGIES[name] is not factory:
        raise ContinualError(f"strategy {name!r} is already registered (pass replace=True to override it)")
    STRATEGIES[name] = factory


def _accepted_options(factory: Callable[..., Strategy]) -> set[str] | None:
    """The keyword options ``factory`` accepts (``None``: any, it takes ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def make_strategy(name: str, **options) -> Strategy:
    """A strategy by its registered name (see :data:`STRATEGIES`), built with ``options``.

    An unknown name, an option the strategy does not take, or an option value it refuses raises
    :class:`~hf_cft.errors.ContinualError` naming the strategy and the option.

    Example::

        pam = make_strategy("pam", top_p=0.5, align_every=10)
        ta = make_strategy("task_arithmetic", lam=0.3)
    """
    if name not in STRATEGIES:
        raise ContinualError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    factory = STRATEGIES[name]
    accepted = _accepted_options(factory)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ContinualError(
                f"strategy {name!r} has no option(s) {unknown}; its options: {sorted(accepted) or 'none'}"
            )
    try:
        return factory(**options)
    except ContinualError:
        raise
    except (HfCftError, ValueError, TypeError) as exc:
        raise ContinualError(f"strategy {name!r}: bad option value(s) {options}: {exc}") from exc


def strategy_names() -> Sequence[str]:
    return tuple(STRATEGIES)


def strategy_options(name: str) -> set[str] | None:
    """The option names strategy ``name`` accepts (``None``: any, its factory takes ``**kwargs``).

    Example::

        strategy_options("magmax")  # {"lam"}
    """
    if name not in STRATEGIES:
        raise ContinualError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    return _accepted_options(STRATEGIES[name])


def check_choice(owner: str, option: str, value, choices) -> None:
    """Raise :class:`ContinualError` naming ``owner`` and ``option`` unless ``value`` is one of ``choices``."""
    if isinstance(value, bool) or value not in tuple(choices):
        raise ContinualError(f"strategy {owner!r}: option {option} must be one of {tuple(choices)}, got {value!r}")


def check_number(
    owner: str, option: str, value, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """``value`` as a finite float within [low, high] (``low_open``: (low, high]), else :class:`ContinualError`
    naming ``owner`` and ``option``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and low is not None:
        ok = float(value) > low if low_open else float(value) >= low
    if ok and high is not None:
        ok = float(value) <= high
    if not ok:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bounds = f"{'(' if low_open else '['}{lo}, {hi}]"
        raise ContinualError(f"strategy {owner!r}: option {option} must be a finite number in {bounds}, got {value!r}")
    return float(value)

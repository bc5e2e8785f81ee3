"""PAM inside the continual driver (``docs/methods/pam.md`` §2–§5, §7), and the LoRA baselines built on the same
machinery: merge-only, merge + post-hoc TIES alignment, and sequential LoRA.

Per task t (:class:`PAMStrategy`):

1. a fresh trainable copy of θ⁰ gets two LoRA adapters with the run's LoRA settings (``ContinualConfig.lora_*``):
   ``"global"`` (G, frozen) and ``"task"`` (L_t); G is loaded from the strategy state, and
   :class:`~hf_cft.merging.pam.PAMCallback` copies it into L_t when training starts (§2, "Task start");
2. L_t trains with the driver's :class:`~hf_cft.trainers.ClipClassificationTrainer` (fresh optimiser and schedule per
   task) while the callback aligns it every K optimiser steps (§3: reset L_t's entries whose sign conflicts with G on
   G's top-p entries, zero Adam's first moment there); the first task is not aligned (G is untrained);
3. at the end G ← (1−ω)G + ωL_t on the factors (§4; G ← L_1 for the first task), the sign misalignment between G and
   L_t before the merge is logged (§7), and L_t is dropped;
4. every dataset is evaluated with θ⁰ + s·B^G·A^G (§5: the deployed global adapter, no task id). With
   ``eval_task_adapter`` the task adapter's accuracy on its own task before the merge is logged too (§7).

Variants (all registered in :data:`~hf_cft.continual.STRATEGIES`):

| name | in-training alignment | merge after each task |
|---|---|---|
| ``pam`` | yes (§3) | ω-average of the factors (§4) |
| ``merge_only`` | no | ω-average of the factors (PAM's ablation: "merge without alignment") |
| ``pam_ties`` | no (option ``align=True`` adds it) | TIES on the factor pair (G, L_t): elect sign, disjoint mean |
| ``sequential_lora`` | no | G ← L_t (ω = 1): one adapter trained on and on (§9 lower bound) |
| ``pam_tall`` | yes (§3) | as ``pam``; a learned task j is answered by θ⁰ + m_j ⊙ τ_G, its TALL mask (task id) |

``pam_ties`` is hf_cft's reading of the §8 row "Merge + post-hoc TIES alignment", which pam.md does not specify
further: train as merge-only, then resolve sign conflicts after training TIES-style (arXiv:2306.01708) on the pair
of factor tensors (G, L_t), which share one gauge because L_t starts as a copy of G (§4, point 1): trim each to its
top-k entries by magnitude (``ties_k``; default 1.0 = no trim, since trimming G's factors would erase earlier tasks
and A's magnitudes mostly reflect its initialisation, §3), elect σ = sign(G̃ + L̃_t), and keep the mean of the
entries that agree with σ. Where both agree this is PAM's ω = ½ average; where they conflict the elected side wins
whole instead of being averaged towards zero. ``align=True`` gives PAM + post-hoc TIES.

The state (G, task count, per-task log) is a :class:`~hf_cft.merging.pam.PAMState`, checkpointed with its
``save_pretrained`` (a loadable PEFT LoRA folder + ``pam_state.json``); resume is exact because every task rebuilds
its model from θ⁰, the run's fixed LoRA seed and G, and G is kept and merged on the CPU in fp32.

Example::

    from hf_cft.continual import ContinualConfig, ContinualRunner, PAMStrategy

    config = ContinualConfig(finetune="lora", lora_r=32, lora_alpha=32, lora_use_rslora=False,
                             lora_target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                             learning_rate=1e-4)
    result = ContinualRunner(PAMStrategy(top_p=0.5, align_every=10), tasks, clip, tokenizer, "outputs/pam",
                             config, transform=transform).run()
    print(result.metrics, result.history[-1]["misalignment_top_p"])
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn

from hf_cft.continual.config import ContinualConfig, task_seed
from hf_cft.continual.report import _jsonable
from hf_cft.continual.strategies import STATE_META, Strategy, check_number, register_strategy
from hf_cft.continual.tasks import TaskSpec
from hf_cft.continual.weights import Delta, check_finite
from hf_cft.errors import AdapterError, AlignmentError, BundleError, ContinualError
from hf_cft.merging.pam import (
    PAMCallback,
    PAMConfig,
    PAMState,
    adapter_state,
    pam_merge,
    sign_misalignment,
)

logger = logging.getLogger("hf_cft.continual")

POST_HOC = ("none", "ties")
PAM_STATE_DIR = "pam"


def lora_factor_delta(state: Mapping[str, Tensor], scaling: float) -> Delta:
    """Dense ΔW = s·B·A per adapted linear from LoRA factor tensors keyed like
    :func:`~hf_cft.merging.pam.adapter_state` (``base_model.model.<module>.lora_A.weight`` / ``...lora_B.weight``),
    keyed by the base weight's name (``<module>.weight``), computed on the CPU in fp32 as PEFT's
    ``get_delta_weight`` does (``(B @ A) * s``; CLIP linears have ``fan_in_fan_out=False``)."""
    out: Delta = {}
    suffix_a, suffix_b = ".lora_A.weight", ".lora_B.weight"
    for key_a, a in state.items():
        if not key_a.endswith(suffix_a):
            continue
        module = key_a[: -len(suffix_a)]
        b = state.get(module + suffix_b)
        if b is None:
            raise AdapterError(f"LoRA state has {key_a!r} but not its B factor {module + suffix_b!r}")
        if a.ndim != 2 or b.ndim != 2:
            raise AdapterError(f"LoRA factors of {module!r} are not matrices (conv LoRA is not supported here)")
        out[module.removeprefix("base_model.model.") + ".weight"] = (b.float().cpu() @ a.float().cpu()) * scaling
    if not out:
        raise AdapterError("the LoRA state holds no lora_A/lora_B factor pair")
    return out


class _DriverPAMCallback(PAMCallback):
    """:class:`PAMCallback` as the driver uses it: alignment can be switched off (merge-only, sequential LoRA),
    the merge can be the post-hoc TIES rule (``pam_ties``), G and L_t are merged on the CPU (so a run resumed from a
    checkpoint merges exactly the same tensors), and L_t before the merge is kept for the diagnostics."""

    def __init__(
        self, config: PAMConfig, model, state: PAMState | None, align: bool, post_hoc: str, ties_k: float, task: str
    ):
        self._align, self._post_hoc, self._ties_k, self._task = align, post_hoc, ties_k, task
        self.task_state: dict[str, Tensor] | None = None
        super().__init__(config, model=model, state=state)

    @property
    def aligning(self) -> bool:
        return self._align and super().aligning

    def end_task(self, task_name: str | None = None) -> dict:
        if self.model is None:
            raise AlignmentError("PAMCallback is not attached to a model: pass model= or call attach(model).")
        task_state = {k: v.cpu() for k, v in adapter_state(self.model, self.config.task_adapter).items()}
        self.task_state = task_state
        self.state.global_state = {k: v.detach().float().cpu() for k, v in self.state.global_state.items()}
        rates = [r["misalignment"] for r in self.alignment_log if "misalignment" in r]
        extra = {
            "alignment_steps": len(self.alignment_log),
            "reset_entries": sum(r["reset"] for r in self.alignment_log),
            "mean_step_misalignment": sum(rates) / len(rates) if rates else None,
        }
        name = task_name or self._task
        if self._post_hoc == "ties" and self.state.num_tasks >= 1:
            record = self._ties_merge(task_state, name, extra)
        else:
            record = self.state.merge(task_state, task_name=name, **extra)
        self.state.load_into(self.model)
        self._importance, self._global_on_device = {}, {}
        return record

    def _ties_merge(self, task_state: dict[str, Tensor], name: str, extra: dict) -> dict:
        """G ← TIES(G, L_t) on the aligned factors (elect sign, disjoint mean; trim to ``ties_k``), the ω-average on
        the others (see the module docstring)."""
        from hf_cft.merging.baselines import ties

        state = self.state
        t = state.num_tasks + 1
        g = state.global_state
        keys = [
            k
            for k in g
            if ("lora_A" in k and "A" in self.config.factors) or ("lora_B" in k and "B" in self.config.factors)
        ]
        rest = [k for k in g if k not in keys]
        record: dict = {
            "task": t,
            "name": name,
            "merge": "ties",
            "ties_k": self._ties_k,
            "merge_weight": 0.5,  # TIES's disjoint mean of two agreeing entries
            "adapter_params": sum(v.numel() for v in g.values()),
            "misalignment": sign_misalignment(g, task_state, self.config.top_p, keys),
        }
        merged = ties([{k: g[k] for k in keys}, {k: task_state[k] for k in keys}], k=self._ties_k, lam=1.0)
        if rest:
            merged.update(
                pam_merge({k: g[k] for k in rest}, {k: task_state[k] for k in rest}, t, self.config.merge_weight)
            )
        # entries where the elected sign overruled one side (both non-zero, opposite signs)
        conflicts = sum(int(((g[k] * task_state[k]) < 0).sum()) for k in keys)
        record["ties_conflicts"] = conflicts
        record.update(extra)
        state.global_state = {k: merged[k].float().cpu() for k in g}
        state.num_tasks = t
        state.history.append(_jsonable(record))
        return record


class PAMStrategy(Strategy):
    """PAM (``docs/methods/pam.md``) and its LoRA variants in the continual driver; see the module docstring.

    Args:
        top_p, align_every, reset, moment_reset, merge_weight, factors: :class:`~hf_cft.merging.pam.PAMConfig`
            (pam.md §6 defaults: p = 0.5, K = 10, reset to zero, first moment, ω = ½, both factors).
        align: align during training (§3); ``False`` gives the merge-only baseline.
        post_hoc: ``"none"`` or ``"ties"`` (the merge + post-hoc TIES alignment row of §8; see the module docstring).
        ties_k: TIES trim fraction for ``post_hoc="ties"`` (1.0: no trim).
        eval_task_adapter: also log the task adapter's accuracy on its own task before the merge (§7).
        name: the strategy's name in outputs and checkpoints (default ``"pam"``).

    Needs ``ContinualConfig.finetune == "lora"``; the adapters use the config's ``lora_r``, ``lora_alpha``,
    ``lora_use_rslora``, ``lora_target_modules`` and ``lora_init_seed`` (pam.md §6: r 32, α 32 without rsLoRA,
    q/k/v/out_proj + fc1/fc2 in both towers — see ``recipes/configs/pam.yaml``).

    After each task, :attr:`task_metrics` (also in the run's history) holds the misalignment rates of G vs L_t
    before the merge (``misalignment_top_p``, ``misalignment_all``, ``..._A``, ``..._B``), the alignment counts and
    the task adapter's accuracy; the full records (per layer too) are in ``state.history``.

    Example::

        runner = ContinualRunner(PAMStrategy(top_p=0.5, align_every=10), tasks, clip, tokenizer, "out/pam", config)
    """

    name = "pam"

    def __init__(
        self,
        top_p: float = 0.5,
        align_every: int = 10,
        reset: str = "zero",
        moment_reset: str = "first",
        merge_weight: str | float = "half",
        factors: Sequence[str] = ("A", "B"),
        align: bool = True,
        post_hoc: str = "none",
        ties_k: float = 1.0,
        eval_task_adapter: bool = True,
        name: str | None = None,
    ):
        super().__init__()
        self.name = name or type(self).name
        try:
            self.pam_config = PAMConfig(
                top_p=top_p,
                align_every=align_every,
                reset=reset,
                moment_reset=moment_reset,
                merge_weight=merge_weight,
                factors=tuple(factors) if not isinstance(factors, str) else factors,
            )
        except AlignmentError as exc:
            raise ContinualError(f"strategy {self.name!r}: {exc}") from exc
        if not isinstance(align, bool):
            raise ContinualError(f"strategy {self.name!r}: option align must be True or False, got {align!r}")
        if post_hoc not in POST_HOC:
            raise ContinualError(
                f"strategy {self.name!r}: option post_hoc must be one of {POST_HOC}, got {post_hoc!r}"
            )
        self.align = align
        self.post_hoc = post_hoc
        self.ties_k = check_number(self.name, "ties_k", ties_k, 0.0, 1.0, low_open=True)
        self.eval_task_adapter = bool(eval_task_adapter)
        self.state: PAMState | None = None
        self.deployed: Delta = {}
        self.learned: list[str] = []
        self.last_task_state: dict[str, Tensor] | None = None  # L_t before the last merge (not checkpointed)

    # ------------------------------------------------------------------ settings

    def settings(self) -> dict:
        cfg = self.pam_config.to_dict()
        for k in ("global_adapter", "task_adapter"):
            cfg.pop(k)
        out = {**cfg, "align": self.align, "post_hoc": self.post_hoc, "eval_task_adapter": self.eval_task_adapter}
        if self.post_hoc == "ties":
            out["ties_k"] = self.ties_k
        return out

    def check_config(self, config: ContinualConfig) -> None:
        if config.finetune != "lora":
            raise ContinualError(
                f"strategy {self.name!r} trains LoRA adapters (pam.md §2): set ContinualConfig.finetune='lora' "
                f"(got {config.finetune!r})"
            )

    # ------------------------------------------------------------------ model

    def scaling(self) -> float:
        from hf_cft.continual.training import lora_scaling

        return lora_scaling(self.context.config)

    def build_model(self) -> nn.Module:
        """A trainable copy of θ⁰ with the global adapter (the run's LoRA settings and fixed init seed); the task
        adapter is added by :func:`~hf_cft.merging.pam.prepare_pam_model` when the callback attaches."""
        from peft.tuners.lora import LoraLayer

        from hf_cft.continual.training import build_training_model

        model = build_training_model(
            self.context.base_model, self.context.config, adapter_name=self.pam_config.global_adapter
        )
        s = self.scaling()
        adapter = self.pam_config.global_adapter
        for name, module in model.named_modules():
            found = module.scaling.get(adapter) if isinstance(module, LoraLayer) else None
            if found is not None and found != s:  # e.g. a rank or alpha pattern
                raise AdapterError(
                    f"LoRA layer {name!r} has scaling {found}, the run config gives {s}: PAMStrategy needs one "
                    "scaling for every layer"
                )
        return model

    def deployed_delta(self) -> Delta:
        """θ − θ⁰ of the deployed model: s·B^G·A^G of every adapted linear (pam.md §5)."""
        if self.state is None or self.state.num_tasks == 0:
            return {}
        delta = lora_factor_delta(self.state.global_state, self.scaling())
        check_finite(delta, f"the {self.name} global adapter after task {self.learned[-1]!r}")
        return delta

    # ------------------------------------------------------------------ protocol

    def learn(self, task: TaskSpec, index: int) -> None:
        from hf_cft.continual.training import fit

        ctx = self.context
        self.timings, self.task_metrics = {}, {}
        t0 = time.perf_counter()
        model = self.build_model()
        callback = _DriverPAMCallback(
            self.pam_config, model, self.state, self.align, self.post_hoc, self.ties_k, task.name
        )
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"train-{index:03d}-", dir=ctx.workdir) as scratch:
            out = fit(
                model, ctx.tokenizer, task, ctx.config, task_seed(ctx.config.seed, index), index, scratch, [callback]
            )
        self.timings["train_s"] = time.perf_counter() - t0
        if callback.state.num_tasks != len(self.learned) + 1:
            raise ContinualError(f"strategy {self.name!r}: task {task.name!r} was not merged into the global adapter")
        self.state = callback.state
        self.learned.append(task.name)
        self.last_task_state = callback.task_state
        del model, callback
        self.deployed = self.deployed_delta()
        record = self.state.history[-1]
        metrics: dict[str, float] = {
            "merge_weight": float(record["merge_weight"]),
            "adapter_params": float(record["adapter_params"]),  # constant over tasks (pam.md §7)
            "alignment_steps": float(record.get("alignment_steps", 0)),
            "reset_entries": float(record.get("reset_entries", 0)),
        }
        if out.metrics.get("last_logged_loss") is not None:
            metrics["train_loss"] = out.metrics["last_logged_loss"]
        if record.get("mean_step_misalignment") is not None:
            metrics["mean_step_misalignment"] = float(record["mean_step_misalignment"])
        for key, value in (record.get("misalignment") or {}).items():
            if key != "layers":
                metrics["misalignment_" + key.replace("/", "_")] = float(value)
        if record.get("factor_merge_gap") is not None:
            metrics["factor_merge_gap"] = float(record["factor_merge_gap"])
        if self.eval_task_adapter:
            t0 = time.perf_counter()
            task_delta = lora_factor_delta(self.last_task_state, self.scaling())
            metrics["task_adapter_accuracy"] = ctx.evaluator.accuracy(task, task_delta)
            record["task_adapter_accuracy"] = metrics["task_adapter_accuracy"]
            self.timings["task_adapter_eval_s"] = time.perf_counter() - t0
        self.task_metrics = metrics

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        return self.context.evaluator.accuracy(task, self.deployed or None)

    def misalignment(self) -> list[dict]:
        """Per merged task: ``{"task", "name", "top_p", "all", "top_p/A", ...}`` (empty rates for the first task,
        which has nothing to be misaligned with), from the state's log."""
        out = []
        for rec in self.state.history if self.state is not None else []:
            mis = {k: v for k, v in (rec.get("misalignment") or {}).items() if k != "layers"}
            out.append({"task": rec.get("task"), "name": rec.get("name"), **mis})
        return out

    # ------------------------------------------------------------------ checkpoint

    def save_checkpoint(self, directory: Path) -> None:
        from hf_cft.utils import atomic_write_json

        if self.state is None:
            raise ContinualError(f"strategy {self.name!r} has learned nothing yet: no checkpoint to write")
        self.state.save_pretrained(directory / PAM_STATE_DIR)
        atomic_write_json(directory / STATE_META, {"learned": list(self.learned)})

    def load_checkpoint(self, directory: Path) -> None:
        folder = directory / PAM_STATE_DIR
        if not folder.is_dir() or not (directory / STATE_META).is_file():
            raise BundleError(
                f"checkpoint {directory} of strategy {self.name!r} lacks {PAM_STATE_DIR}/ or {STATE_META}"
            )
        state = PAMState.from_pretrained(folder)
        if state.config.to_dict() != self.pam_config.to_dict():
            raise BundleError(
                f"checkpoint {directory}: PAM config {state.config.to_dict()} there, {self.pam_config.to_dict()} here"
            )
        learned = list(json.loads((directory / STATE_META).read_text()).get("learned", []))
        if len(learned) != state.num_tasks:
            raise BundleError(
                f"checkpoint {directory}: the global adapter merged {state.num_tasks} task(s), the manifest lists "
                f"{learned}"
            )
        state.config = self.pam_config
        self.state, self.learned = state, learned
        self.last_task_state = None
        self.deployed = self.deployed_delta()


class PAMTallStrategy(PAMStrategy):
    """PAM + TALL (the best row of the PAM paper, pam.md §8): PAM trains and merges as :class:`PAMStrategy`, and
    every task's adapter L_t (its LoRA factors at the end of the task, before the merge) is kept on disk. A learned
    task j is answered with the task id by the TALL retrieval of the current global adapter (arXiv:2405.07813, with
    the merged model θ_mt = θ0 + τ_G, as TALL allows for any merge): θ0 + m_j ⊙ τ_G with τ_G = s·B^G·A^G,
    τ_j = s·B_j·A_j and m_j = 1[|τ_j| > λ·|τ_G − τ_j|] (λ = ``tall_lambda``, 0.4); a task not learned yet by the
    deployed global adapter, as PAM (so Transfer is PAM's). How the PAM paper combined the two is not stated in the
    text we have (pam.md §9); this is TALL's rule applied to PAM's merge. A task-aware row, like EMR and TALL.

    The masks are recomputed from the stored adapters against the current G at every evaluation (G changes after
    every task); the adapters are small (the LoRA factors), their dense deltas are built one task at a time.
    """

    name = "pam_tall"

    def __init__(self, *args, tall_lambda: float = 0.4, **kwargs):
        kwargs.setdefault("name", "pam_tall")
        super().__init__(*args, **kwargs)
        self.tall_lambda = check_number(self.name, "tall_lambda", tall_lambda, 0.0)
        self._masked: dict[str, tuple[int, Delta]] = {}

    def settings(self) -> dict:
        return {**super().settings(), "tall_lambda": self.tall_lambda}

    @property
    def adapter_store(self):
        from hf_cft.continual.weights import DeltaStore

        return DeltaStore(self.context.workdir / "task_adapters")

    def learn(self, task: TaskSpec, index: int) -> None:
        from hf_cft.continual.strategies import save_expert

        super().learn(task, index)
        save_expert(self.adapter_store, f"{index:03d}", self.last_task_state, {"task": task.name})
        self._masked = {}

    def task_delta(self, name: str) -> Delta:
        """θ − θ0 answering the learned task ``name``: m_j ⊙ τ_G (see the class docstring)."""
        if name not in self.learned:
            raise ContinualError(f"strategy {self.name!r} holds no task {name!r}; learned: {self.learned}")
        cached = self._masked.get(name)
        if cached is not None and cached[0] == len(self.learned):
            return cached[1]
        key = f"{self.learned.index(name):03d}"
        if key not in self.adapter_store:
            raise BundleError(f"the task adapter of {name!r} is missing from {self.adapter_store.directory}")
        own = lora_factor_delta(self.adapter_store.load(key), self.scaling())
        out = {}
        for k, g in self.deployed.items():
            t = own[k].to(g.device)
            out[k] = (t.abs() > self.tall_lambda * (g - t).abs()).to(g.dtype) * g
        self._masked = {name: (len(self.learned), out)}
        return out

    def evaluate(self, task: TaskSpec, learned: bool) -> float:
        if not learned or task.name not in self.learned:
            return super().evaluate(task, learned)
        return self.context.evaluator.accuracy(task, self.task_delta(task.name))

    def load_checkpoint(self, directory: Path) -> None:
        super().load_checkpoint(directory)
        self._masked = {}
        missing = [n for i, n in enumerate(self.learned) if f"{i:03d}" not in self.adapter_store]
        if missing:
            raise BundleError(f"task adapters of {missing} are missing from {self.adapter_store.directory}")


# ------------------------------------------------------------------------------------------------ registry


def pam_strategy(
    top_p: float = 0.5,
    align_every: int = 10,
    reset: str = "zero",
    moment_reset: str = "first",
    merge_weight: str | float = "half",
    factors: Sequence[str] = ("A", "B"),
    eval_task_adapter: bool = True,
) -> PAMStrategy:
    """PAM with in-training alignment (pam.md §2–§5; defaults §6)."""
    pam = dict(top_p=top_p, align_every=align_every, reset=reset, moment_reset=moment_reset)
    return PAMStrategy(**pam, merge_weight=merge_weight, factors=factors, eval_task_adapter=eval_task_adapter)


def merge_only_strategy(
    merge_weight: str | float = "half", top_p: float = 0.5, eval_task_adapter: bool = True
) -> PAMStrategy:
    """PAM without alignment: L_t ← G, train, G ← (1−ω)G + ωL_t (``top_p`` only sets the misalignment diagnostic)."""
    return PAMStrategy(
        top_p=top_p, merge_weight=merge_weight, align=False, eval_task_adapter=eval_task_adapter, name="merge_only"
    )


def pam_ties_strategy(
    ties_k: float = 1.0,
    align: bool = False,
    top_p: float = 0.5,
    align_every: int = 10,
    reset: str = "zero",
    moment_reset: str = "first",
    factors: Sequence[str] = ("A", "B"),
    eval_task_adapter: bool = True,
) -> PAMStrategy:
    """Merge + post-hoc TIES alignment (pam.md §8 row; hf_cft's reading in the module docstring); ``align=True``
    adds PAM's in-training alignment."""
    return PAMStrategy(
        top_p,
        align_every,
        reset,
        moment_reset,
        "half",
        factors,
        align,
        "ties",
        ties_k,
        eval_task_adapter,
        name="pam_ties",
    )


def sequential_lora_strategy(top_p: float = 0.5) -> PAMStrategy:
    """Sequential LoRA fine-tuning with one adapter trained on and on (pam.md §8 "Sequential FT, one LoRA", the
    lower bound of §9): the adapter's factors carry over from task to task, with a fresh optimiser per task
    (PAM's cycle with ω = 1 and no alignment, so G = L_t). ``top_p`` only sets the misalignment diagnostic (the
    paper's "unconstrained fine-tuning" rate).

    :class:`~hf_cft.continual.SequentialFineTuning` with ``finetune="lora"`` differs: it folds each task's adapter
    into the weights and starts a *new* adapter per task (rank up to T·r), not one adapter."""
    return PAMStrategy(top_p=top_p, merge_weight=1.0, align=False, eval_task_adapter=False, name="sequential_lora")


def pam_tall_strategy(
    tall_lambda: float = 0.4,
    top_p: float = 0.5,
    align_every: int = 10,
    reset: str = "zero",
    moment_reset: str = "first",
    merge_weight: str | float = "half",
    factors: Sequence[str] = ("A", "B"),
    eval_task_adapter: bool = True,
) -> PAMTallStrategy:
    """PAM + TALL (pam.md §8's best row; hf_cft's reading in :class:`PAMTallStrategy`): PAM, then each learned task
    answered by its TALL mask over the global adapter (task id)."""
    pam = dict(top_p=top_p, align_every=align_every, reset=reset, moment_reset=moment_reset)
    return PAMTallStrategy(**pam, merge_weight=merge_weight, factors=factors, eval_task_adapter=eval_task_adapter,
                           tall_lambda=tall_lambda)  # fmt: skip


PAM_STRATEGIES = {
    "pam": pam_strategy,
    "merge_only": merge_only_strategy,
    "pam_ties": pam_ties_strategy,
    "sequential_lora": sequential_lora_strategy,
    "pam_tall": pam_tall_strategy,
}

for _name, _factory in PAM_STRATEGIES.items():
    register_strategy(_name, _factory)

__all__ = [
    "PAM_STRATEGIES",
    "PAMStrategy",
    "PAMTallStrategy",
    "lora_factor_delta",
    "merge_only_strategy",
    "pam_strategy",
    "pam_tall_strategy",
    "pam_ties_strategy",
    "sequential_lora_strategy",
]

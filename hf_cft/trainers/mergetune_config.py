from __future__ import annotations

from dataclasses import dataclass, field, fields

from hf_cft.errors import OptionError
from hf_cft.trainers.clip_config import ClipTrainingArguments
from hf_cft.validation import check_int, check_number


class MergeTuneConfigError(OptionError):
    """A MergeTune hyper-parameter is out of its range."""


ALPHA_GRIDS = ("midpoint", "official", "random")
ANCHORS = ("auto", "cosine", "sq_l2", "fisher")
FISHER_LABELS = ("sample", "argmax", "expected")
#: Upper bound of ``num_alphas``: every step evaluates the path loss N times, so N = 2,000,000 would run one step
#: for minutes without saying why.
MAX_NUM_ALPHAS = 1000
PRESETS = ("official",)
#: ``preset="official"``: the released code's CoOp+MergeTune recipe (mergetune.md §8, official column), applied to
#: every listed field that is still at its default value.
OFFICIAL_PRESET = {
    "anchor_weight": 10.0,
    "path_weight": 1.0,
    "num_alphas": 5,
    "alpha_grid": "official",
    "tau": 1.0,
    "path_features": "raw",
    "anchor_templates": "first",
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "weight_decay": 5e-4,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "constant_warmup_epochs": 1,
    "constant_warmup_lr": 1e-5,
    "per_device_train_batch_size": 128,
    "num_train_epochs": 100,
}


@dataclass
class MergeTuneConfig(ClipTrainingArguments):
    """Training arguments of MergeTune (Wang et al., *MergeTune: Continued Fine-Tuning of Vision-Language Models*,
    ICLR 2026), following ``docs/methods/mergetune.md``:

    ``L(w) = L2(w) + λ·D(w, ŵ1) + β·(1/N)·Σ_k L2(ŵ2 + α_k·(w − ŵ2))``

    with ŵ1 the zero-shot and ŵ2 the fine-tuned solution. Library defaults: λ = 8, β = 0.5, N = 5 midpoints,
    τ = 0.3 (start at (1−τ)·ŵ1 + τ·ŵ2). With ``anchor="sq_l2"`` in weight space (LoRA, full FT) D is a sum over
    all entries, so λ needs re-tuning (§8: no published values).

    Fidelity to the reference (the released code) — every deviation is an option, the library's default first:

    - ``preset="official"`` sets the official recipe on every field of ``OFFICIAL_PRESET`` still at its default
      (a value equal to the default counts as unset: :meth:`from_preset` lets every override win) (λ = 10, β = 1, N = 5 on the official grid, τ = 1, raw path features, one template, SGD momentum 0.9 and
      weight decay 5e-4 at lr 0.002, one constant warm-up epoch at 1e-5 then a per-epoch cosine, batch 128,
      100 epochs). Default ``None``: the paper's values (λ = 8, β = 0.5, τ = 0.3) and the Trainer's optimiser,
      because the ablations favour them and the Trainer's arguments stay the user's.
    - ``path_features``: ``"normalized"`` (default) interpolates the unit class features, ``"raw"`` the raw
      text-encoder outputs, then normalises (official). Default kept: the path then lies in the space of the
      classifier the anchor and the task term use, and it is invariant to the encoder's output norm.
    - ``anchor_templates``: ŵ1 from ``"all"`` templates ensembled (default) or the ``"first"`` only (official: one
      hand-crafted template per dataset; with the template "<ctx_init> {}." τ = 0 then starts exactly at ŵ1).
      Default kept: the ensemble is the stronger zero-shot classifier.
    - ``fisher_transform``: the Fisher's images with the ``"eval"`` transform (default, the spec: no augmentation)
      or the training one (``"train"``, the former behaviour); ``fisher_sample``: ``"random"`` (default, a sample
      of ``fisher_max_images`` rows seeded by ``seed``) or the ``"first"`` rows (former behaviour).
    - ``alpha_grid="official"`` is ``np.arange(0.1, 1.01, 1/N)`` exactly (it keeps points in (1.0, 1.01), e.g.
      N = 11, 21); with ``"random"`` evaluation draws α from its own generator, reset at every evaluation, so
      training does not depend on how often one evaluates.
    - ``label_smoothing`` applies to every L2 term (task and path), one definition of L2 (§4).
    - Best-validation selection (the official protocol): ``load_best_model_at_end=True`` with
      ``metric_for_best_model="accuracy"`` and matching eval / save strategies.
    - ``weight_ensemble = γ`` (§9; default ``None``: deploy w alone): after training (and after the best model is
      loaded), w ← (1 − γ)·ŵ1 + γ·w in the family's own coordinates (:meth:`MergeTuneTrainer.apply_weight_ensemble`).
    - The linear-head anchor is Σ(W − Ŵ1)² (+ bias) on the scaled head W = s·V, one function
      (:func:`~hf_cft.trainers.mergetune_losses.head_anchor`) shared with the cached-feature trainer.

    Example::

        args = MergeTuneConfig(output_dir="out", anchor_weight=8.0, path_weight=0.5, num_alphas=5, tau=0.3)
        official = MergeTuneConfig(output_dir="out", preset="official", num_train_epochs=50)
    """

    preset: str | None = field(
        default=None, metadata={"help": "'official': the released code's recipe for fields left at their defaults."}
    )

    anchor_weight: float = field(default=8.0, metadata={"help": "λ: weight of the surrogate toward zero-shot."})
    path_weight: float = field(default=0.5, metadata={"help": "β: weight of the LMC path loss to fine-tuned."})
    num_alphas: int = field(default=5, metadata={"help": "N: number of α points on the path."})
    alpha_grid: str = field(
        default="midpoint",
        metadata={
            "help": "midpoint ((k-1/2)/N), official (np.arange(0.1, 1.01, 1/N), as the released code) or random "
            "(N draws/step)."
        },
    )
    tau: float = field(default=0.3, metadata={"help": "τ: initialise at (1-τ)·zero-shot + τ·fine-tuned (1 = ŵ2)."})
    anchor: str = field(
        default="auto",
        metadata={
            "help": "auto (cosine for prompts, sq_l2 for heads, LoRA and full FT), cosine, sq_l2, or fisher "
            "(diagonal Fisher)."
        },
    )
    fisher_labels: str = field(default="sample", metadata={"help": "Fisher labels: sample, argmax or expected."})
    fisher_damping: float = field(default=1e-3, metadata={"help": "Added to the mean-normalised Fisher."})
    fisher_max_images: int = field(default=0, metadata={"help": "Images used to estimate the Fisher (0 = all)."})
    fisher_chunk_size: int = field(
        default=8,
        metadata={
            "help": "Weight space: images per vectorised per-example-gradient chunk of the Fisher estimate "
            "(memory grows as chunk x continued parameters)."
        },
    )

    path_features: str = field(
        default="normalized",
        metadata={"help": "Prompt path: interpolate 'normalized' class features or 'raw' encoder outputs (official)."},
    )
    anchor_templates: str = field(
        default="all", metadata={"help": "ŵ1's templates: 'all' (ensembled) or 'first' (official: one template)."}
    )
    fisher_transform: str = field(
        default="eval", metadata={"help": "Fisher images: 'eval' transform (no augmentation) or 'train'."}
    )
    fisher_sample: str = field(
        default="random", metadata={"help": "Fisher rows: a seeded 'random' sample or the 'first' rows."}
    )
    weight_ensemble: float | None = field(
        default=None, metadata={"help": "γ: after training, w ← (1 − γ)·ŵ1 + γ·w (weight ensemble, §9)."}
    )

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> MergeTuneConfig:
        """The arguments of ``preset`` with ``overrides`` on top — every override wins, also one equal to the
        field's default (which ``MergeTuneConfig(preset=...)`` cannot tell from an unset field).

        Example::

            args = MergeTuneConfig.from_preset("official", output_dir="out", per_device_train_batch_size=8)
        """
        if preset not in PRESETS:
            raise MergeTuneConfigError(f"preset must be one of {PRESETS}, got {preset!r}")
        config = cls(**{**OFFICIAL_PRESET, **overrides})
        config.preset = preset
        return config

    def _apply_preset(self) -> None:
        if self.preset is None:
            return
        if self.preset not in PRESETS:
            raise MergeTuneConfigError(f"preset must be one of {PRESETS} or None, got {self.preset!r}")
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in OFFICIAL_PRESET.items():
            current = getattr(self, name)
            current = getattr(current, "value", current)  # enums of TrainingArguments
            if current == defaults[name] or (name == "optim" and current == getattr(defaults[name], "value", None)):
                setattr(self, name, value)

    def __post_init__(self):
        self._apply_preset()
        if self.kg_weight:
            raise MergeTuneConfigError(
                "kg_weight is KgCoOp's training term; MergeTune's cosine anchor is the same term: set anchor_weight "
                "(λ) instead, and pass the KgCoOp adapter as the fine-tuned solution."
            )
        super().__post_init__()
        err = MergeTuneConfigError
        self.anchor_weight = check_number(self.anchor_weight, "anchor_weight (λ)", low=0.0, error=err)
        self.path_weight = check_number(self.path_weight, "path_weight (β)", low=0.0, error=err)
        self.num_alphas = check_int(
            self.num_alphas,
            "num_alphas (N)",
            low=1,
            high=MAX_NUM_ALPHAS,
            error=err,
            hint="Each training step evaluates the path loss at N points; a few (the paper uses 5) suffice.",
        )
        self.tau = check_number(self.tau, "tau (τ)", low=0.0, high=1.0, error=err)
        self.fisher_damping = check_number(self.fisher_damping, "fisher_damping", low=0.0, error=err)
        self.fisher_max_images = check_int(
            self.fisher_max_images, "fisher_max_images", low=0, error=err, hint="0 means every image."
        )
        self.fisher_chunk_size = check_int(self.fisher_chunk_size, "fisher_chunk_size", low=1, error=err)
        if self.alpha_grid not in ALPHA_GRIDS:
            raise MergeTuneConfigError(f"alpha_grid must be one of {ALPHA_GRIDS}, got {self.alpha_grid!r}")
        if self.anchor not in ANCHORS:
            raise MergeTuneConfigError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.fisher_labels not in FISHER_LABELS:
            raise MergeTuneConfigError(f"fisher_labels must be one of {FISHER_LABELS}, got {self.fisher_labels!r}")
        for name, allowed in (
            ("path_features", ("normalized", "raw")),
            ("anchor_templates", ("all", "first")),
            ("fisher_transform", ("eval", "train")),
            ("fisher_sample", ("random", "first")),
        ):
            if getattr(self, name) not in allowed:
                raise MergeTuneConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.weight_ensemble is not None:
            self.weight_ensemble = check_number(
                self.weight_ensemble, "weight_ensemble (γ)", low=0.0, high=1.0, error=err
            )

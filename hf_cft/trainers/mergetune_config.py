from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class MergeTuneConfig(ClipTrainingArguments):
    """Training arguments of MergeTune (Wang et al., *MergeTune: Continued Fine-Tuning of Vision-Language Models*,
    ICLR 2026), following ``docs/methods/mergetune.md``:

    ``L(w) = L2(w) + λ·D(w, ŵ1) + β·(1/N)·Σ_k L2(ŵ2 + α_k·(w − ŵ2))``

    with ŵ1 the zero-shot and ŵ2 the fine-tuned solution. Library defaults: λ = 8, β = 0.5, N = 5 midpoints,
    τ = 0.3 (start at (1−τ)·ŵ1 + τ·ŵ2). With ``anchor="sq_l2"`` in weight space (LoRA, full FT) D is a sum over
    all entries, so λ needs re-tuning (§8: no published values).

    Example::

        args = MergeTuneConfig(output_dir="out", anchor_weight=8.0, path_weight=0.5, num_alphas=5, tau=0.3)
    """

    anchor_weight: float = field(default=8.0, metadata={"help": "λ: weight of the surrogate toward zero-shot."})
    path_weight: float = field(default=0.5, metadata={"help": "β: weight of the LMC path loss to fine-tuned."})
    num_alphas: int = field(default=5, metadata={"help": "N: number of α points on the path."})
    alpha_grid: str = field(
        default="midpoint",
        metadata={
            "help": "midpoint ((k-1/2)/N), official (0.1 + k/N, as the released code) or random (N draws/step)."
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

    def __post_init__(self):
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

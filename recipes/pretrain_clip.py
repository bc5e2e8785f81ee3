# /// script
# requires-python = ">=3.10"
# dependencies = ["hf-cft[vision,plots,demo]"]
# ///
"""Contrastive pretraining of a small ``transformers.CLIPModel`` from scratch on image–label datasets.

Every image is paired with a caption built from a class name and a template (its dataset's own templates, a
pool of generic web-like ones, or a mix), tokenised with the real CLIP tokenizer rebuilt offline from OpenAI's
BPE file. Only the **pretraining pool** of each dataset is used: a fixed 70% of every class's training images
(``split_per_class(train, 0.7, seed=0)``); the other 30% (the downstream pool) and the test splits are never
seen. Images are decoded once to 32×32 uint8 tensors and augmented in torch by the batch.

Launch (hardware used for the benchmark model: 2 CPU cores, no GPU):

    accelerate launch recipes/pretrain_clip.py --config recipes/configs/pretrain_clip.yaml
        # the benchmark's zero-shot model on the ten ../shared/data datasets (about 60 minutes)
    accelerate launch recipes/pretrain_clip.py --datasets digits --image_size 16 --max_minutes 1 \\
        --output_dir ~/.cache/hf_cft/digits-clip
        # the tiny digits variant (scikit-learn's 8×8 digits; about a minute)
    accelerate launch recipes/pretrain_clip.py --config ... --resume true   # continue an interrupted run

Writes ``<output_dir>/model`` (``CLIPModel.from_pretrained``-loadable, with tokenizer and image processor),
``<output_dir>/curve.jsonl`` (loss, throughput, periodic zero-shot accuracy), ``curve.png``, ``zeroshot.json``,
and a resumable checkpoint ``<output_dir>/checkpoint`` (safetensors + JSON, written atomically).

Multi-process (``accelerate launch --num_processes N``): ``--batch_size`` is the *global* batch (unlike the
Trainer recipes' per-device sizes), so the same command gives the same run on any number of processes. Every
process draws the same global batch, augmentation and captions (one shared generator), then encodes only its
contiguous 1/N of the batch; the contrastive loss is computed against the features of the whole global batch,
all-gathered with gradient, so 2 processes × B/2 images compute the 1-process loss over B images and its gradient
(up to float rounding; ``batch_size`` must be divisible by N). The time budget, learning-rate schedule and
evaluation times follow the main process's clock; only the main process evaluates and writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hf_cft.data import SHARED_DATASETS, format_prompts, split_per_class
from hf_cft.data.image_pool import BatchAugment, decode_split, normalize_batch
from hf_cft.recipe_utils import load_task, parse_recipe_args, user_errors
from hf_cft.utils import atomic_save_safetensors, atomic_write_json, hf_cft_cache_dir

GENERIC_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "{}",
    "a {}.",
    "this is a {}.",
    "a close-up of a {}.",
    "a low resolution photo of a {}.",
)

# Design E's web-like caption pool: phrasings a photo site or forum might carry, none of which is an evaluation
# prompt ("a photo of a {}." or any dataset's own template; checked when the pool is built), and none uses the
# words "photo" or "of". Zero-shot classification with the hand-crafted prompts is then a transfer to an unseen
# phrasing, as it is for real CLIP, and a learned prompt context has something to recover.
WEB_TEMPLATES = (
    "{}",
    "a {}",
    "the {}",
    "my {}",
    "this {}",
    "one {}",
    "just a {}",
    "here is a {}",
    "there is a {} here",
    "look at this {}",
    "a {} i saw today",
    "an image showing a {}",
    "a picture with a {}",
    "snapshot: {}",
    "found a {}",
    "example: {}",
    "a nice {}",
    "what a {}",
    "an old {}",
    "a {}, seen up there",
    "{} in the picture",
    "our {}",
    "a shot with a {}",
    "a {} for you",
)
# Design F adds phrasings that use the words "photo" and "of" -- still never an evaluation prompt -- so that the
# hand-crafted prompt "a photo of a {}." is an unseen combination of seen words rather than of untrained tokens.
WEB_PHOTO_TEMPLATES = (
    "a photo of my {}",
    "photo of the {}",
    "the photo shows a {}",
    "a {} in a photo",
    "a photo with a {}",
    "photo: {}",
    "a picture of the {}",
    "an image of my {}",
)
CAPTION_MODES = ("own", "generic", "mixed", "web", "web_photo")


@dataclass
class PretrainArguments:
    datasets: list[str] = field(default_factory=lambda: list(SHARED_DATASETS), metadata={"help": "Datasets."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of local datasets (default ../shared/data)."})
    bpe_path: str | None = field(
        default=None, metadata={"help": "CLIP BPE file (default <data_dir>/assets/bpe_simple_vocab_16e6.txt.gz)."}
    )
    pool_fraction: float = field(default=0.7, metadata={"help": "Per-class fraction of train used (seed 0)."})
    image_size: int = field(default=32, metadata={"help": "Input resolution."})
    patch_size: int = field(default=8, metadata={"help": "ViT patch size."})
    width: int = field(default=128, metadata={"help": "Hidden size of both towers."})
    layers: int = field(default=4, metadata={"help": "Layers per tower."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    text_width: int | None = field(default=None, metadata={"help": "Hidden size of the text tower (default: width)."})
    text_layers: int | None = field(default=None, metadata={"help": "Text tower layers (default: layers)."})
    text_heads: int | None = field(default=None, metadata={"help": "Text tower attention heads (default: heads)."})
    projection_dim: int = field(default=128, metadata={"help": "Joint embedding size."})
    captions: str = field(
        default="mixed",
        metadata={
            "help": "own | generic | mixed (own with prob. own_prob, else GENERIC_TEMPLATES) | web (own with prob. "
            "own_prob, else WEB_TEMPLATES; design E) | web_photo (web plus WEB_PHOTO_TEMPLATES; design F)."
        },
    )
    own_prob: float = field(
        default=0.5, metadata={"help": "In 'mixed' and 'web*', probability of the dataset's own template."}
    )
    describe_views: bool = field(
        default=False,
        metadata={"help": "Captions name how a degraded view looks ('a blurry black and white photo of a {}.')."},
    )
    describe_prob: float = field(default=0.7, metadata={"help": "With describe_views, chance each trait is named."})
    degrade_prob: float = field(default=0.5, metadata={"help": "Fraction of images degraded (crop/gray/blur/noise)."})
    grayscale_prob: float = field(default=0.5, metadata={"help": "Grayscale probability of a degraded image."})
    crop_min: float = field(default=0.35, metadata={"help": "Smallest crop area of a degraded image."})
    blur_min: float = field(default=0.5, metadata={"help": "Smallest blur sigma of a degraded image (pixels)."})
    blur_max: float = field(default=1.2, metadata={"help": "Largest blur sigma of a degraded image (pixels)."})
    noise: float = field(default=0.05, metadata={"help": "Gaussian noise std on degraded images."})
    batch_size: int = field(default=256, metadata={"help": "Images per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)."})
    warmup_steps: int = field(default=200, metadata={"help": "Linear warm-up steps."})
    max_minutes: float = field(default=60.0, metadata={"help": "Wall-clock budget; the cosine schedule spans it."})
    max_steps: int = field(
        default=0, metadata={"help": "Step budget instead of time (the schedule then spans steps; reproducible)."}
    )
    stop_after_steps: int = field(
        default=0, metadata={"help": "Stop early as if interrupted (checkpoint only), to test --resume."}
    )
    bf16: bool = field(
        default=False, metadata={"help": "bfloat16 autocast (fast on GPUs; very slow on CPUs without bf16 units)."}
    )
    eval_every_minutes: float = field(default=10.0, metadata={"help": "Zero-shot check on test subsets."})
    eval_images: int = field(default=400, metadata={"help": "Test images per dataset in periodic checks."})
    save_every_minutes: float = field(default=5.0, metadata={"help": "Checkpoint interval."})
    output_dir: str = field(default="outputs/pretrain_clip", metadata={"help": "Where everything is written."})
    report_to: str = field(
        default="none",
        metadata={"help": "'tensorboard' logs loss, lr, throughput and zero-shot checks (needs tensorboard)."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Decoded-image cache (default $HF_CFT_CACHE/decoded, ~/.cache/hf_cft/decoded)."},
    )
    resume: bool = field(default=False, metadata={"help": "Continue from <output_dir>/checkpoint."})
    seed: int = field(default=0, metadata={"help": "Seed of init, sampling and augmentation."})


# --------------------------------------------------------------------------------------------------- data


class CaptionedPool:
    """All pretraining images (uint8) with their (dataset, class) and a table of tokenised captions."""

    def __init__(self, args: PretrainArguments, tokenizer):
        if args.captions not in CAPTION_MODES:
            raise ValueError(f"captions={args.captions!r} is not one of {CAPTION_MODES}")
        cache = args.cache_dir or str(hf_cft_cache_dir("decoded"))
        self.web = args.captions in ("web", "web_photo")
        self.pool_templates = {"web": WEB_TEMPLATES, "web_photo": WEB_TEMPLATES + WEB_PHOTO_TEMPLATES}.get(
            args.captions, GENERIC_TEMPLATES
        )
        images, owners, prompt_rows = [], [], []
        texts: list[str] = []
        self.tasks = {}
        for d, name in enumerate(args.datasets):
            task = load_task(name, args.data_dir)
            pool = (
                split_per_class(task["train"], args.pool_fraction, seed=0)[0]
                if args.pool_fraction < 1
                else task["train"]
            )
            im, lab = decode_split(pool, args.image_size, cache, f"{name}-pretrain-pool")
            images.append(im)
            # caption table of this dataset: own templates and pool (generic or web) templates for every class
            own = format_prompts(task.classnames, task.templates)
            if self.web:
                seen = set(self.pool_templates) & {"a photo of a {}.", *task.templates}
                if seen:
                    raise ValueError(
                        f"the web caption pool contains evaluation prompts of dataset {name!r}: {sorted(seen)}"
                    )
            gen = format_prompts(task.classnames, self.pool_templates)
            base = len(texts)
            texts += own + gen
            n_own, n_gen = len(task.templates), len(self.pool_templates)
            self.tasks[name] = {"task": task, "own": (base, n_own), "gen": (base + len(own), n_gen)}
            owners.append(torch.stack([torch.full_like(lab, d), lab], 1))
            prompt_rows.append((base, n_own, base + len(own), n_gen))
        self.images = torch.cat(images)
        self.owner = torch.cat(owners)  # [N, 2] (dataset index, class id)
        self.prompt_rows = torch.tensor(prompt_rows)  # per dataset: own start, n_own, generic start, n_gen
        enc = tokenizer(texts, padding="longest", truncation=True, max_length=77, return_tensors="pt")
        self.tokens, self.lengths = enc["input_ids"], enc["attention_mask"].sum(1)
        self.captions, self.own_prob = args.captions, args.own_prob
        self.tokenizer, self.describe_prob = tokenizer, args.describe_prob
        self.classnames = [self.tasks[name]["task"].classnames for name in args.datasets]

    def __len__(self) -> int:
        return self.images.shape[0]

    def caption_ids(
        self, idx: torch.Tensor, g: torch.Generator, views: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of one caption per image. With ``views`` (what the augmentation did to
        each image), each trait of a degraded view is named with probability ``describe_prob`` -- close-up
        (crop under 60% of the area), blurry (sigma above 1.2) and black and white / color -- and a caption
        naming at least one trait replaces the template caption: "a close-up blurry color photo of a {}."."""
        d, c = self.owner[idx, 0], self.owner[idx, 1]
        rows = self.prompt_rows[d]
        own_start, n_own, gen_start, n_gen = rows.unbind(1)
        use_own = {
            "own": torch.ones(len(idx), dtype=torch.bool),
            "generic": torch.zeros(len(idx), dtype=torch.bool),
        }.get(self.captions, torch.rand(len(idx), generator=g) < self.own_prob)
        t_own = (torch.rand(len(idx), generator=g) * n_own).long()
        t_gen = (torch.rand(len(idx), generator=g) * n_gen).long()
        prow = torch.where(use_own, own_start + c * n_own + t_own, gen_start + c * n_gen + t_gen)
        lengths = self.lengths[prow].clone()
        width = int(lengths.max())
        ids = self.tokens[prow, :width]
        if views is not None:
            said = (torch.rand(len(idx), 3, generator=g) < self.describe_prob) & views["degraded"][:, None]
            traits = torch.stack([views["crop_area"] < 0.6, views["blur_sigma"] > 1.2, torch.ones_like(said[:, 0])], 1)
            said &= traits
            rows = said.any(1).nonzero().flatten().tolist()
            if rows:
                texts = []
                for r in rows:
                    words = ["close-up"] * bool(said[r, 0]) + ["blurry"] * bool(said[r, 1])
                    if said[r, 2]:
                        words.append("black and white" if bool(views["grayscale"][r]) else "color")
                    name = self.classnames[int(d[r])][int(c[r])]
                    if self.web:  # traits as adjectives inside the image's own web caption
                        texts.append(self.pool_templates[int(t_gen[r])].format(f"{' '.join(words)} {name}"))
                    else:
                        texts.append(f"a {' '.join(words)} photo of a {name}.")
                enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=77, return_tensors="pt")
                new_width = max(width, enc["input_ids"].shape[1])
                pad_id = self.tokenizer.pad_token_id or 0
                ids = F.pad(ids, (0, new_width - width), value=pad_id)
                ids[rows] = F.pad(enc["input_ids"], (0, new_width - enc["input_ids"].shape[1]), value=pad_id)
                lengths[rows] = enc["attention_mask"].sum(1)
                width = new_width
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        return ids, mask


# --------------------------------------------------------------------------------------------------- model


def build_tokenizer(args: PretrainArguments):
    """The real CLIP tokenizer from the BPE file; for the digits variant a small BPE learned on its captions."""
    from hf_cft.data.loading import default_data_dir
    from hf_cft.models.tokenizer import build_clip_tokenizer, train_clip_tokenizer

    if args.datasets == ["digits"]:
        from hf_cft.data import DIGIT_CLASSNAMES, DIGIT_TEMPLATES

        texts = format_prompts(DIGIT_CLASSNAMES, (*DIGIT_TEMPLATES, *GENERIC_TEMPLATES)) + ["X zero."]
        return train_clip_tokenizer(texts, vocab_size=1024)
    bpe = args.bpe_path or str(
        Path(args.data_dir or default_data_dir() or ".") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    )
    return build_clip_tokenizer(bpe)


def build_model(args: PretrainArguments, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text_width = args.text_width or args.width
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        num_hidden_layers=args.text_layers or args.layers,
        num_attention_heads=args.text_heads or args.heads,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=args.projection_dim,
    )
    vision = dict(
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        image_size=args.image_size,
        patch_size=args.patch_size,
        projection_dim=args.projection_dim,
    )
    torch.manual_seed(args.seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.projection_dim))


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, progress: float, args: PretrainArguments) -> float:
    """Linear warm-up, then cosine decay over the budget (``progress`` in [0, 1] of time or steps)."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    return args.learning_rate * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _GatherWithGrad(torch.autograd.Function):
    """All-gather equal-sized ``[b, d]`` tensors of every process into ``[N·b, d]`` (rank order), with a backward
    that sums every process's gradient of the gathered tensor and returns this process's slice: each rank's loss
    depends on every rank's features. Only all_gather and all_reduce are used (gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def contrastive_loss(image_embeds, text_embeds, scale, num_processes: int = 1, rank: int = 0) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over the global batch: this process's ``b`` images (texts) against the texts
    (images) of all ``num_processes·b`` pairs, mean over this process's rows. The mean of the processes' losses is
    the 1-process loss of the global batch, and DDP's gradient averaging then gives its gradient (the all-gather
    carries gradient back to the features' owners)."""
    img, txt = image_embeds.float(), text_embeds.float()
    if num_processes > 1:
        all_img, all_txt = _GatherWithGrad.apply(img), _GatherWithGrad.apply(txt)
    else:
        all_img, all_txt = img, txt
    target = torch.arange(rank * img.shape[0], (rank + 1) * img.shape[0], device=img.device)
    return (
        F.cross_entropy(scale * img @ all_txt.t(), target) + F.cross_entropy(scale * txt @ all_img.t(), target)
    ) / 2


# --------------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model, opt, state: dict, gen: torch.Generator):
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.gen"] = gen.get_state()
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path / "state.safetensors")
    atomic_write_json(path / "state.json", state)  # written last: a checkpoint is complete when this exists


def load_checkpoint(path: Path, model, opt, gen: torch.Generator) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = opt.state_dict()
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            sd["state"].setdefault(int(i), {})[k] = v
    opt.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.gen"])
    return json.loads((path / "state.json").read_text())


# --------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def zero_shot_table(model, tokenizer, pool: CaptionedPool, args, max_images: int | None) -> dict:
    from hf_cft.models import build_zeroshot_classifier, clip_logits, image_features

    model.eval()
    cache = args.cache_dir or str(hf_cft_cache_dir("decoded"))
    out = {}
    for name, info in pool.tasks.items():
        task = info["task"]
        test = task["test"] if max_images is None else task["test"].select(range(min(max_images, len(task["test"]))))
        im, lab = decode_split(test, args.image_size, cache, f"{name}-test")
        feats = torch.cat([image_features(model, normalize_batch(im[i : i + 512])) for i in range(0, len(im), 512)])
        row = {"chance": 100.0 / task.num_classes, "images": len(lab)}
        for key, templates in (("ensemble", task.templates), ("single", ["a photo of a {}."])):
            head = build_zeroshot_classifier(model, tokenizer, task.classnames, templates)
            row[key] = float((clip_logits(model, feats, head).argmax(-1) == lab).float().mean() * 100)
        out[name] = row
    model.train()
    return out


def plot_curve(curve_path: Path, png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in curve_path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "zeroshot" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([r["minutes"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    axes[0].set_xlabel("minutes")
    axes[0].set_ylabel("contrastive loss")
    axes[0].set_title("pretraining loss")
    for name in evals[0]["zeroshot"] if evals else []:
        axes[1].plot(
            [r["minutes"] for r in evals], [r["zeroshot"][name]["ensemble"] for r in evals], marker="o", label=name
        )
    axes[1].set_xlabel("minutes")
    axes[1].set_ylabel("zero-shot accuracy (%, test subset)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main


def main(args: PretrainArguments, end_process_group: bool = False) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import broadcast

    out = Path(os.path.expanduser(args.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    if args.report_to not in ("none", "tensorboard"):
        raise SystemExit(f"--report_to must be 'none' or 'tensorboard', got {args.report_to!r}")
    tracking = args.report_to == "tensorboard"
    accelerator = Accelerator(log_with="tensorboard" if tracking else None, project_dir=str(out / "runs"))
    procs, rank, main_process = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if args.batch_size % procs:
        raise SystemExit(
            f"--batch_size {args.batch_size} (the global batch) must be divisible by the {procs} processes"
        )
    local = args.batch_size // procs
    if tracking:
        accelerator.init_trackers("pretrain_clip", config={k: str(v) for k, v in asdict(args).items()})
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(args)
    with accelerator.main_process_first():  # the main process decodes and caches the images, the others read them
        pool = CaptionedPool(args, tokenizer)
    model = build_model(args, tokenizer)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(args.seed)
    aug = BatchAugment(
        shift=max(1, args.image_size // 16),
        degrade_prob=args.degrade_prob,
        crop_scale=(args.crop_min, 1.0),
        grayscale_prob=args.grayscale_prob,
        blur_sigma=(args.blur_min, args.blur_max),
        noise=args.noise,
    )
    state = {
        "step": 0,
        "images": 0,
        "elapsed": 0.0,
        "order_pos": 0,
        "epoch": 0,
        "last_eval": 0.0,
        "args": asdict(args),
    }
    ckpt = out / "checkpoint"
    if args.resume and (ckpt / "state.json").is_file():
        state = load_checkpoint(ckpt, model, opt, gen)
        accelerator.print(f"resumed at step {state['step']} ({state['elapsed'] / 60:.1f} min done)")
    model, opt = accelerator.prepare(model, opt)
    budget = args.max_minutes * 60
    n = len(pool)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + state["epoch"]))
    curve = (out / "curve.jsonl").open("a") if main_process else None
    n_params = sum(p.numel() for p in model.parameters())
    accelerator.print(
        f"pretraining pool: {n} images from {len(args.datasets)} datasets; model {n_params:,} parameters; "
        f"{procs} process(es) x {local} images per step"
    )
    # the bar counts what ends the run: steps with --max_steps, else seconds of the time budget
    by_steps = bool(args.max_steps)
    bar = tqdm(
        total=args.max_steps if by_steps else int(budget),
        initial=state["step"] if by_steps else int(state["elapsed"]),
        unit="step" if by_steps else "s",
        disable=not main_process,
    )
    t_start, elapsed0, last_save = time.perf_counter(), state["elapsed"], time.perf_counter()

    def clock() -> float:
        """Seconds of training so far, by the main process's clock on every process: the stop decision, the
        time-based schedule and the evaluation times must agree (or the processes would diverge or deadlock)."""
        value = elapsed0 + time.perf_counter() - t_start
        if procs == 1:
            return value
        return float(broadcast(torch.tensor([value], dtype=torch.float64, device=accelerator.device)).item())

    window = []
    loss = torch.zeros(())
    model.train()
    interrupted = False
    while True:
        elapsed = clock()
        if (args.max_steps and state["step"] >= args.max_steps) or (not args.max_steps and elapsed >= budget):
            break
        if args.stop_after_steps and state["step"] >= args.stop_after_steps:
            interrupted = True
            break
        if state["order_pos"] + args.batch_size > n:
            state["epoch"] += 1
            state["order_pos"] = 0
            order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + state["epoch"]))
        idx = order[state["order_pos"] : state["order_pos"] + args.batch_size]
        state["order_pos"] += args.batch_size
        t0 = time.perf_counter()
        # the whole global batch's random draws on every process (the generator stays in step), then this
        # process's contiguous share
        views = aug(pool.images[idx].float().div_(255.0), gen, return_info=True)
        pixels = normalize_batch((views[0] * 255.0).round().clamp_(0, 255))
        ids, mask = pool.caption_ids(idx, gen, views[1] if args.describe_views else None)
        mine = slice(rank * local, (rank + 1) * local)
        progress = state["step"] / args.max_steps if args.max_steps else elapsed / budget
        for group in opt.param_groups:
            group["lr"] = lr_at(state["step"], progress, args)
        with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            outputs = model(
                input_ids=ids[mine].to(accelerator.device),
                attention_mask=mask[mine].to(accelerator.device),
                pixel_values=pixels[mine].to(accelerator.device),
            )
        scale = accelerator.unwrap_model(model).logit_scale.exp().float()
        loss = contrastive_loss(outputs.image_embeds, outputs.text_embeds, scale, procs, rank)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        with torch.no_grad():
            accelerator.unwrap_model(model).logit_scale.clamp_(0, math.log(100))
        state["step"] += 1
        state["images"] += len(idx)
        window.append((len(idx), time.perf_counter() - t0))
        state["elapsed"] = elapsed0 + time.perf_counter() - t_start
        bar.update((state["step"] if by_steps else int(state["elapsed"])) - bar.n)
        if state["step"] % 20 == 0:
            ips = sum(a for a, _ in window) / sum(b for _, b in window)
            window = []
            global_loss = float(accelerator.reduce(loss.detach(), "mean"))  # = the loss of the global batch
            rec = {
                "step": state["step"],
                "minutes": state["elapsed"] / 60,
                "loss": global_loss,
                "images_per_s": ips,
                "lr": opt.param_groups[0]["lr"],
                "epoch": state["epoch"],
            }
            if main_process:
                curve.write(json.dumps(rec) + "\n")
                curve.flush()
            if tracking:
                accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=state["step"])
            bar.set_postfix(loss=f"{global_loss:.3f}", ips=f"{ips:.0f}")
        if args.eval_every_minutes and elapsed - state["last_eval"] >= args.eval_every_minutes * 60:
            state["last_eval"] = elapsed
            if main_process:  # the others wait in the next step's gradient all-reduce
                table = zero_shot_table(accelerator.unwrap_model(model), tokenizer, pool, args, args.eval_images)
                curve.write(json.dumps({"step": state["step"], "minutes": elapsed / 60, "zeroshot": table}) + "\n")
                curve.flush()
                if tracking:
                    accelerator.log({f"zeroshot/{k}": v["ensemble"] for k, v in table.items()}, step=state["step"])
        if time.perf_counter() - last_save >= args.save_every_minutes * 60 and main_process:
            save_checkpoint(ckpt, accelerator.unwrap_model(model), opt, state, gen)
            last_save = time.perf_counter()
    bar.close()
    final_loss = float(accelerator.reduce(loss.detach().float().to(accelerator.device), "mean"))
    final = accelerator.unwrap_model(model)
    if interrupted:
        if main_process:
            save_checkpoint(ckpt, final, opt, state, gen)
            curve.close()
        _finish(accelerator, end_process_group)
        return ckpt
    if main_process:
        table = zero_shot_table(final, tokenizer, pool, args, None)
        curve.write(json.dumps({"step": state["step"], "minutes": state["elapsed"] / 60, "zeroshot": table}) + "\n")
        curve.close()
        save_checkpoint(ckpt, final, opt, state, gen)
        _save_model(final, tokenizer, args, out / "model")
        summary = {
            "zeroshot": table,
            "steps": state["step"],
            "final_loss": final_loss,
            "images_seen": state["images"],
            "minutes": state["elapsed"] / 60,
            "images_per_s": state["images"] / max(state["elapsed"], 1e-9),
            "parameters": n_params,
            "pool_images": n,
            "processes": procs,
            "args": asdict(args),
        }
        atomic_write_json(out / "zeroshot.json", summary)
        plot_curve(out / "curve.jsonl", out / "curve.png")
        accelerator.print(
            f"\n{state['step']} steps, {state['images']:,} images, {state['elapsed'] / 60:.1f} min, "
            f"{summary['images_per_s']:.0f} images/s"
        )
        accelerator.print("| dataset | zero-shot (ensemble) | zero-shot ('a photo of a {}.') | chance |")
        accelerator.print("|---|---|---|---|")
        for name, r in table.items():
            accelerator.print(f"| {name} | {r['ensemble']:.1f} | {r['single']:.1f} | {r['chance']:.1f} |")
        accelerator.print(f"model: {out / 'model'}")
    _finish(accelerator, end_process_group)  # the model folder is complete before any process returns its path
    return out / "model"


def _finish(accelerator, end_process_group: bool) -> None:
    """Every process waits for the others, then the trackers stop. Run as a script (``end_process_group``), the
    process group is destroyed too: left to interpreter exit, gloo's teardown can abort a process (SIGABRT) after
    its work was written. Called in-process (the MergeTune demo pretrains its CLIP, then trains in the same
    processes), the group stays for the caller."""
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()
    if end_process_group:
        accelerator.end_training()


def _save_model(model, tokenizer, args: PretrainArguments, path: Path):
    """Model, tokenizer and image processor written into a fresh folder that then replaces ``path`` by a rename:
    a reader (e.g. another job checking a cache) sees the old folder, none, or the whole new one."""
    import shutil
    import tempfile

    from transformers import CLIPImageProcessor

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        CLIPImageProcessor(
            size={"shortest_edge": args.image_size}, crop_size={"height": args.image_size, "width": args.image_size}
        ).save_pretrained(str(tmp))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    (pretrain_args,) = parse_recipe_args(PretrainArguments)
    with user_errors():
        main(pretrain_args, end_process_group=True)

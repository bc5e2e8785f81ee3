"""Cost of one MergeTune training step (N_α = 5) relative to one CoOp step on the same batch, and relative to a
naive implementation that re-encodes the images for every α point (as the released code does).

    python benchmarks/mergetune_step_cost.py                     # ViT-B/16-shaped CLIP, random weights, 224 px
    python benchmarks/mergetune_step_cost.py --shape small       # the small benchmark CLIP shape (32 px)

Medians over ``--repeats`` alternating repetitions of forward + backward (+ optimiser step), measured in one
run; the ratios are the numbers to quote. Writes benchmarks/results/mergetune_step_cost[-small].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peft import get_peft_model  # noqa: E402

from hf_cft import CoOpConfig  # noqa: E402
from hf_cft.models import image_features  # noqa: E402
from hf_cft.models.tokenizer import train_clip_tokenizer  # noqa: E402
from hf_cft.trainers import (  # noqa: E402
    ClipClassificationTrainer,
    ClipTrainingArguments,
    MergeTuneConfig,
    MergeTuneTrainer,
)
from hf_cft.trainers.mergetune_losses import interpolate_text  # noqa: E402


def build(shape: str, classes: list[str]):
    from transformers import CLIPModel

    from hf_cft.testing import clip_vit_b16_config, tiny_clip_config

    tok = train_clip_tokenizer([f"a photo of a {c}." for c in classes] + ["X"], vocab_size=1024)
    if shape == "vit-b16":
        cfg = clip_vit_b16_config()
        cfg.text_config.vocab_size = len(tok)
        size = 224
    else:
        cfg = tiny_clip_config(
            vocab_size=len(tok), image_size=32, patch_size=8, hidden_size=128, projection_dim=128, num_layers=4
        )
        size = 32
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg.text_config, k, getattr(tok, k))
    torch.manual_seed(0)
    return CLIPModel(cfg).eval(), tok, size


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=["vit-b16", "small"], default="vit-b16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    a = p.parse_args(argv)
    classes = [f"class{i}" for i in range(a.classes)]
    model, tok, size = build(a.shape, classes)
    out_dir = a.out / "_tmp_step_cost"
    coop = get_peft_model(model, CoOpConfig(ctx_init="a photo of a").set_tokenizer(tok))
    coop.save_pretrained(str(out_dir / "ft"))
    kw = dict(output_dir=str(out_dir), report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    t_coop = ClipClassificationTrainer(coop, ClipTrainingArguments(**kw), classes, ["a photo of a {}."], tok)
    t_mt = MergeTuneTrainer(
        coop, MergeTuneConfig(**kw, tau=1.0), classes, ["a photo of a {}."], tok, finetuned=str(out_dir / "ft")
    )
    g = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(a.batch, 3, size, size, generator=g),
        "labels": torch.randint(0, a.classes, (a.batch,), generator=g),
    }
    device = t_mt.args.device
    batch = {k: v.to(device) for k, v in batch.items()}
    cuda = device.type == "cuda"
    params = [q for q in coop.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    inputs = t_coop._text_inputs(train=True)

    def naive_step():  # the released code: image features recomputed for every α (and for the task term)
        text = t_mt.model.class_head(inputs["input_ids"], inputs["attention_mask"], 1, None, inputs.get("ctx_mask"))
        s = t_mt.scale
        loss = F.cross_entropy(s * image_features(coop, batch["pixel_values"]) @ text.t(), batch["labels"])
        loss = loss + 8.0 * (1 - F.cosine_similarity(text, t_mt.text_zs).mean())
        for alpha in (0.1, 0.3, 0.5, 0.7, 0.9):
            ta = interpolate_text(t_mt.text_ft, text, alpha)
            img = image_features(coop, batch["pixel_values"])
            loss = loss + 0.5 / 5 * F.cross_entropy(s * img @ ta.t(), batch["labels"])
        return loss

    steps = {
        "coop": lambda: t_coop.compute_loss(t_coop.model, batch),
        "mergetune": lambda: t_mt.compute_loss(t_mt.model, batch),
        "naive_mergetune": naive_step,
    }
    times = {k: [] for k in steps}
    peak = dict.fromkeys(steps, 0)
    t_coop.model.train()
    t_mt.model.train()
    for r in range(a.repeats + 1):
        for name, fn in steps.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
            if r:  # first round is warm-up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "shape": a.shape,
        "batch": a.batch,
        "classes": a.classes,
        "num_alphas": 5,
        "repeats": a.repeats,
        "median_seconds": med,
        "ratio_mergetune_vs_coop": med["mergetune"] / med["coop"],
        "ratio_naive_vs_coop": med["naive_mergetune"] / med["coop"],
        "peak_gpu_memory_mib": {k: v / 2**20 for k, v in peak.items()} if cuda else None,
        "machine": {
            "platform": platform.platform(),
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "threads": torch.get_num_threads(),
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    stem = "mergetune_step_cost" + ("-small" if a.shape == "small" else "") + ("-gpu" if cuda else "")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# MergeTune step cost ({a.shape}, batch {a.batch}, {a.classes} classes, N_α = 5)",
        "",
        f"Measured in one run on {result['machine']['platform']} ({result['machine']['threads']} threads, "
        f"{result['machine']['gpu'] or 'no GPU'}), medians of {a.repeats} repetitions.",
        "",
        "| step | median (s) | × CoOp step | peak GPU memory (MiB) |",
        "|---|---|---|---|",
    ]
    for k in steps:
        mem = f"{peak[k] / 2**20:.0f}" if cuda else "n/a (CPU)"
        lines.append(f"| {k} | {med[k]:.4f} | {med[k] / med['coop']:.2f} | {mem} |")
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

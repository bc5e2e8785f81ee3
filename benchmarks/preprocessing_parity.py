"""Preprocessing parity: hf_cft's ``ImageTransform`` against each transformers image processor class.

    python benchmarks/preprocessing_parity.py       # writes benchmarks/results/preprocessing_parity.{json,md}

Every processor is built from a config dict (no Hub): the PIL backend classes (``CLIPImageProcessorPil``, ...),
the reference (see docs/preprocessing.md). The same random images go through the processor and through
``ImageTransform.from_processor(processor)``: sizes from 1x1 to 1000 pixels, very elongated ones (3x200, 640x17),
modes RGB, L, RGBA, LA, P with transparency, CMYK, 1, 16-bit (``I;16``, ``I``), float (``F``) and uint8 arrays.
Columns: the largest |Δ| of ``pixel_values`` over the 8-bit inputs; over the 16-bit / float inputs with
``high_bit_depth="clip"`` (the processor's own conversion, exact parity) and with the default ``"scale"``
(compared with the processor on the 8-bit image hf_cft maps them to; against the processor on the raw 16-bit
image this differs by design, the "16-bit scale vs raw" column); whether ``spatial_shapes`` and
``pixel_attention_mask`` are identical (NaFlex only). When torchvision imports, ``--torchvision`` adds the largest |Δ|
against the default (torchvision) backend of the same config, which is not the reference.

A results file whose rows hold a column this run does not compute (the torchvision one, without ``--torchvision``)
is never overwritten: the script stops with the reason before any work (``--out DIR`` writes elsewhere).

``tests/test_preprocessing.py`` runs the same cases and asserts max |Δ| ≤ 1e-5 and identical masks / shapes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

OPENAI = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
HALF = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
RESCALE = {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}

# name -> (PIL-backend class, config dict as in a preprocessor_config.json)
PROCESSORS = {
    "CLIPImageProcessor (CLIP ViT-B/16: shortest_edge 224, crop 224)": (
        "CLIPImageProcessorPil",
        {
            "size": {"shortest_edge": 224},
            "crop_size": {"height": 224, "width": 224},
            "do_resize": True,
            "do_center_crop": True,
            "do_convert_rgb": True,
            "resample": 3,
            **RESCALE,
            **OPENAI,
        },
    ),
    "CLIPImageProcessor (MetaCLIP-style legacy config: size 224, crop_size 224)": (
        "CLIPImageProcessorPil",
        {"size": 224, "crop_size": 224, "do_resize": True, "do_center_crop": True, "resample": 3, **OPENAI},
    ),
    "CLIPImageProcessor (crop larger than the resize: zero padding)": (
        "CLIPImageProcessorPil",
        {"size": {"shortest_edge": 160}, "crop_size": {"height": 192, "width": 176}, "resample": 2, **OPENAI},
    ),
    "ChineseCLIPImageProcessor (shortest_edge 224, crop 224)": ("ChineseCLIPImageProcessorPil", {**OPENAI}),
    "SiglipImageProcessor (SigLIP so400m-patch14-384: squash to 384)": (
        "SiglipImageProcessorPil",
        {"size": {"height": 384, "width": 384}, "resample": 3, "do_resize": True, **RESCALE, **HALF},
    ),
    "Siglip2ImageProcessor (NaFlex: 256 patches of 16)": (
        "Siglip2ImageProcessorPil",
        {"patch_size": 16, "max_num_patches": 256, "resample": 2, "do_resize": True, **RESCALE, **HALF},
    ),
    "Siglip2ImageProcessor (NaFlex: 64 patches of 14)": (
        "Siglip2ImageProcessorPil",
        {"patch_size": 14, "max_num_patches": 64, "resample": 2, **RESCALE, **HALF},
    ),
}

SIZES = [(1, 1), (2, 3), (7, 5), (3, 200), (640, 17), (1000, 999), (224, 224), (225, 313), (420, 300), (300, 420)]
MODES_8BIT = ("RGB", "L", "RGBA", "LA", "P", "CMYK", "1", "array")
MODES_HIGH = ("I;16", "I", "F")


def processor(name: str, backend: str = "pil"):
    """The processor of ``PROCESSORS[name]``: the PIL backend class, or (``backend="torchvision"``) the default
    class of the same config. Always with ``do_convert_rgb=True`` (SigLIP2 configs leave it unset, and the
    processor then fails on any non-RGB image; hf_cft always converts, as the other processors do)."""
    import transformers

    cls_name, cfg = PROCESSORS[name]
    cls = getattr(transformers, cls_name if backend == "pil" else cls_name[: -len("Pil")])
    return cls.from_dict({**cfg, "do_convert_rgb": True})


def images(seed: int = 0, n_random: int = 6) -> list[tuple[str, object]]:
    """``(description, image)`` pairs: every mode at the fixed ``SIZES`` (rotating through them), plus
    ``n_random`` RGB images of random sizes (8..600 pixels a side)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    modes = MODES_8BIT + MODES_HIGH
    for i, (w, h) in enumerate(SIZES * 2):
        mode = modes[i % len(modes)]
        if mode == "array":
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif mode == "P":
            img = rgb(w, h).convert("P", palette=Image.Palette.ADAPTIVE)
            img.info["transparency"] = int(np.asarray(img)[0, 0])  # one palette entry transparent
        elif mode in ("RGBA", "LA"):
            img = rgb(w, h).convert(mode)
            img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        elif mode == "I;16":
            img = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
        elif mode == "I":
            img = Image.fromarray(rng.integers(-100, 70000, (h, w)).astype(np.int32))
        elif mode == "F":
            img = Image.fromarray(rng.random((h, w)).astype(np.float32))
        else:
            img = rgb(w, h).convert(mode)
        out.append((f"{mode} {w}x{h}", img))
    for _ in range(n_random):
        w, h = (int(v) for v in rng.integers(8, 601, 2))
        out.append((f"RGB {w}x{h}", rgb(w, h)))
    return out


def _delta(ours: dict, ref) -> tuple[float, bool | None]:
    """(max |Δ| of pixel_values, masks and shapes identical or ``None`` where the processor gives none) of one image
    (``ref``: the processor's batch of 1)."""
    theirs = torch.as_tensor(np.asarray(ref["pixel_values"][0]))
    mine = ours["pixel_values"]
    keys = [k for k in ("pixel_attention_mask", "spatial_shapes") if k in ref]
    same = all(torch.equal(ours[k], torch.as_tensor(np.asarray(ref[k][0])).to(ours[k].dtype)) for k in keys)
    if mine.shape != theirs.shape:
        return float("inf"), False
    return (mine.double() - theirs.double()).abs().max().item(), (same if keys else None)


def _both(a: bool | None, b: bool | None) -> bool | None:
    return None if a is None and b is None else (a is not False and b is not False)


BASE_COLUMNS = (
    "images",
    "max_abs_8bit",
    "max_abs_high_clip",
    "max_abs_high_scale",
    "max_abs_high_scale_vs_raw",
    "masks_equal",
    "worst",
)
TORCHVISION_COLUMNS = ("max_abs_torchvision",)


def columns(torchvision: bool) -> tuple[str, ...]:
    """The columns (keys of a row) a run computes: the torchvision one only with ``--torchvision``."""
    return BASE_COLUMNS + (TORCHVISION_COLUMNS if torchvision else ())


def check_overwrite(out: Path, torchvision: bool) -> None:
    """Refuse (``SystemExit`` with the reason) to replace ``out/preprocessing_parity.json`` when its rows hold columns
    this run cannot compute, e.g. the committed results' torchvision column in a run without ``--torchvision``: the
    rewrite would silently drop them. ``--torchvision`` without torchvision installed is refused too."""
    if torchvision:
        try:
            __import__("torchvision")
        except ImportError:
            raise SystemExit(
                "preprocessing_parity: --torchvision needs torchvision, which is not installed here "
                "(pip install torchvision), or run without --torchvision into another --out folder."
            ) from None
    file = out / "preprocessing_parity.json"
    if not file.is_file():
        return
    try:
        rows = json.loads(file.read_text(encoding="utf-8")).get("rows", {})
        have = {key for row in rows.values() for key in row}
    except (ValueError, AttributeError):
        raise SystemExit(
            f"preprocessing_parity: {file} exists but is not a results file of this script; it is left as it is. "
            "Write elsewhere with --out DIR."
        ) from None
    lost = sorted(have - set(columns(torchvision)))
    if lost:
        hint = (
            "pass --torchvision"
            if "max_abs_torchvision" in lost and importlib.util.find_spec("torchvision") is not None
            else "install torchvision and pass --torchvision"
            if "max_abs_torchvision" in lost
            else "run the script version that wrote them"
        )
        raise SystemExit(
            f"preprocessing_parity: refusing to overwrite {file}: it has column(s) {', '.join(lost)} that this run "
            f"cannot compute, and rewriting it would drop them. To keep them, {hint}; or write elsewhere with "
            "--out DIR."
        )


def parity_row(name: str, imgs: list, torchvision: bool = False) -> dict:
    """One row of the table: the processor ``name`` against ``ImageTransform.from_processor`` on ``imgs``."""
    from hf_cft.data.transforms import ImageTransform, to_rgb

    proc = processor(name)
    default = ImageTransform.from_processor(proc)
    clip = ImageTransform.from_processor(proc, high_bit_depth="clip")
    tv = processor(name, "torchvision") if torchvision else None
    row = dict.fromkeys(columns(torchvision), 0.0) | {"images": len(imgs), "masks_equal": None, "worst": None}
    worst = -1.0
    for desc, img in imgs:
        high = getattr(img, "mode", "") in MODES_HIGH
        d, same = _delta(default.inputs(img), proc(images=[img], return_tensors="np"))
        if high:
            row["max_abs_high_scale_vs_raw"] = max(row["max_abs_high_scale_vs_raw"], d)
            d, same = _delta(default.inputs(img), proc(images=[to_rgb(img)], return_tensors="np"))
            row["max_abs_high_scale"] = max(row["max_abs_high_scale"], d)
            d2, same2 = _delta(clip.inputs(img), proc(images=[img], return_tensors="np"))
            row["max_abs_high_clip"] = max(row["max_abs_high_clip"], d2)
            same, d = _both(same, same2), max(d, d2)
        else:
            row["max_abs_8bit"] = max(row["max_abs_8bit"], d)
        row["masks_equal"] = _both(row["masks_equal"], same)
        if d > worst:
            worst, row["worst"] = d, desc
        if tv is not None and not high:
            dt, _ = _delta(default.inputs(img), tv(images=[img], return_tensors="pt"))
            row["max_abs_torchvision"] = max(row["max_abs_torchvision"], dt)
    return row


def table(rows: dict) -> list[str]:
    tv = any("max_abs_torchvision" in r for r in rows.values())
    head = "| processor (config) | images | max \\|Δ\\| 8-bit | max \\|Δ\\| 16-bit/float, `clip` | "
    head += "max \\|Δ\\| 16-bit/float, `scale` | masks, shapes equal |"
    head += " max \\|Δ\\| vs torchvision backend |" if tv else ""
    lines = [head, "|---|---|---|---|---|---|" + ("---|" if tv else "")]
    for name, r in rows.items():
        line = f"| {name} | {r['images']} | {r['max_abs_8bit']:.2e} | {r['max_abs_high_clip']:.2e} | "
        masks = {True: "yes", False: "NO", None: "— (none)"}[r["masks_equal"]]
        line += f"{r['max_abs_high_scale']:.2e} | {masks} |"
        line += f" {r['max_abs_torchvision']:.3f} |" if tv else ""
        lines.append(line)
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for preprocessing_parity.{json,md}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-images", type=int, default=6, help="extra RGB images of random sizes")
    ap.add_argument("--torchvision", action="store_true", help="also compare with the torchvision backend")
    args = ap.parse_args(argv)
    out = Path(args.out)
    check_overwrite(out, args.torchvision)  # before any work: never compute what cannot be written
    import transformers
    from PIL import Image

    import hf_cft
    from hf_cft.utils import atomic_write_bytes, atomic_write_json

    imgs = images(args.seed, args.random_images)
    rows = {name: parity_row(name, imgs, args.torchvision) for name in PROCESSORS}
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "versions": {
            "hf_cft": hf_cft.__version__,
            "transformers": transformers.__version__,
            "Pillow": Image.__version__,
            "torch": torch.__version__,
        },
        "images": [d for d, _ in imgs],
        "rows": rows,
    }
    if args.torchvision:
        result["versions"]["torchvision"] = __import__("torchvision").__version__
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "preprocessing_parity.json", result)
    lines = [f"# Preprocessing parity (transformers {transformers.__version__}, PIL backend)", "", *table(rows)]
    atomic_write_bytes(out / "preprocessing_parity.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()

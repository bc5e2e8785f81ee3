"""Convert an open_clip checkpoint (state dict + model config) to transformers' ``CLIPModel``.

open_clip's standard CLIP (``open_clip.CLIP``, and ``CustomTextCLIP`` with the built-in text transformer) has the
layout of OpenAI's CLIP: a ViT image tower (``visual.conv1``, ``visual.class_embedding``, ``visual.transformer
.resblocks.N`` with fused ``attn.in_proj_weight``, ``visual.ln_post``, ``visual.proj``) and a causal text
transformer (``token_embedding``, ``positional_embedding``, ``transformer.resblocks.N``, ``ln_final``,
``text_projection``), pooled at the end-of-text token. That maps weight for weight onto ``CLIPModel``; this module
does the mapping, checks that every tensor is used and every shape fits, and refuses with
:class:`~hf_cft.errors.UnsupportedArchitectureError` (naming the architecture) whatever ``CLIPModel`` cannot
compute: timm towers (ConvNeXt, ...), modified ResNets, Hugging Face text towers (XLM-R, ...), CoCa, SigLIP-style
towers (logit bias, last-token pooling, bidirectional text), attentional pooling, layer scale, QK-norm and the
other custom attention blocks.

``open_clip`` itself is needed only to name a built-in model config (``"ViT-B-16"``) or to take the tokenizer's
BPE file from the package; the conversion reads plain tensors and a config dict (``pip install hf-cft[open_clip]``).

Example::

    from hf_cft.models import convert_open_clip

    model = convert_open_clip("open_clip_model.safetensors", "open_clip_config.json", save_directory="clip-hf")
    # clip-hf/ now loads with CLIPModel.from_pretrained, AutoTokenizer and AutoImageProcessor, and with every
    # hf_cft recipe (--model_name_or_path clip-hf)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hf_cft.errors import UnsupportedArchitectureError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}  # PIL codes, as image processors store them

# Vision / text config keys whose non-default value changes the computation in a way CLIPModel cannot follow:
# key -> (default, what the architecture is called in the error)
_TOWER_UNSUPPORTED = {  # either tower
    "ls_init_value": (None, "layer scale"),
    "act_kwargs": (None, "custom activation arguments"),
    "qk_norm": (False, "QK-norm attention"),
    "scaled_cosine_attn": (False, "scaled cosine attention"),
    "scale_heads": (False, "per-head attention scales"),
    "scale_attn_inner": (False, "inner attention LayerNorm"),
    "scale_attn": (False, "post-attention LayerNorm"),
    "scale_fc": (False, "MLP LayerNorm"),
}
_VISION_UNSUPPORTED = {
    "attentional_pool": (False, "attentional pooling (CoCa-style image tower)"),
    "pos_embed_type": ("learnable", "fixed sin-cos position embeddings"),
    "no_ln_pre": (False, "an image tower without ln_pre"),
    "pool_type": ("tok", "image pooling other than the class token"),
    **_TOWER_UNSUPPORTED,
}
_TEXT_UNSUPPORTED = {
    "embed_cls": (False, "a text class token (CoCa)"),
    "no_causal_mask": (False, "a bidirectional text tower (SigLIP-style)"),
    "proj_bias": (False, "a text projection with bias"),
    "proj_type": ("linear", "a text projection other than linear"),
    **_TOWER_UNSUPPORTED,
}


def read_open_clip_config(config: str | os.PathLike | Mapping) -> tuple[dict, dict]:
    """``(model_cfg, preprocess_cfg)`` from an open_clip config: a dict, a JSON file (a model config such as
    ``ViT-B-16.json``, or a Hub repo's ``open_clip_config.json`` with ``model_cfg`` / ``preprocess_cfg``), or the
    name of one of open_clip's built-in configs (needs ``open_clip``)."""
    if isinstance(config, Mapping):
        data = dict(config)
    else:
        path = Path(config)
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UnsupportedArchitectureError(
                    f"open_clip config {str(path)!r} is not readable JSON: {exc}"
                ) from exc
        else:
            data = _builtin_config(str(config))
    if not isinstance(data, dict):
        raise UnsupportedArchitectureError(f"open_clip config must be a JSON object, got {type(data).__name__}")
    model_cfg = data.get("model_cfg", data)
    preprocess = dict(data.get("preprocess_cfg") or {})
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise UnsupportedArchitectureError(
                f"open_clip config lacks {key!r} (has {sorted(model_cfg)}); pass a model config such as "
                "open_clip's ViT-B-16.json or a Hub repo's open_clip_config.json"
            )
    return dict(model_cfg), preprocess


def _builtin_config(name: str) -> dict:
    try:
        import open_clip
    except ImportError:
        raise UnsupportedArchitectureError(
            f"{name!r} is neither a JSON file nor a dict; naming one of open_clip's built-in model configs needs "
            "open_clip (pip install 'hf-cft[open_clip]'), or pass the config JSON"
        ) from None
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise UnsupportedArchitectureError(f"open_clip has no model config named {name!r}")
    return cfg


def check_open_clip_architecture(model_cfg: Mapping) -> None:
    """Raise :class:`~hf_cft.errors.UnsupportedArchitectureError` naming the first feature of ``model_cfg`` that
    ``CLIPModel`` cannot compute; return quietly for a standard ViT CLIP."""
    vision, text = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    if "multimodal_cfg" in model_cfg:
        raise UnsupportedArchitectureError("CoCa (open_clip config with 'multimodal_cfg') has no CLIPModel equivalent")
    if model_cfg.get("init_logit_bias") is not None:
        raise UnsupportedArchitectureError(
            "a SigLIP-style open_clip model (init_logit_bias: sigmoid loss with a logit bias); CLIPModel has no bias"
        )
    if vision.get("timm_model_name"):
        raise UnsupportedArchitectureError(
            f"image tower timm_model_name={vision['timm_model_name']!r} (a timm backbone such as ConvNeXt) has no "
            "CLIPModel equivalent; only open_clip's own ViT tower converts"
        )
    if isinstance(vision.get("layers"), (list, tuple)):
        raise UnsupportedArchitectureError(
            f"image tower with layers={list(vision['layers'])} is a modified ResNet (RN50-style), not a ViT"
        )
    if text.get("hf_model_name"):
        raise UnsupportedArchitectureError(
            f"text tower hf_model_name={text['hf_model_name']!r} (a Hugging Face text encoder) has no CLIPModel "
            "equivalent; only open_clip's own text transformer converts"
        )
    for cfg, table, tower in ((vision, _VISION_UNSUPPORTED, "image"), (text, _TEXT_UNSUPPORTED, "text")):
        for key, (default, what) in table.items():
            value = cfg.get(key, default)
            if value not in (default, None):
                raise UnsupportedArchitectureError(
                    f"{tower} tower with {key}={value!r} ({what}) has no CLIPModel equivalent"
                )
    if vision.get("block_type", "default") not in (None, "default") or text.get("block_type", "default") not in (
        None,
        "default",
    ):
        raise UnsupportedArchitectureError(
            "custom attention blocks (block_type='custom') have no CLIPModel equivalent"
        )
    if text.get("pool_type", "argmax") not in ("argmax", "eos"):
        raise UnsupportedArchitectureError(
            f"text pooling pool_type={text['pool_type']!r}; CLIPModel pools the end-of-text token (argmax / eos)"
        )
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)) and len(set(size)) != 1:
        raise UnsupportedArchitectureError(f"non-square image_size={list(size)}; CLIPModel takes square images")
    patch = vision.get("patch_size", 16)
    if isinstance(patch, (list, tuple)) and len(set(patch)) != 1:
        raise UnsupportedArchitectureError(f"non-square patch_size={list(patch)}; CLIPModel takes square patches")


def _square(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def open_clip_to_clip_config(model_cfg: Mapping):
    """The ``CLIPConfig`` of an open_clip model config (after :func:`check_open_clip_architecture`).

    The end-of-text token: ``pool_type="eos"`` uses ``text_cfg["eos_id"]``; the default ``"argmax"`` pools the
    highest id, which for CLIP-style vocabularies is the end-of-text token ``vocab_size - 1``, so the config names
    that id (the same position whenever the sequence holds its end-of-text token, as every tokenised prompt does).
    """
    from transformers import CLIPConfig

    check_open_clip_architecture(model_cfg)
    vision, text = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    embed_dim = int(model_cfg["embed_dim"])
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    v_width, t_width = int(vision.get("width", 768)), int(text.get("width", 512))
    head_width = int(vision.get("head_width", 64))
    if v_width % head_width:
        raise UnsupportedArchitectureError(f"image width {v_width} is not a multiple of head_width {head_width}")
    vocab = int(text.get("vocab_size", 49408))
    eos = int(text.get("eos_id", 2)) if text.get("pool_type", "argmax") == "eos" else vocab - 1
    text_eps = float((text.get("norm_kwargs") or {}).get("eps", 1e-5))
    vision_eps = float((vision.get("norm_kwargs") or {}).get("eps", 1e-5))
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=t_width,
            intermediate_size=int(t_width * float(text.get("mlp_ratio", 4.0))),
            num_attention_heads=int(text.get("heads", 8)),
            num_hidden_layers=int(text.get("layers", 12)),
            max_position_embeddings=int(text.get("context_length", 77)),
            hidden_act=act,
            layer_norm_eps=text_eps,
            bos_token_id=vocab - 2,
            eos_token_id=eos,
            pad_token_id=eos,
            projection_dim=embed_dim,
        ),
        vision_config=dict(
            hidden_size=v_width,
            intermediate_size=int(v_width * float(vision.get("mlp_ratio", 4.0))),
            num_attention_heads=v_width // head_width,
            num_hidden_layers=int(vision.get("layers", 12)),
            image_size=_square(vision.get("image_size", 224)),
            patch_size=_square(vision.get("patch_size", 16)),
            hidden_act=act,
            layer_norm_eps=vision_eps,
            projection_dim=embed_dim,
        ),
        projection_dim=embed_dim,
    )


def _layer_map(src: str, dst: str, n_layers: int) -> dict[str, str]:
    """open_clip resblock parameter names -> CLIPModel encoder layer names (the fused in_proj is split later)."""
    pairs = {
        "ln_1.weight": "layer_norm1.weight",
        "ln_1.bias": "layer_norm1.bias",
        "attn.out_proj.weight": "self_attn.out_proj.weight",
        "attn.out_proj.bias": "self_attn.out_proj.bias",
        "ln_2.weight": "layer_norm2.weight",
        "ln_2.bias": "layer_norm2.bias",
        "mlp.c_fc.weight": "mlp.fc1.weight",
        "mlp.c_fc.bias": "mlp.fc1.bias",
        "mlp.c_proj.weight": "mlp.fc2.weight",
        "mlp.c_proj.bias": "mlp.fc2.bias",
    }
    return {f"{src}.{i}.{a}": f"{dst}.{i}.{b}" for i in range(n_layers) for a, b in pairs.items()}


def convert_open_clip_state_dict(
    state_dict: Mapping[str, torch.Tensor], model_cfg: Mapping
) -> dict[str, torch.Tensor]:
    """Rename and reshape an open_clip CLIP state dict into ``CLIPModel``'s (every tensor used exactly once).

    Accepts ``CLIP`` keys (``token_embedding.weight``, ...), ``CustomTextCLIP`` keys (``text.token_embedding
    .weight``, ...), a training checkpoint's ``{"state_dict": ...}`` and DDP's ``module.`` prefix. Keys left over
    or missing raise :class:`~hf_cft.errors.UnsupportedArchitectureError` naming them.
    """
    check_open_clip_architecture(model_cfg)
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    sd = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith("text."):
            key = key[len("text.") :]  # CustomTextCLIP keeps its text tower under .text
        sd[key] = value
    n_vision = int(model_cfg["vision_cfg"].get("layers", 12))
    n_text = int(model_cfg["text_cfg"].get("layers", 12))
    names = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        **_layer_map("visual.transformer.resblocks", "vision_model.encoder.layers", n_vision),
        **_layer_map("transformer.resblocks", "text_model.encoder.layers", n_text),
    }
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise UnsupportedArchitectureError(
                f"open_clip state dict lacks {key!r} for the configured architecture (vision layers {n_vision}, "
                f"text layers {n_text}); is the config the checkpoint's?"
            )
        used.add(key)
        return sd[key]

    for src, dst in names.items():
        out[dst] = take(src)
    for src, dst in (
        ("visual.transformer.resblocks", "vision_model.encoder.layers"),
        ("transformer.resblocks", "text_model.encoder.layers"),
    ):
        for i in range(n_vision if src.startswith("visual") else n_text):
            w, b = take(f"{src}.{i}.attn.in_proj_weight"), take(f"{src}.{i}.attn.in_proj_bias")
            for part, ws, bs in zip(("q", "k", "v"), w.chunk(3, dim=0), b.chunk(3, dim=0)):
                out[f"{dst}.{i}.self_attn.{part}_proj.weight"] = ws
                out[f"{dst}.{i}.self_attn.{part}_proj.bias"] = bs
    out["visual_projection.weight"] = take("visual.proj").t()
    out["text_projection.weight"] = take("text_projection").t()
    out["logit_scale"] = take("logit_scale").reshape(())
    ignored = {"attn_mask", "visual.attn_mask"}  # causal-mask buffers of old checkpoints (rebuilt by CLIPModel)
    left = sorted(k for k in sd if k not in used and k not in ignored)
    if left:
        raise UnsupportedArchitectureError(
            f"open_clip state dict has {len(left)} tensor(s) CLIPModel has no place for, e.g. {left[:5]}: the "
            "checkpoint is not a standard ViT CLIP (or the config does not describe it)"
        )
    return {k: v.contiguous() for k, v in out.items()}


def _load_state_dict(checkpoint) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    if isinstance(checkpoint, torch.nn.Module):
        return checkpoint.state_dict()
    path = Path(checkpoint)
    if not path.is_file():
        from hf_cft.errors import MissingCheckpointError

        raise MissingCheckpointError(f"open_clip checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)  # tensors only: no pickled code runs


def image_processor_for(model_cfg: Mapping, preprocess_cfg: Mapping | None = None):
    """A ``CLIPImageProcessor`` doing open_clip's evaluation preprocessing (``preprocess_cfg``: size, mean, std,
    interpolation, ``resize_mode`` ``shortest`` (resize the short side, centre-crop) or ``squash``)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers without the PIL backends
        from transformers import CLIPImageProcessor as Processor

    pre = dict(preprocess_cfg or {})
    size = _square(pre.get("size", model_cfg["vision_cfg"].get("image_size", 224)))
    interpolation = pre.get("interpolation", "bicubic")
    mode = pre.get("resize_mode", "shortest")
    if interpolation not in _RESAMPLE:
        raise UnsupportedArchitectureError(
            f"preprocess_cfg interpolation={interpolation!r}; known {sorted(_RESAMPLE)}"
        )
    common = dict(
        image_mean=list(pre.get("mean", OPENAI_MEAN)),
        image_std=list(pre.get("std", OPENAI_STD)),
        resample=_RESAMPLE[interpolation],
    )
    if mode == "shortest":
        return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **common)
    if mode == "squash":
        return Processor(size={"height": size, "width": size}, do_center_crop=False, **common)
    raise UnsupportedArchitectureError(
        f"preprocess_cfg resize_mode={mode!r} (letterbox padding) has no CLIPImageProcessor equivalent; "
        "supported: shortest, squash"
    )


def convert_open_clip(
    checkpoint,
    config: str | os.PathLike | Mapping,
    save_directory: str | os.PathLike | None = None,
    *,
    bpe_path: str | os.PathLike | None = None,
):
    """Build a ``CLIPModel`` (eval mode) from an open_clip checkpoint and its model config.

    ``checkpoint``: a ``.safetensors`` / ``.bin`` / ``.pt`` file (``torch.load`` with ``weights_only=True``), a state
    dict, or an ``open_clip`` model. ``config``: see :func:`read_open_clip_config`. With ``save_directory`` the
    model (safetensors), an image processor doing open_clip's preprocessing and — for the standard 49,408-token
    vocabulary — the CLIP tokenizer (from ``bpe_path``, else the BPE file shipped with ``open_clip``) are written
    there in one atomic step, ready for ``CLIPModel.from_pretrained`` and every hf_cft recipe.

    Unsupported architectures raise :class:`~hf_cft.errors.UnsupportedArchitectureError` naming the architecture.
    """
    from transformers import CLIPModel

    model_cfg, preprocess_cfg = read_open_clip_config(config)
    clip_config = open_clip_to_clip_config(model_cfg)
    weights = convert_open_clip_state_dict(_load_state_dict(checkpoint), model_cfg)
    model = CLIPModel(clip_config)
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(weights) if not k.endswith("position_ids"))
    wrong = [
        (k, tuple(weights[k].shape), tuple(expected[k].shape))
        for k in weights
        if k in expected and weights[k].shape != expected[k].shape
    ]
    if missing or wrong:
        detail = f"missing {missing[:5]}" if missing else f"shape mismatch {wrong[:3]} (key, checkpoint, config)"
        raise UnsupportedArchitectureError(f"open_clip checkpoint does not fit its config as a CLIPModel: {detail}")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    model.eval()
    if save_directory is not None:
        _save(model, model_cfg, preprocess_cfg, Path(save_directory), bpe_path)
    return model


def _bundled_bpe() -> Path | None:
    try:
        import open_clip
    except ImportError:
        return None
    path = Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    return path if path.is_file() else None


def _save(model, model_cfg: dict, preprocess_cfg: dict, folder: Path, bpe_path) -> None:
    from hf_cft.models.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer
    from hf_cft.utils import staged_folder

    text = model_cfg["text_cfg"]
    tokenizer = None
    if int(text.get("vocab_size", 49408)) == CLIP_VOCAB_SIZE and not text.get("hf_tokenizer_name"):
        bpe = Path(bpe_path) if bpe_path is not None else _bundled_bpe()
        if bpe is None:
            raise UnsupportedArchitectureError(
                "the CLIP tokenizer needs OpenAI's BPE merge list: pass bpe_path (--bpe on the command line; bpe_simple_vocab_16e6.txt.gz) or "
                "install open_clip, which ships it"
            )
        tokenizer = build_clip_tokenizer(bpe, model_max_length=int(text.get("context_length", 77)))
    processor = image_processor_for(model_cfg, preprocess_cfg)
    with staged_folder(folder) as stage:
        model.save_pretrained(str(stage))
        processor.save_pretrained(str(stage))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(stage))
        (stage / "open_clip_source.json").write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2, default=_jsonable)
        )


def _jsonable(value: Any):
    return list(value) if isinstance(value, (tuple, set)) else str(value)

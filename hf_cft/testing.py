"""Helpers for tests and examples: tiny random CLIP models built from configs (no download)."""

from __future__ import annotations

import torch


def tiny_clip_config(
    vocab_size: int = 99,
    eos_token_id: int = 98,
    bos_token_id: int = 97,
    pad_token_id: int = 1,
    image_size: int = 30,
    patch_size: int = 2,
    hidden_size: int = 32,
    projection_dim: int = 16,
    num_layers: int = 2,
    max_position_embeddings: int = 77,
):
    """A ~44k-parameter ``CLIPConfig``. ``eos_token_id=2`` gives the legacy argmax pooling."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        projection_dim=projection_dim,
    )
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        projection_dim=projection_dim,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)


def tiny_clip(seed: int = 0, **config_kwargs):
    """A tiny random ``CLIPModel`` in eval mode, deterministic in ``seed``."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(**config_kwargs))
    return model.eval()


def tiny_clip_for_tokenizer(seed: int = 0, **config_kwargs):
    """A tiny random CLIP whose vocabulary and special ids match the real CLIP tokenizer (49,408 tokens)."""
    kw = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    kw.update(config_kwargs)
    return tiny_clip(seed, **kw)


def clip_vit_b16_config():
    """The ``CLIPConfig`` of OpenAI CLIP ViT-B/16 (149.6M parameters), for shape-true benchmarks with random
    weights (build it under ``torch.device("meta")`` to count parameters without allocating them)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=512,
            intermediate_size=2048,
            num_attention_heads=8,
            num_hidden_layers=12,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
            projection_dim=512,
        ),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            image_size=224,
            patch_size=16,
            projection_dim=512,
        ),
        projection_dim=512,
    )


def siglip_base_config(
    vocab_size: int = 32000, pad_token_id: int = 1, bos_token_id: int = 49406, eos_token_id: int = 49407
):
    """The ``SiglipConfig`` of ``google/siglip-base-patch16-224`` (203.2M parameters: 768 wide, 12 + 12 layers,
    patch 16 at 224 px, 64 text positions, a 32,000-token vocabulary), for shape-true benchmarks with random
    weights. The special ids default to the released config's; a benchmark with its own tokenizer passes its ids."""
    from transformers import SiglipConfig

    return SiglipConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=64,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            image_size=224,
            patch_size=16,
            num_channels=3,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
    )


def tiny_siglip(seed: int = 0, max_position_embeddings: int = 16):
    """A tiny random ``SiglipModel`` (text vocab 99, BOS 97, EOS 98, pad 1; 30×30 images), in eval mode."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    cfg = SiglipConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_position_embeddings,
            pad_token_id=1,
            eos_token_id=98,
            bos_token_id=97,
        ),
        vision_config=dict(
            image_size=30,
            patch_size=2,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
    )
    return SiglipModel(cfg).eval()


def save_tiny_clip(
    folder,
    bpe_path=None,
    texts=None,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 4,
    hidden_size: int = 64,
    projection_dim: int = 32,
    num_layers: int = 2,
    vocab_size: int = 1024,
):
    """Save a tiny random ``CLIPModel`` with a CLIP tokenizer and image processor into ``folder``, so that
    ``CLIPModel.from_pretrained(folder)``, ``AutoTokenizer.from_pretrained(folder)`` and
    ``AutoImageProcessor.from_pretrained(folder)`` load it (for examples and tests; no download).

    The tokenizer is the real 49,408-token CLIP vocabulary rebuilt from OpenAI's BPE merge list when ``bpe_path``
    is given (:func:`hf_cft.models.build_clip_tokenizer`), else a small BPE with CLIP's layout learned on ``texts``
    (:func:`hf_cft.models.train_clip_tokenizer`, ``vocab_size`` tokens; by default a few generic photo captions).
    The model's vocabulary and special token ids follow the tokenizer. The folder is written next to its final
    place and renamed into it, so a reader sees no half-written folder. Returns the folder as a ``Path``.

    Example::

        save_tiny_clip("tiny-clip", "../shared/data/assets/bpe_simple_vocab_16e6.txt.gz")
        model = CLIPModel.from_pretrained("tiny-clip")
    """
    import os
    import shutil
    import tempfile
    from pathlib import Path

    try:  # the PIL backend: no torchvision needed (transformers 5.x)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    from hf_cft.models.tokenizer import build_clip_tokenizer, train_clip_tokenizer

    folder = Path(folder)
    if bpe_path is not None:
        tokenizer = build_clip_tokenizer(bpe_path)
    else:
        texts = list(texts) if texts is not None else [f"a photo of a {w}." for w in _DEFAULT_WORDS]
        tokenizer = train_clip_tokenizer(texts, vocab_size=vocab_size)
    model = tiny_clip(
        seed=seed,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        projection_dim=projection_dim,
        num_layers=num_layers,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the saved folder is an ordinary one
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


_DEFAULT_WORDS = ("cat", "dog", "bird", "car", "plane", "ship", "truck", "horse", "flower", "tree", "house", "road")

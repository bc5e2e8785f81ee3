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


# ------------------------------------------------------------------------------------------------ every family

#: The CLIP-like families :func:`tiny_family` builds: transformers' ``model_type`` values, plus ``"metaclip"`` (a
#: ``CLIPModel`` configured as MetaCLIP 1 checkpoints are: ``eos_token_id=2``, i.e. argmax pooling).
FAMILY_NAMES = ("clip", "metaclip", "metaclip_2", "siglip", "siglip2", "altclip", "chinese_clip")

# Words the tiny tokenizers know as whole tokens (anything else falls back to characters / bytes).
_FAMILY_WORDS = (
    "a", "an", "the", "of", "photo", "drawing", "picture", "this", "is", "x", "cat", "dog", "sea", "lion", "bird",
    "car", "plane", "ship", "truck", "horse", "flower", "tree", "house", "road", "red", "green", "blue",
)  # fmt: skip
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"


def tiny_family_tokenizer(family: str):
    """A small tokenizer of ``family``'s own class, built in code (no download): CLIP's byte-level BPE (CLIP,
    MetaCLIP), SentencePiece-style Unigram (SigLIP's T5 layout, the XLM-R layout of AltCLIP and MetaCLIP 2), Gemma's
    BPE (SigLIP2) and BERT's WordPiece (ChineseCLIP). It knows a few dozen words whole (``"a photo of a"``,
    ``"cat"``, ``"x"``, ...) and spells anything else with characters."""
    _check_family(family)
    words = list(_FAMILY_WORDS)
    if family in ("clip", "metaclip"):
        from hf_cft.models.tokenizer import train_clip_tokenizer

        texts = [f"a photo of a {w}." for w in words] * 2 + [" ".join(words)] * 2
        return train_clip_tokenizer(texts, vocab_size=2 * 256 + 2 + 96)
    if family == "siglip":  # SigLIP's tokenizer is T5's SentencePiece layout: <pad> 0, </s> 1, <unk> 2, EOS appended
        from transformers import T5Tokenizer

        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + _unigram_pieces(words + ["X"])
        return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=16)
    if family in ("altclip", "metaclip_2"):  # XLM-R layout: <s> 0, <pad> 1, </s> 2, <unk> 3, ..., <mask> last
        from transformers import XLMRobertaTokenizer

        vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
        vocab += _unigram_pieces(words + ["X"]) + [("<mask>", 0.0)]
        return XLMRobertaTokenizer(vocab=vocab, model_max_length=77)
    if family == "siglip2":  # Gemma's BPE, lowercased; <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4
        from transformers import Siglip2Tokenizer

        vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
        for ch in "▁" + _CHARS:
            vocab.setdefault(ch, len(vocab))
        merges = []
        for w in words:
            for piece in (w, "▁" + w):
                for i in range(2, len(piece) + 1):
                    left, right = piece[: i - 1], piece[i - 1]
                    if piece[:i] not in vocab:
                        vocab[piece[:i]] = len(vocab)
                        merges.append((left, right))
        tok = Siglip2Tokenizer(vocab=vocab, merges=merges, model_max_length=16)
        tok.padding_side = "right"
        return tok
    from transformers import BertTokenizer  # chinese_clip

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_CHARS, *(w for w in words if w not in _CHARS)]
    vocab += ["##" + c for c in _CHARS]
    return BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))}, model_max_length=52)


def _unigram_pieces(words) -> list[tuple[str, float]]:
    pieces = [("▁" + w, -2.0) for w in words] + [("▁", -4.0)]
    pieces += [(c, -5.0) for c in _CHARS + _CHARS.upper() if c not in ("▁",)]
    return list(dict(pieces).items())


def _check_family(family: str) -> None:
    if family not in FAMILY_NAMES:
        from hf_cft.errors import OptionError

        raise OptionError(f"Unknown family {family!r}; known: {', '.join(FAMILY_NAMES)}.")


def tiny_family_config(family: str, tokenizer=None):
    """The config of a tiny random model of ``family`` whose vocabulary and special ids follow ``tokenizer``
    (default :func:`tiny_family_tokenizer`): 2 layers, width 32, 30×30 images in 2×2 patches (SigLIP2: up to 64
    NaFlex patches of 2×2)."""
    _check_family(family)
    tok = tokenizer if tokenizer is not None else tiny_family_tokenizer(family)
    vocab = len(tok)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(image_size=30, patch_size=2, **layers)
    if family in ("clip", "metaclip"):
        return tiny_clip_config(
            vocab_size=vocab,
            bos_token_id=tok.bos_token_id,
            eos_token_id=2 if family == "metaclip" else tok.eos_token_id,  # MetaCLIP 1 configs keep the legacy 2
            pad_token_id=tok.pad_token_id,
        )
    if family == "metaclip_2":
        from transformers import MetaClip2Config

        text = dict(vocab_size=vocab, max_position_embeddings=77, **layers)
        text.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return MetaClip2Config(text_config=text, vision_config=vision, projection_dim=16)
    if family in ("siglip", "siglip2"):
        from transformers import Siglip2Config, SiglipConfig

        text = dict(vocab_size=vocab, max_position_embeddings=16, **layers)
        text.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        text["bos_token_id"] = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if family == "siglip":
            return SiglipConfig(text_config=text, vision_config=vision)
        vision = dict(num_patches=64, patch_size=2, **layers)
        return Siglip2Config(text_config=text, vision_config=vision)
    if family == "altclip":
        from transformers import AltCLIPConfig

        text = dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            project_dim=16,
            max_position_embeddings=80,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        return AltCLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    from transformers import ChineseCLIPConfig

    text = dict(vocab_size=vocab, max_position_embeddings=52, pad_token_id=tok.pad_token_id, **layers)
    return ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def tiny_family(family: str, seed: int = 0):
    """``(model, tokenizer)``: a tiny random dual encoder of ``family`` (one of :data:`FAMILY_NAMES`) in eval mode,
    deterministic in ``seed``, with its offline tokenizer (:func:`tiny_family_tokenizer`). The model's class is the
    family's own (``CLIPModel``, ``MetaClip2Model``, ``SiglipModel``, ``Siglip2Model``, ``AltCLIPModel``,
    ``ChineseCLIPModel``)."""
    from transformers import AutoModel

    tok = tiny_family_tokenizer(family)
    config = tiny_family_config(family, tok)
    torch.manual_seed(seed)
    return AutoModel.from_config(config).eval(), tok


def tiny_family_image_processor(family: str):
    """The family's own image processor (transformers' class, built from arguments) for :func:`tiny_family`'s
    models: 30×30 images, or for SigLIP2 up to 64 NaFlex patches of 2×2."""
    _check_family(family)
    import transformers

    def cls(name):  # the PIL backend where transformers has one (no torchvision needed)
        return getattr(transformers, name + "Pil", None) or getattr(transformers, name)

    if family == "siglip2":
        return cls("Siglip2ImageProcessor")(patch_size=2, max_num_patches=64)
    if family == "siglip":
        return cls("SiglipImageProcessor")(size={"height": 30, "width": 30})
    name = "ChineseCLIPImageProcessor" if family == "chinese_clip" else "CLIPImageProcessor"
    return cls(name)(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})

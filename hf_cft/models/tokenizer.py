"""Tokenizer utilities: load a tokenizer from a model folder, or build the real CLIP tokenizer offline
from OpenAI's BPE merge list (``bpe_simple_vocab_16e6.txt.gz``), and tokenise prompts for a model.

The CLIP vocabulary is fully determined by the merge list: the 256 byte symbols (in GPT-2's printable
byte-to-unicode order), the same 256 symbols with the end-of-word marker ``</w>``, one entry per merge
(the first 48,894 merges), then ``<|startoftext|>`` and ``<|endoftext|>`` — 49,408 entries in all.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from hf_cft.errors import TokenizerError

CLIP_VOCAB_SIZE = 49408
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48,894
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP ordering).

    Printable Latin-1 bytes map to themselves and come first, in byte order; every other byte b is mapped
    to chr(256 + i), i counting those bytes in order, and they follow.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def read_clip_bpe(bpe_path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Parse OpenAI's gzip'd BPE merge list into ``(vocab, merges)`` for a CLIP tokenizer."""
    path = Path(bpe_path)
    if not path.is_file():
        raise TokenizerError(f"CLIP BPE vocabulary file {str(path)!r} does not exist.")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"Cannot read CLIP BPE vocabulary {str(path)!r}: {exc}") from exc
    # line 0 is a version header; the next _NUM_MERGES lines are the merges actually used by CLIP
    body = lines[1 : 1 + _NUM_MERGES]
    if len(body) < _NUM_MERGES:
        raise TokenizerError(f"{str(path)!r} has {len(body)} merges; a CLIP BPE file has at least {_NUM_MERGES}.")
    merges: list[tuple[str, str]] = []
    for i, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{str(path)!r} line {i}: expected two symbols, got {line!r}.")
        merges.append((parts[0], parts[1]))
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise TokenizerError(f"{str(path)!r} produced {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}.")
    return vocab, merges


def build_clip_tokenizer(
    bpe_path: str | os.PathLike,
    save_directory: str | os.PathLike | None = None,
    model_max_length: int = 77,
):
    """Build a real ``transformers.CLIPTokenizer`` offline from the CLIP BPE merge list.

    If ``save_directory`` is given the tokenizer is also saved there (``save_pretrained``), together with
    ``vocab.json`` and ``merges.txt``, so that ``AutoTokenizer.from_pretrained(save_directory)`` works.
    """
    from transformers import CLIPTokenizer

    vocab, merges = read_clip_bpe(bpe_path)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    if save_directory is not None:
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out))
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
        )
    return tok


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs):
    """Load a tokenizer from a model folder (or Hub id), with a clear error when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise TokenizerError(
            f"Cannot load a tokenizer from {str(name_or_path)!r}: {exc}. A model folder needs tokenizer files "
            "(tokenizer.json or vocab.json + merges.txt); build one offline with hf_cft.build_clip_tokenizer."
        ) from exc


def tokenize_prompts(
    tokenizer,
    prompts: Sequence[str],
    model: nn.Module | None = None,
    max_length: int | None = None,
    truncate: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenise prompts for a CLIP-like text tower.

    CLIP pads to the longest prompt; SigLIP was trained with ``max_length`` padding, so it is used there.
    A prompt longer than the text tower's positions raises :class:`TokenizerError` naming it unless
    ``truncate=True`` (as in OpenAI's ``clip.tokenize``, silently truncating moves the EOS token).
    """
    from hf_cft.models.clip import is_siglip, text_max_length

    if max_length is None:
        max_length = text_max_length(model) if model is not None else int(getattr(tokenizer, "model_max_length", 77))
    prompts = list(prompts)
    if not truncate:
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        too_long = [(p, n) for p, n in zip(prompts, lengths) if n > max_length]
        if too_long:
            p, n = too_long[0]
            raise TokenizerError(
                f"Prompt {p!r} is {n} tokens long, more than the text tower's {max_length} positions "
                f"({len(too_long)} prompt(s) too long). Shorten the class name or template, or pass truncate=True."
            )
    padding = "max_length" if (model is not None and is_siglip(model)) else "longest"
    enc = tokenizer(prompts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    if model is not None:
        from hf_cft.models.clip import check_clip_like

        cfg = check_clip_like(model).config
        vocab = getattr(getattr(cfg, "text_config", cfg), "vocab_size", None)
        ids = enc["input_ids"]
        if vocab is not None and ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            row = int((ids == bad).any(dim=1).nonzero()[0, 0])
            raise TokenizerError(
                f"The tokenizer gives token id {bad} for prompt {prompts[row]!r}, outside the text tower's vocabulary "
                f"of {vocab} ids: the tokenizer does not belong to this model."
            )
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def train_clip_tokenizer(texts: Sequence[str], vocab_size: int = 1024, model_max_length: int = 77):
    """Learn a small byte-level BPE on ``texts`` and return it as a real ``CLIPTokenizer``.

    It uses CLIP's normaliser, pre-tokeniser and ``</w>`` end-of-word suffix, and lays the vocabulary out like
    CLIP's (256 byte symbols, the same with ``</w>``, one entry per merge, then ``<|startoftext|>`` and
    ``<|endoftext|>``), so everything downstream (EOS pooling, padding with EOS) behaves as with the full
    vocabulary. Meant for tiny models (tests, the offline demo, private domains) where a 49,408-row embedding
    would dwarf the model.

    The merges are learned here rather than with ``tokenizers.trainers.BpeTrainer``, whose tie-breaking
    between equally frequent pairs changes from run to run: the most frequent pair wins, ties go to the
    lexicographically smallest pair, and pairs seen fewer than twice are never merged. Same texts and
    ``vocab_size`` → the same tokenizer, on every machine.
    """
    from collections import Counter

    from transformers import CLIPTokenizer

    texts = [t for t in texts if t]
    if not texts:
        raise TokenizerError("train_clip_tokenizer needs at least one non-empty text.")
    symbols = _byte_symbols()
    if vocab_size < 2 * len(symbols) + 2:
        raise TokenizerError(f"vocab_size must be at least {2 * len(symbols) + 2} (bytes, bytes</w>, 2 specials).")
    template = CLIPTokenizer(vocab={SOT: 0, EOT: 1}, merges=[])  # for its normaliser and pre-tokeniser
    normalizer = template.backend_tokenizer.normalizer
    pre = template.backend_tokenizer.pre_tokenizer
    words: Counter = Counter()
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)):
            if piece in (SOT, EOT):
                continue
            words[(*piece[:-1], piece[-1] + "</w>")] += 1
    merges: list[tuple[str, str]] = []
    budget = vocab_size - 2 * len(symbols) - 2
    while len(merges) < budget:
        pairs: Counter = Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        best_count = max(pairs.values())
        if best_count < 2:
            break
        best = min(p for p, c in pairs.items() if c == best_count)
        merges.append(best)
        joined = best[0] + best[1]
        new_words: Counter = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += freq
        words = new_words
    tokens = symbols + [s + "</w>" for s in symbols]
    seen = set(tokens)
    kept = []
    for a, b in merges:  # a merge can recreate an existing symbol only in degenerate corpora; keep ids unique
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            kept.append((a, b))
    tokens += [SOT, EOT]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=kept, model_max_length=model_max_length)

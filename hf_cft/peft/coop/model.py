from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner

from hf_cft.errors import AdapterError, TokenizerError
from hf_cft.peft.base import NoMergeTunerMixin, resolve_tokenizer
from hf_cft.peft.coop.config import CoOpConfig
from hf_cft.peft.coop.layer import CoOpLayer


class CoOpModel(NoMergeTunerMixin, BaseTuner):
    """CoOp soft prompts on the text tower of a CLIP-like model (see :class:`CoOpConfig`).

    Use :meth:`class_text_features` to get the prompt-learned text head ``[C, d]`` for any class names (shared
    context) or for the adapter's own classes (class-specific context); :func:`hf_cft.class_logits` gives the class
    logits of images in one call, :func:`hf_cft.evaluate` the accuracy (base/novel too).
    """

    prefix: str = "coop_"
    tuner_layer_cls = CoOpLayer
    target_module_mapping: dict = {}
    method_name = "CoOp"

    def _prepare_adapter_config(self, peft_config, model_config):
        """The default target (``text_model.embeddings``) becomes the family's text embeddings (AltCLIP keeps them
        under ``text_model.roberta``; see :mod:`hf_cft.models.families`)."""
        from hf_cft.models.families import family_of

        path = family_of(self.model).text_embeddings
        if peft_config.target_modules == ["text_model.embeddings"] and path != "text_model.embeddings":
            peft_config.target_modules = [path]
        return peft_config

    def _create_and_replace(self, peft_config: CoOpConfig, adapter_name, target, target_name, parent, current_key):
        from hf_cft.models.families import token_embedding

        base = target.get_base_layer() if isinstance(target, CoOpLayer) else target
        if token_embedding(base) is None:
            raise AdapterError(
                f"CoOp adapter {adapter_name!r}: target {current_key!r} is a {type(base).__name__}, not a text "
                "embeddings module with a token-embedding table (token_embedding or word_embeddings)."
            )
        kwargs = self._layer_kwargs(peft_config, adapter_name, base)
        if isinstance(target, CoOpLayer):
            target.update_layer(adapter_name, **kwargs)
        else:
            self._replace_module(parent, target_name, CoOpLayer(target, adapter_name, **kwargs), target)

    def _layer_kwargs(self, config: CoOpConfig, adapter_name: str, embeddings) -> dict:
        from hf_cft.models.families import token_embedding

        tokenizer = resolve_tokenizer(config)
        placeholder_id = config.placeholder_token_id
        init = None
        n_ctx = config.n_ctx
        if tokenizer is not None:
            placeholder_id = _single_token_id(tokenizer, config.placeholder_token, adapter_name)
            if config.ctx_init:
                init_ids = _word_ids(tokenizer, config.ctx_init)
                if n_ctx is not None and n_ctx != len(init_ids):
                    raise AdapterError(
                        f"CoOp adapter {adapter_name!r}: ctx_init {config.ctx_init!r} is {len(init_ids)} tokens but "
                        f"n_ctx={n_ctx}; leave n_ctx unset or make them agree."
                    )
                n_ctx = len(init_ids)
                with torch.no_grad():
                    table = token_embedding(embeddings).weight
                    init = table[torch.tensor(init_ids, device=table.device)].detach().float().clone()
        elif config.ctx_init and config.n_ctx is None:
            raise AdapterError(
                f"CoOp adapter {adapter_name!r}: ctx_init={config.ctx_init!r} needs a tokenizer; call "
                "config.set_tokenizer(tokenizer) or set tokenizer_name_or_path."
            )
        if placeholder_id is None:
            raise AdapterError(
                f"CoOp adapter {adapter_name!r} needs a tokenizer to find the id of its placeholder token "
                f"{config.placeholder_token!r}: call config.set_tokenizer(tokenizer) or set tokenizer_name_or_path."
            )
        n_ctx = n_ctx or 16
        config.n_ctx = n_ctx  # saved with the adapter, so loading needs no tokenizer
        config.placeholder_token_id = int(placeholder_id)
        return {
            "n_ctx": n_ctx,
            "n_contexts": len(config.classnames) if config.class_specific else 0,
            "placeholder_id": placeholder_id,
            "init": init,
            "init_std": config.init_std,
        }

    # ------------------------------------------------------------------------------------------------ prompts

    def _coop_layer(self) -> CoOpLayer:
        for module in self.model.modules():
            if isinstance(module, CoOpLayer):
                return module
        raise AdapterError("this model has no CoOp layer")

    def _adapter_config(self, adapter_name: str | None) -> tuple[str, CoOpConfig]:
        """``(name, config)`` of ``adapter_name`` (default: the active adapter); :class:`AdapterError` naming the
        adapters the model has when there is no such adapter."""
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise AdapterError(f"No adapter named {name!r}; this model has {sorted(self.peft_config)}.")
        return name, self.peft_config[name]

    def build_prompts(self, tokenizer, classnames: Sequence[str], adapter_name: str | None = None) -> dict:
        """Tokenised class prompts ``X X ... X <class>.`` (placement per ``class_token_position``)."""
        from hf_cft.data.templates import validate_classnames

        name, cfg = self._adapter_config(adapter_name)
        return self._prompts(tokenizer, validate_classnames(classnames, owner=f"CoOp adapter {name!r}"), name, cfg)

    def _prompts(self, tokenizer, classnames: list[str], name: str, cfg: CoOpConfig) -> dict:
        """:meth:`build_prompts` for class names already checked (class_text_features checks them once)."""
        from hf_cft.models.tokenizer import tokenize_prompts

        ph = " ".join([cfg.placeholder_token] * cfg.n_ctx)
        half = cfg.n_ctx // 2
        texts = []
        for c in classnames:
            if cfg.class_token_position == "end":
                texts.append(f"{ph} {c}.")
            elif cfg.class_token_position == "front":
                texts.append(f"{c} {ph} .")  # the space keeps "X." from fusing in word-level tokenizers
            else:
                first = " ".join([cfg.placeholder_token] * half)
                rest = " ".join([cfg.placeholder_token] * (cfg.n_ctx - half))
                texts.append(f"{first} {c} {rest} .".strip())
        try:
            enc = tokenize_prompts(tokenizer, texts, self.model)
        except TokenizerError as exc:
            too_long = [c for c, t in zip(classnames, texts) if t in str(exc)]
            name_part = f"class {too_long[0]!r}" if too_long else "a class name"
            raise AdapterError(
                f"CoOp adapter {name!r}: {cfg.n_ctx} context tokens plus {name_part} do not fit the text tower's "
                f"positions ({exc})"
            ) from exc
        # Context slots by position, found from the ends of each prompt's run of placeholder tokens: the first run starts
        # right after the leading special tokens (none for SigLIP, BOS / CLS for the others; after any left padding),
        # and the last placeholders before the closing "." end the second run. A class name whose tokens include the
        # placeholder ("tsx" -> "ts" "x") is therefore safe, and so is a tokenizer that spells the placeholder
        # differently after a space (Gemma's "x" / "▁x", SigLIP2).
        ids = enc["input_ids"]
        ph_ids = torch.tensor(_placeholder_ids(tokenizer, cfg.placeholder_token))
        lead = _leading_specials(tokenizer, cfg.placeholder_token, ph_ids)
        is_ph = torch.isin(ids, ph_ids)
        mask = enc.get("attention_mask")
        first_real = mask.long().argmax(dim=1) if mask is not None else torch.zeros(len(ids), dtype=torch.long)
        ctx_mask = torch.zeros_like(ids, dtype=torch.bool)
        rest = cfg.n_ctx - half
        for row in range(len(classnames)):
            start = int(first_real[row]) + lead
            if cfg.class_token_position == "end":
                ctx_mask[row, start : start + cfg.n_ctx] = True
                continue
            if cfg.class_token_position == "middle":
                ctx_mask[row, start : start + half] = True
            tail = cfg.n_ctx if cfg.class_token_position == "front" else rest
            where = is_ph[row].nonzero().flatten()
            where = where[where >= start + (half + 1 if cfg.class_token_position == "middle" else 1)]
            if len(where) >= tail:
                ctx_mask[row, where[-tail:]] = True
        # a prompt's slots must hold the placeholder, n_ctx of them, in one run (two around a middle class name)
        runs = 2 if cfg.class_token_position == "middle" else 1
        holds, counts = (is_ph | ~ctx_mask).all(1).tolist(), ctx_mask.sum(1).tolist()
        bad = [
            c
            for c, m, ok, n in zip(classnames, ctx_mask, holds, counts)
            if not ok or n != cfg.n_ctx or _contiguous_runs(m) > runs
        ]
        if bad:
            raise AdapterError(
                f"CoOp adapter {name!r}: the context slots of the prompt of class {bad[0]!r} do not "
                f"hold the placeholder {cfg.placeholder_token!r}; the tokenizer does not split it as a separate word."
            )
        enc["ctx_mask"] = ctx_mask
        return enc

    def class_text_features(
        self,
        tokenizer,
        classnames: Sequence[str] | None = None,
        adapter_name: str | None = None,
        normalize: bool = True,
        prompts: dict | None = None,
    ) -> torch.Tensor:
        """Text features ``[C, d]`` of the learned prompts for ``classnames`` (default: the adapter's classes).

        A shared context generalises to any class names (e.g. novel classes); a class-specific context only
        exists for the classes it was trained on, in that order. ``prompts`` (from :meth:`build_prompts`) skips
        re-tokenising in a training loop.
        """
        from hf_cft.data.templates import validate_classnames
        from hf_cft.models.clip import text_features

        name, cfg = self._adapter_config(adapter_name)
        if classnames is None:
            if not cfg.classnames:
                raise AdapterError(f"CoOp adapter {name!r} has no classnames; pass classnames=[...].")
            classnames = cfg.classnames
        classnames = validate_classnames(classnames, owner=f"CoOp adapter {name!r}")
        if cfg.class_specific and classnames != list(cfg.classnames):
            raise AdapterError(
                f"CoOp adapter {name!r} has class-specific contexts for {len(cfg.classnames)} classes "
                f"({cfg.classnames[:3]}...); it cannot encode other classes ({classnames[:3]}...)."
            )
        enc = prompts if prompts is not None else self._prompts(tokenizer, classnames, name, cfg)
        device = next(self.model.parameters()).device
        with self._coop_layer().prompt_context(
            enc["ctx_mask"].to(device), torch.arange(len(classnames)) if cfg.class_specific else None, name
        ):
            feats = text_features(
                self.model, enc["input_ids"].to(device), enc["attention_mask"].to(device), normalize=False
            )
        return F.normalize(feats, dim=-1) if normalize else feats


def _word_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _placeholder_ids(tokenizer, token: str) -> list[int]:
    """The ids the placeholder word takes in a prompt: alone and after a space (the same for CLIP's BPE, WordPiece
    and SentencePiece; Gemma's BPE spells "x" and "▁x" differently)."""
    alone = _word_ids(tokenizer, token)
    after_space = _word_ids(tokenizer, f"{token} {token}")[len(alone) :]
    return sorted(set(alone) | set(after_space))


def _leading_specials(tokenizer, token: str, ph_ids: torch.Tensor) -> int:
    """How many special tokens the tokenizer puts before the text (BOS / CLS: 1; SigLIP's T5 layout: 0)."""
    ids = tokenizer([f"{token} ."], add_special_tokens=True)["input_ids"][0]
    hits = [i for i, t in enumerate(ids) if int(t) in set(ph_ids.tolist())]
    return hits[0] if hits else 1


def _contiguous_runs(mask: torch.Tensor) -> int:
    m = mask.long()
    return int(m[0]) + int(((m[1:] - m[:-1]) == 1).sum())


def _single_token_id(tokenizer, token: str, adapter_name: str) -> int:
    ids = _word_ids(tokenizer, token)
    if len(ids) != 1:
        raise AdapterError(
            f"CoOp adapter {adapter_name!r}: placeholder {token!r} is {len(ids)} tokens for this tokenizer; "
            "choose a word that is a single token (CoOp uses 'X')."
        )
    return ids[0]

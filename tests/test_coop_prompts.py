"""The rules of CoOp's prompt building (``CoOpModel.build_prompts``): the placeholder slots are found by position,
with the class token at the front, in the middle or at the end; a prompt too long for the text tower is refused
naming the class; a tokenizer that does not give every context slot its own placeholder token is refused; the
masks it returns (``ctx_mask``, and ``attention_mask`` when the tokenizer gives one). Prompt-tuning adapters (CoOp,
VPT, a linear head) refuse to merge, each layer with its own reason."""

import re

import pytest
import torch
from conftest import ToyTokenizer
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import hf_cft  # noqa: F401  (registers the method types)
from hf_cft import CoOpConfig, LinearHeadConfig, VPTConfig
from hf_cft.errors import AdapterError, AdapterMergeError, ClassNamesError
from hf_cft.models import tokenize_prompts
from hf_cft.peft.coop import CoOpLayer
from hf_cft.peft.head.layer import LinearHeadLayer
from hf_cft.peft.vpt.layer import VPTDeepLayer, VPTEmbeddingLayer
from hf_cft.testing import tiny_clip


class _NoMaskTokenizer(ToyTokenizer):
    """Returns ``input_ids`` only (no ``attention_mask``), like a bare tokenizer function."""

    def __call__(self, texts, **kwargs):
        return {"input_ids": super().__call__(texts, **kwargs)["input_ids"]}


class _GluedPeriodTokenizer(ToyTokenizer):
    """Glues a lone "." to the word before it, so the last placeholder of "... X ." becomes the token "x."."""

    def _ids(self, text, special=True):
        return super()._ids(text.replace(" .", "."), special)


class _PairMergingTokenizer(ToyTokenizer):
    """Merges two placeholder words "x x" into one token "xx" (a BPE merge): "X" alone is one token, but a run of
    placeholders is not split into one token per word."""

    def _ids(self, text, special=True):
        words, merged = text.lower().split(), []
        for w in words:
            if w == "x" and merged and merged[-1] == "x":
                merged[-1] = "xx"
            else:
                merged.append(w)
        return super()._ids(" ".join(merged), special)


class _GluedDogTokenizer(ToyTokenizer):
    """Glues the class word "dog" to the placeholder after it ("dog X" -> "dogx"): only the dog prompt loses a slot."""

    def _ids(self, text, special=True):
        return super()._ids(text.replace("dog X", "dogx"), special)


def _coop(tok, position="end", n_ctx=4):
    return get_peft_model(
        tiny_clip(), CoOpConfig(n_ctx=n_ctx, class_token_position=position, classnames=["cat"]).set_tokenizer(tok)
    )


def _refused_message(cls):
    return (
        f"CoOp adapter 'default': the context slots of the prompt of class {cls!r} do not hold the placeholder 'X'; "
        "the tokenizer does not split it as a separate word."
    )


# ------------------------------------------------------------------------------------------------ slots and masks


@pytest.mark.parametrize(
    "position, texts, slots",
    [
        ("end", ["X X X X x ray.", "X X X X cat."], [[1, 2, 3, 4], [1, 2, 3, 4]]),
        ("front", ["x ray X X X X .", "cat X X X X ."], [[3, 4, 5, 6], [2, 3, 4, 5]]),
        ("middle", ["X X x ray X X .", "X X cat X X ."], [[1, 2, 5, 6], [1, 2, 4, 5]]),
    ],
)
def test_ctx_mask_marks_the_placeholder_slots_by_position(position, texts, slots, toy_tokenizer):
    # BOS at 0; the class name's own "x" (in "x ray") is never a context slot, whatever the class token position
    model = _coop(toy_tokenizer, position)
    enc = model.build_prompts(toy_tokenizer, ["x ray", "cat"])
    ref = tokenize_prompts(toy_tokenizer, texts, tiny_clip())
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    assert torch.equal(enc["attention_mask"], ref["attention_mask"])
    want = torch.zeros_like(ref["input_ids"], dtype=torch.bool)
    for row, cols in enumerate(slots):
        want[row, cols] = True
    assert torch.equal(enc["ctx_mask"], want)


def test_build_prompts_without_an_attention_mask_starts_every_prompt_at_position_zero(toy_tokenizer):
    # no attention_mask from the tokenizer: no left padding to skip, slots start right after BOS
    tok = _NoMaskTokenizer()
    enc = _coop(toy_tokenizer).build_prompts(tok, ["cat", "dog"])
    assert "attention_mask" not in enc
    assert torch.equal(enc["input_ids"], torch.tensor(tok(["X X X X cat.", "X X X X dog."])["input_ids"]))
    row = [False, True, True, True, True, False, False]
    assert enc["ctx_mask"].tolist() == [row, row]


def test_class_text_features_uses_the_given_prompts_without_a_tokenizer(toy_tokenizer):
    # prompts built once (a training loop) are used as they are: no tokenizer needed to re-tokenise them
    model = _coop(toy_tokenizer)
    names = ["cat", "dog", "sea lion"]
    with torch.no_grad():
        want = model.class_text_features(toy_tokenizer, names)
        got = model.class_text_features(None, names, prompts=model.build_prompts(toy_tokenizer, names))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ refusals


def test_too_long_prompt_names_the_class_or_says_a_class_name(toy_tokenizer):
    model = _coop(toy_tokenizer)
    long = " ".join(["cat"] * 80)
    with pytest.raises(AdapterError) as err:
        model.build_prompts(toy_tokenizer, ["dog", long])
    assert str(err.value).startswith(
        f"CoOp adapter 'default': 4 context tokens plus class {long!r} do not fit the text tower's positions ("
    )
    # a class name the tokenizer error cannot quote verbatim (its repr escapes the newline) is "a class name"
    escaped = "\n".join(["sea lion"] * 40)
    with pytest.raises(AdapterError) as err:
        model.build_prompts(toy_tokenizer, ["dog", escaped])
    assert str(err.value).startswith(
        "CoOp adapter 'default': 4 context tokens plus a class name do not fit the text tower's positions (Prompt "
    )


def test_context_slots_that_lose_a_placeholder_are_refused_front(toy_tokenizer):
    """With "X ." glued into "x.", a front prompt has only three placeholders after the class name: it is refused,
    and neither the class name's own "x" (the letter class "x") nor one in its middle is taken as a context slot."""
    tok = _GluedPeriodTokenizer()
    model = _coop(toy_tokenizer, "front")
    for names in (["cat", "dog"], ["x"], ["ray x cat"]):
        with pytest.raises(AdapterError) as err:
            model.build_prompts(tok, names)
        assert str(err.value) == _refused_message(names[0])


def test_context_slots_that_lose_a_placeholder_are_refused_middle(toy_tokenizer):
    # "X X ray x cat X x.": the second run would be the class name's "x" and the last "X": three runs, refused
    tok = _GluedPeriodTokenizer()
    model = _coop(toy_tokenizer, "middle")
    with pytest.raises(AdapterError) as err:
        model.build_prompts(tok, ["ray x cat"])
    assert str(err.value) == _refused_message("ray x cat")


def test_middle_class_name_own_placeholder_is_never_a_context_slot(toy_tokenizer):
    """As at the front, the second run starts after the class name's first token: with "X ." glued, "X X x X x."
    for the letter class "x" is refused instead of taking the class name as a context slot (and n_ctx=1, "x x.")."""
    tok = _GluedPeriodTokenizer()
    for n_ctx in (4, 1):
        with pytest.raises(AdapterError) as err:
            _coop(toy_tokenizer, "middle", n_ctx).build_prompts(tok, ["x"])
        assert str(err.value) == _refused_message("x")


def test_slots_not_holding_the_placeholder_are_refused_naming_the_first_class(toy_tokenizer):
    # "X X X X cat." -> BOS xx xx cat. EOS: four slots by position, none holding the placeholder token "x"
    tok = _PairMergingTokenizer()
    model = _coop(toy_tokenizer)
    with pytest.raises(AdapterError) as err:
        model.build_prompts(tok, ["cat", "dog"])
    assert str(err.value) == _refused_message("cat")


def test_the_refusal_names_the_class_whose_prompt_lost_a_slot_not_the_first_class(toy_tokenizer):
    # front: "cat X X X X." is fine; "dog X X X X." -> "dogx x x x .": three placeholders for four slots (a count
    # failure, no slot holding another token): the refusal names "dog", whichever place it has in the list
    model = _coop(toy_tokenizer, "front")
    tok = _GluedDogTokenizer()
    assert model.build_prompts(tok, ["cat", "bird"])["ctx_mask"].sum(1).tolist() == [4, 4]
    for names in (["cat", "dog"], ["cat", "bird", "dog"], ["dog", "cat"]):
        with pytest.raises(AdapterError) as err:
            model.build_prompts(tok, names)
        assert str(err.value) == _refused_message("dog")


# ------------------------------------------------------------------------------------------------ merging


def test_prompt_tuning_layers_refuse_to_merge_with_their_reason(toy_tokenizer):
    reasons = {
        CoOpLayer: "CoOp context vectors cannot be merged into the text embeddings.",
        LinearHeadLayer: "a classification head has no weights to merge into the image projection.",
        VPTEmbeddingLayer: "visual prompt tokens cannot be merged into the vision tower's weights.",
        VPTDeepLayer: "visual prompt tokens cannot be merged into the vision tower's weights.",
    }
    configs = [
        CoOpConfig(n_ctx=4, classnames=["cat"]).set_tokenizer(toy_tokenizer),
        LinearHeadConfig(classnames=["cat", "dog"], templates=["a photo of a {}."]).set_tokenizer(toy_tokenizer),
        VPTConfig(n_tokens=2, deep=True),
    ]
    seen = set()
    for config in configs:
        model = get_peft_model(tiny_clip(), config)
        with pytest.raises(AdapterMergeError, match="cannot be merged into the base weights"):
            model.merge_adapter()  # the tuner refuses before any layer is touched
        for layer in [m for m in model.modules() if isinstance(m, BaseTunerLayer)]:
            with pytest.raises(AdapterMergeError, match=f"^{re.escape(reasons[type(layer)])}$"):
                layer.merge(safe_merge=True, adapter_names=["default"])
            assert not layer.merged
            seen.add(type(layer))
    assert seen == set(reasons)


def test_class_names_must_be_a_list_of_non_empty_strings(toy_tokenizer):
    """One string would be read letter by letter and an empty name leaves a prompt without a class: both refused (the
    project's class-name check, ClassNamesError), in every position and through class_text_features too, naming the
    adapter and the offending name."""
    owner = "of CoOp adapter 'default'"
    for position in ("end", "front", "middle"):
        model = _coop(toy_tokenizer, position)
        for names, message in (
            ("cat", f"Class names {owner} must be a list of strings, got str."),
            ([], f"The class-name list {owner} is empty."),
            (["cat", ""], f"Class name #1 {owner} is ''; class names must be non-empty strings."),
            (["cat", "dog", "  "], f"Class name #2 {owner} is '  '; class names must be non-empty strings."),
            (["cat", None], f"Class name #1 {owner} is None; class names must be non-empty strings."),
        ):
            for call in (model.build_prompts, model.class_text_features):
                with pytest.raises(ClassNamesError) as err:
                    call(toy_tokenizer, names)
                assert str(err.value) == message


def test_a_repeated_class_name_is_warned_once_per_call_at_the_callers_line(toy_tokenizer):
    """Two classes of one name get identical text features: the project's class-name check warns, once per call (the
    features' own prompts are not checked a second time) and at the user's line."""
    import warnings

    model = _coop(toy_tokenizer)
    for call in (model.build_prompts, model.class_text_features):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(toy_tokenizer, ["cat", "dog", "cat"])
        assert [(str(w.message), w.filename) for w in caught] == [
            (
                "Class name 'cat' of CoOp adapter 'default' appears twice (ids 0 and 2). The two classes get "
                "identical text features.",
                __file__,
            )
        ]

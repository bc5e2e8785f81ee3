import gzip

import pytest

from hf_cft.errors import TokenizerError
from hf_cft.models.tokenizer import (
    CLIP_VOCAB_SIZE,
    build_clip_tokenizer,
    load_tokenizer,
    read_clip_bpe,
    tokenize_prompts,
)
from hf_cft.testing import tiny_clip_for_tokenizer

# Known tokenisations of OpenAI's CLIP tokenizer (clip.tokenize / openai/clip-vit-base-patch32).
KNOWN = {
    "a photo of a cat.": [49406, 320, 1125, 539, 320, 2368, 269, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "hello world": [49406, 3306, 1002, 49407],
    "A Photo   of a CAT.": [49406, 320, 1125, 539, 320, 2368, 269, 49407],  # lower-cased, whitespace collapsed
}


@pytest.mark.parametrize("text", sorted(KNOWN))
def test_known_tokenisations(clip_tokenizer, text):
    assert clip_tokenizer(text)["input_ids"] == KNOWN[text]


def test_vocabulary_shape(clip_tokenizer):
    assert len(clip_tokenizer) == CLIP_VOCAB_SIZE
    assert clip_tokenizer.bos_token_id == 49406 and clip_tokenizer.eos_token_id == 49407
    assert clip_tokenizer.pad_token_id == 49407  # pad == EOS, so EOS pooling takes the first EOS
    assert clip_tokenizer.decode(KNOWN["a photo of a cat."], skip_special_tokens=True).startswith("a photo of a cat")


def test_save_and_load_roundtrip(tmp_path, shared_data):
    bpe = shared_data / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    build_clip_tokenizer(bpe, save_directory=tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    tok = load_tokenizer(tmp_path / "tok")
    assert tok("a photo of a dog")["input_ids"] == KNOWN["a photo of a dog"]


def test_read_bpe_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        read_clip_bpe(tmp_path / "missing.txt.gz")
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt") as fh:
        fh.write("#version\na b\n")
    with pytest.raises(TokenizerError, match="merges"):
        read_clip_bpe(short)
    notgz = tmp_path / "plain.txt.gz"
    notgz.write_bytes(b"not gzip at all")
    with pytest.raises(TokenizerError, match="Cannot read"):
        read_clip_bpe(notgz)


def test_load_tokenizer_from_empty_folder(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer"):
        load_tokenizer(tmp_path)


def test_overlong_prompt_is_named(clip_tokenizer):
    model = tiny_clip_for_tokenizer(max_position_embeddings=8)
    with pytest.raises(TokenizerError, match="a photo of a very long class name"):
        tokenize_prompts(clip_tokenizer, ["a cat", "a photo of a very long class name indeed"], model)
    enc = tokenize_prompts(clip_tokenizer, ["a photo of a very long class name indeed"], model, truncate=True)
    assert enc["input_ids"].shape[1] == 8 and enc["input_ids"][0, -1] == 49407


def test_trained_tokenizer_is_deterministic_and_clip_shaped():
    from hf_cft.models.tokenizer import train_clip_tokenizer

    texts = [f"a photo of a {c}." for c in ("cat", "dog", "tabby cat", "sea lion", "catamaran")] * 2
    a = train_clip_tokenizer(texts, vocab_size=560)
    b = train_clip_tokenizer(list(texts), vocab_size=560)
    assert a.get_vocab() == b.get_vocab()
    vocab = a.get_vocab()
    assert vocab["a</w>"] == 320  # same byte-symbol layout as CLIP's vocabulary
    assert a.eos_token_id == len(a) - 1 and a.bos_token_id == len(a) - 2 and a.pad_token_id == a.eos_token_id
    ids = a("a photo of a tabby cat.")["input_ids"]
    assert ids[0] == a.bos_token_id and ids[-1] == a.eos_token_id
    assert len(ids) < len("a photo of a tabby cat.")  # merges were learned
    assert a.decode(ids, skip_special_tokens=True).replace(" .", ".") == "a photo of a tabby cat."
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_clip_tokenizer(texts, vocab_size=100)
    with pytest.raises(TokenizerError, match="non-empty"):
        train_clip_tokenizer(["", ""])

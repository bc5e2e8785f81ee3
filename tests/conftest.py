import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_cft.testing import tiny_clip  # noqa: E402

# Tiny models are dominated by per-op overhead: one intra-op thread is as fast on an idle machine and up to ~30x
# faster on a busy 2-core one (threads spin-waiting on each other). HF_CFT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("HF_CFT_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HF_CFT_DATA_DIR", REPO.parent / "shared" / "data"))
BPE_FILE = SHARED_DATA / "assets" / "bpe_simple_vocab_16e6.txt.gz"


class ToyTokenizer:
    """A whitespace tokenizer with a 99-token vocabulary matching ``tiny_clip`` (BOS 97, EOS 98, pad 1).

    It mimics the call signature of a transformers tokenizer, enough for hf_cft's prompt tokenisation.
    """

    bos, eos, pad = 97, 98, 1
    model_max_length = 77

    def _ids(self, text, special=True):
        words = [2 + (sum(map(ord, w)) * 7 + len(w)) % 95 for w in text.lower().split()]
        return [self.bos, *words, self.eos] if special else words

    def __call__(
        self, texts, padding=False, truncation=False, max_length=None, return_tensors=None, add_special_tokens=True
    ):
        if isinstance(texts, str):
            texts = [texts]
        ids = [self._ids(t, add_special_tokens) for t in texts]
        if truncation and max_length:
            ids = [x[: max_length - 1] + [self.eos] if len(x) > max_length else x for x in ids]
        if padding in ("longest", True, "max_length"):
            width = max_length if padding == "max_length" else max(len(x) for x in ids)
            mask = [[1] * len(x) + [0] * (width - len(x)) for x in ids]
            ids = [x + [self.pad] * (width - len(x)) for x in ids]
        else:
            mask = [[1] * len(x) for x in ids]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def toy_tokenizer():
    return ToyTokenizer()


@pytest.fixture
def clip_model():
    return tiny_clip(seed=0)


@pytest.fixture
def legacy_clip_model():
    """Same weights as ``clip_model`` but the pre-#24773 config (eos_token_id == 2, argmax pooling)."""
    return tiny_clip(seed=0, eos_token_id=2)


@pytest.fixture
def hub(monkeypatch):
    """The fake Hub of ``tests/hub_fake.py``, online; any request not made through ``hub.api`` also lands there
    (and is recorded), never on the internet. ``monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE",
    True)`` before pulling, so loaders do not look for base-model files."""
    import huggingface_hub
    from hub_fake import FakeHub
    from huggingface_hub import HfApi

    constants = huggingface_hub.constants
    with FakeHub() as server:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # HF_HUB_OFFLINE=1 above
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        server.api = HfApi(endpoint=server.url, token="hf_fake")
        yield server


def _require(path: Path, what: str):
    if not path.exists():
        reason = f"{what} not found at {path} (set HF_CFT_DATA_DIR to ../shared/data)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    _require(SHARED_DATA, "shared datasets")
    return SHARED_DATA


@pytest.fixture(scope="session")
def clip_tokenizer():
    """The real CLIP tokenizer, built offline from ../shared/data/assets (built once per session)."""
    _require(BPE_FILE, "CLIP BPE vocabulary")
    from hf_cft.models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(BPE_FILE)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.slow`` tests run only with ``RUN_SLOW=1`` (CI sets it; ``scripts/test.sh`` passes it on)."""
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set RUN_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

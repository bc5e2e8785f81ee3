"""``PeftModel.save_pretrained`` writes hf_cft's adapter card for hf_cft's adapters and LoRA on CLIP, PEFT's card
for anything else, and keeps a card hf_cft already wrote."""

import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

import hf_cft  # noqa: F401  (registers the method types and the card hook)
from hf_cft import CoOpConfig, VPTConfig
from hf_cft.testing import tiny_clip


def _card(folder):
    text = (folder / "README.md").read_text(encoding="utf-8")
    return text, ModelCard.load(folder / "README.md").data.to_dict()


def test_coop_save_pretrained_writes_hf_cft_card_and_reloads(tmp_path, toy_tokenizer):
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=2, classnames=["cat", "dog"]).set_tokenizer(toy_tokenizer))
    model.save_pretrained(tmp_path / "coop")
    text, meta = _card(tmp_path / "coop")
    assert "hf_cft" in meta["tags"] and "coop" in meta["tags"]
    assert meta["library_name"] == "peft"
    assert "More Information Needed" not in text
    assert "classnames = ['cat', 'dog']" in text  # the loading snippet is self-contained
    again = PeftModel.from_pretrained(tiny_clip(), tmp_path / "coop")
    assert torch.equal(again.class_text_features(toy_tokenizer), model.class_text_features(toy_tokenizer))


def test_lora_on_clip_and_vpt_get_hf_cft_cards(tmp_path):
    lora = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert "hf_cft" in _card(tmp_path / "lora")[1]["tags"]
    vpt = get_peft_model(tiny_clip(), VPTConfig(n_tokens=2))
    vpt.save_pretrained(tmp_path / "vpt")
    assert "vpt" in _card(tmp_path / "vpt")[1]["tags"]


def test_other_models_keep_pefts_card(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["lin"]))
    model.save_pretrained(tmp_path / "plain")
    text, meta = _card(tmp_path / "plain")
    assert "hf_cft" not in (meta.get("tags") or [])
    assert meta["library_name"] == "peft"


def test_a_card_hf_cft_wrote_is_kept(tmp_path, toy_tokenizer):
    folder = tmp_path / "coop"
    folder.mkdir()
    mine = "---\nlibrary_name: peft\ntags:\n- hf_cft\n---\n\n# my adapter\n\nbase 81.0, novel 74.0\n"
    (folder / "README.md").write_text(mine, encoding="utf-8")
    model = get_peft_model(tiny_clip(), CoOpConfig(n_ctx=2, classnames=["cat", "dog"]).set_tokenizer(toy_tokenizer))
    model.save_pretrained(folder)
    assert (folder / "README.md").read_text(encoding="utf-8") == mine


def test_a_peft_type_hf_cft_has_no_card_for_saves_with_peft_s_own_card(tmp_path):
    """Importing hf_cft must not break saving another PEFT method on CLIP (IA3 raised CardError "No card description
    for PEFT type 'IA3'"): its folder gets PEFT's own card, without hf_cft's tag."""
    from huggingface_hub import ModelCard
    from peft import IA3Config

    model = get_peft_model(tiny_clip(), IA3Config(target_modules=["fc1"], feedforward_modules=["fc1"]))
    model.save_pretrained(tmp_path / "ia3")
    assert (tmp_path / "ia3" / "adapter_model.safetensors").is_file()
    tags = ModelCard.load(tmp_path / "ia3" / "README.md").data.to_dict().get("tags") or []
    assert "hf_cft" not in tags

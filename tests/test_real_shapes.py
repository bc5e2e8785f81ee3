"""benchmarks/real_shapes.py: the real-size configs, how a recipe run is measured and reported, and (slow, when the
checkpoint has been built) one CoOp step on the ViT-B/16-shaped checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from tests_helpers import load_benchmark


@pytest.fixture(scope="module")
def real_shapes():
    return load_benchmark("real_shapes", "real_shapes")


def test_configs_have_the_released_models_sizes():
    from transformers import CLIPModel, SiglipModel

    from hf_cft.testing import clip_vit_b16_config, siglip_base_config

    with torch.device("meta"):
        clip, siglip = CLIPModel(clip_vit_b16_config()), SiglipModel(siglip_base_config())
    # the parameter counts of openai/clip-vit-base-patch16 and google/siglip-base-patch16-224
    assert sum(p.numel() for p in clip.parameters()) == 149_620_737
    assert sum(p.numel() for p in siglip.parameters()) == 203_155_970
    assert siglip.config.text_config.max_position_embeddings == 64 and siglip.config.vision_config.image_size == 224
    assert clip.config.text_config.max_position_embeddings == 77 and clip.config.vision_config.patch_size == 16


def test_run_one_measures_and_classifies(real_shapes, tmp_path):
    ok = real_shapes.run_one(
        ["-c", "import numpy as np; a = np.ones(300 * 2**20 // 8); print(a.sum())"], tmp_path / "a"
    )
    assert ok["status"] == "ok" and ok["exit"] == 0 and ok["peak_rss_mib"] > 300 and ok["seconds"] > 0
    refused = real_shapes.run_one(
        ["-c", "import sys; print('error: TokenizerError: prompt too long', file=sys.stderr); sys.exit(2)"],
        tmp_path / "b",
    )
    assert refused["status"] == "refused" and refused["message"] == "error: TokenizerError: prompt too long"
    failed = real_shapes.run_one(["-c", "raise RuntimeError('shape mismatch 77 vs 64')"], tmp_path / "c")
    assert failed["status"] == "failed" and "shape mismatch 77 vs 64" in failed["message"]

    result = {
        "date": "d",
        "machine": "m",
        "versions": {"torch": "t", "transformers": "x"},
        "shapes": {
            "clip-vit-b16": {"reference": "openai/clip-vit-base-patch16", "parameters": 149.6e6, "tokenizer": "real"},
            "siglip-base": {"reference": "google/siglip-base-patch16-224", "parameters": 203.2e6, "tokenizer": "bpe"},
        },
        "rows": {"clip-vit-b16": {"coop": ok}, "siglip-base": {"coop": refused}},
    }
    real_shapes.write_results(result, tmp_path)
    md = (tmp_path / "real_shapes.md").read_text()
    assert "| coop | " in md and "refused (" in md and "TokenizerError: prompt too long" in md
    assert (
        json.loads((tmp_path / "real_shapes.json").read_text())["rows"]["siglip-base"]["coop"]["status"] == "refused"
    )


@pytest.mark.slow
@pytest.mark.data
def test_coop_runs_one_step_on_the_vit_b16_shape(real_shapes, shared_data, tmp_path):
    """One CoOp step (batch 2) and its evaluations on the 149.6M-parameter ViT-B/16-shaped checkpoint: 224 px,
    77 text positions, the real tokenizer (several minutes on a busy 2-core machine)."""
    model = real_shapes.checkpoint_dir("clip-vit-b16")
    if not (model / "model.safetensors").is_file():
        pytest.skip(
            f"the ViT-B/16-shaped checkpoint is not built ({model}); build it with "
            "`python benchmarks/real_shapes.py --shapes clip-vit-b16 --runs zeroshot`"
        )
    data = real_shapes.build_data(shared_data, tmp_path / "data")
    argv = real_shapes.run_specs(model, data, tmp_path / "runs")["coop"]
    argv[argv.index("--max_steps") + 1] = "1"
    row = real_shapes.run_one(argv, tmp_path / "coop.log")
    assert row["status"] == "ok", (tmp_path / "coop.log").read_text()[-3000:]
    result = json.loads((tmp_path / "runs" / "coop" / "results.json").read_text())
    assert len(result["train_loss_first_last"]) == 2 and all(
        map(torch.isfinite, torch.tensor(result["train_loss_first_last"]))
    )
    from safetensors import safe_open

    with safe_open(str(tmp_path / "runs" / "coop" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118 (a safe_open handle)
    assert shapes and all(s[-1] == 512 for s in shapes)  # context vectors in the 512-wide text tower

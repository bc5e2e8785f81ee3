"""Scale-out that runs: MergeTune's weight-space families under DDP, full fine-tuning and MergeTune under FSDP2, on
2 CPU processes (gloo) against 1 process (slow, RUN_SLOW=1); and what they rest on, fast: FSDP2's scalar-parameter
rule, MergeTune's sharding guard and its in-place path point.

The 2-process jobs are ``tests/distributed_worker.py`` under ``accelerate launch`` with the shipped configs
(``cpu_2proc`` for DDP, ``fsdp`` for FSDP2 with ``--mixed_precision no``, so that the 1-process fp32 run is the
reference); the 1-process run is the same job in this process. Each trains 3 SGD steps of a global batch of 8 and
saves with ``trainer.save_model``. Measured on the 2-core CPU machine (max |Δ| of every saved tensor, 1 vs 2
processes): MergeTune full FT under DDP 3.0e-8 to 1.2e-7, MergeTune LoRA under DDP 1.5e-8, ``ClipClassificationTrainer``
full FT under FSDP2 6.0e-8, MergeTune full FT under FSDP2 6.0e-8. ``WEIGHT_ATOL`` = 1e-5 leaves room for other
summation orders and is far below what a lost gradient term, a missed all-reduce or a mis-sharded ŵ changes
(each test also checks that training moved the weights by far more than that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "hf_cft" / "accelerate_configs"
WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-5


def two_processes(job: str, out: Path, config: str, fsdp: bool = False) -> dict:
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if fsdp:
        env["HF_CFT_TEST_FSDP_ON_CPU"] = "1"  # see tests/distributed_worker.py
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(CONFIGS / config)]
    cmd += ["--mixed_precision", "no", str(REPO / "tests" / "distributed_worker.py"), job, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=str(REPO), check=False)
    assert proc.returncode == 0, f"{job} on 2 processes failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return json.loads((out / "result.json").read_text())


def one_process(job: str, out: Path) -> dict:
    import distributed_worker

    distributed_worker.main(job, str(out))
    return json.loads((out / "result.json").read_text())


def compare(job: str, file: str, tmp_path: Path, config: str, fsdp: bool = False) -> tuple[dict, dict, float]:
    r2 = two_processes(job, tmp_path / "p2", config, fsdp)
    r1 = one_process(job, tmp_path / "p1")
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r2["type"] == ("DistributedType.FSDP" if fsdp else "DistributedType.MULTI_CPU") and r2["fsdp"] is fsdp
    assert len(r1["losses"]) == len(r2["losses"]) == 3
    for a, b in zip(r1["losses"], r2["losses"]):
        assert b == pytest.approx(a, rel=LOSS_RTOL)
    w1, w2 = (load_file(str(tmp_path / p / "artefact" / file)) for p in ("p1", "p2"))
    assert w1.keys() == w2.keys() and w1
    for k in w1:
        assert w1[k].shape == w2[k].shape and w1[k].dtype == w2[k].dtype == torch.float32, k
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"| {job} | {config} | max |Δ| 1 vs 2 processes | {diff:.2g} |")
    assert diff <= WEIGHT_ATOL, f"{job}: 1 vs 2 processes max |Δ| {diff}"
    return w1, w2, diff


def moved(weights: dict, reference: dict) -> float:
    return max(float((weights[k] - reference[k]).abs().max()) for k in weights)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="launches 2 CPU processes (DDP); RUN_SLOW=1")
@pytest.mark.parametrize("family", ["full", "lora"])
def test_mergetune_weight_space_ddp_two_processes_equal_one(family, tmp_path):
    """MergeTune full fine-tuning and LoRA (cpu_2proc.yaml: DDP over gloo): the 1-process losses and weights."""
    file = "model.safetensors" if family == "full" else "adapter_model.safetensors"
    w1, _, _ = compare(f"mergetune-{family}", file, tmp_path, "cpu_2proc.yaml")
    import distributed_worker

    if family == "full":  # trained away from its τ-initialisation (½ŵ1 + ½ŵ2)
        from hf_cft.testing import tiny_clip

        zs, ft = tiny_clip().state_dict(), distributed_worker.finetuned_full().state_dict()
        assert moved(w1, {k: 0.5 * zs[k] + 0.5 * ft[k] for k in w1}) > 1e-3
    else:
        from peft import get_peft_model_state_dict

        ft = get_peft_model_state_dict(distributed_worker.perturbed(distributed_worker.lora(1), 4, 0.05))
        b = {k: v for k, v in w1.items() if "lora_B" in k}
        assert moved(b, {k: 0.5 * ft[k] for k in b}) > 1e-4  # B0 = τ·B2 (same scaling), then 3 steps


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="launches 2 CPU processes under FSDP2; RUN_SLOW=1")
def test_fsdp2_full_finetuning_two_cpu_processes_saves_the_one_process_model(tmp_path):
    """ClipClassificationTrainer full fine-tuning under FSDP2 (the shipped fsdp.yaml: CLIPEncoderLayer units, full
    state dict, rank-0 loading) on 2 gloo processes: it trains, ``save_model`` writes the gathered full model (with the
    logit scale 0-d again, trained: freeze_logit_scale=False), ``CLIPModel.from_pretrained`` loads it strictly, and
    it equals the 1-process model."""
    from transformers import CLIPModel

    from hf_cft.testing import tiny_clip

    w1, w2, _ = compare("clip-full", "model.safetensors", tmp_path, "fsdp.yaml", fsdp=True)
    init = tiny_clip().state_dict()
    assert w2["logit_scale"].shape == torch.Size([]) and moved(w2, init) > 1e-3
    assert float((w2["logit_scale"] - init["logit_scale"]).abs()) > 0  # the [1]-shaped scale trained and came back
    loaded = CLIPModel.from_pretrained(tmp_path / "p2" / "artefact")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, w2[k], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="launches 2 CPU processes under FSDP2; RUN_SLOW=1")
def test_mergetune_full_finetuning_under_fsdp2_equals_one_process(tmp_path):
    """MergeTune full fine-tuning under FSDP2: ŵ1, ŵ2 sharded like the DTensor parameters, the path point written
    shard by shard and run through FSDP's own all-gathers, its gradient reduce-scattered per α: the 1-process
    (functional_call) result."""
    compare("mergetune-full", "model.safetensors", tmp_path, "fsdp.yaml", fsdp=True)


# ------------------------------------------------------------------------------------------------ fast


def test_scalar_parameters_become_one_element_and_are_saved_zero_d(toy_tokenizer, tmp_path):
    """FSDP2 refuses 0-d parameters (CLIP's logit_scale): the trainer gives them shape [1] under FSDP, the model's
    outputs are unchanged, and ``_save`` writes them 0-d from the gathered state dict."""
    from tests_helpers import CLASSES, trainer_kwargs

    from hf_cft.testing import tiny_clip
    from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments
    from hf_cft.trainers.clip_trainer import fsdp_scalar_parameters

    model, ref = tiny_clip(), tiny_clip()
    model.logit_scale.requires_grad_(False)
    assert fsdp_scalar_parameters(model) == ["logit_scale"]
    assert model.logit_scale.shape == (1,) and not model.logit_scale.requires_grad
    assert fsdp_scalar_parameters(model) == []  # nothing 0-d is left
    x = torch.rand(2, 3, 30, 30)
    ids = torch.tensor([[97, 5, 98], [97, 6, 98]])
    torch.testing.assert_close(
        model(input_ids=ids, pixel_values=x).logits_per_image, ref(input_ids=ids, pixel_values=x).logits_per_image
    )
    args = ClipTrainingArguments(**trainer_kwargs(tmp_path))
    trainer = ClipClassificationTrainer(model, args, CLASSES, ["a {}."], toy_tokenizer)
    trainer._fsdp_scalars = ["logit_scale"]  # what __init__ records under FSDP
    trainer._save(str(tmp_path / "saved"), state_dict=trainer.model.state_dict())
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert saved["logit_scale"].shape == torch.Size([]) and float(saved["logit_scale"]) == float(ref.logit_scale)


def test_path_point_is_written_in_place_and_restored_exactly():
    """``FullWeightSpace.at_path_point``: inside, every tensor of w holds ŵ2 + α(w − ŵ2) (what the sharded path runs
    the model at); after, w is bit-identical, also when the block raises."""
    from hf_cft.testing import tiny_clip
    from hf_cft.trainers.mergetune_weightspace import FullWeightSpace

    model = tiny_clip()
    space = FullWeightSpace(model)
    space.attach_finetuned(tiny_clip(seed=1))
    before = {k: v.detach().clone() for k, v in space.params.items()}
    expected = space.path_params(0.3)
    with space.at_path_point(0.3):
        for k, p in space.params.items():
            torch.testing.assert_close(p.detach(), expected[k])
    with pytest.raises(RuntimeError, match="boom"), space.at_path_point(0.7):
        raise RuntimeError("boom")
    for k, p in space.params.items():
        assert torch.equal(p.detach(), before[k]), k

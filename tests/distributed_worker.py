"""One training job of ``tests/test_scale_out.py``, run as ``python tests/distributed_worker.py JOB OUT`` on one
process, or under ``accelerate launch --config_file ...`` on several (``PYTHONPATH`` = the repository root).

Every job trains a deterministic tiny CLIP on the colour toy task (16 images, a global batch of 8 split over the
processes, 3 SGD steps: one epoch and a half, so the data order of the second epoch matters too), then
``trainer.save_model(OUT/artefact)`` on every process (a collective under FSDP) and, on the main process,
``OUT/result.json`` (processes, distributed type, the logged training losses). Jobs:

``clip-full``
    ``ClipClassificationTrainer``, full fine-tuning (logit scale trainable too).
``mergetune-full``
    ``MergeTuneTrainer`` full fine-tuning: ŵ2 a perturbed copy of the pre-trained model, τ = 0.5, λ = 1e-2.
``mergetune-lora``
    ``MergeTuneTrainer`` LoRA: the continued and fine-tuned adapters on q_proj / v_proj of both towers.

``HF_CFT_TEST_FSDP_ON_CPU=1`` runs the job under the FSDP plugin that ``accelerate launch`` built from an FSDP
config although the processes are CPU processes: accelerate 1.15 never selects FSDP for them
(``AcceleratorState.__init__`` turns ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only for the
MULTI_GPU/NPU/XPU/... types, not MULTI_CPU), while torch's FSDP2 itself shards, all-gathers and reduce-scatters over
gloo on the CPU. The switch below is the only change: ``fully_shard``, the Trainer's FSDP code paths and the state
dict gathering are the real ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(1)

GLOBAL_BATCH = 8
STEPS = 3
LORA_TARGETS = ["q_proj", "v_proj"]


def fsdp_on_cpu() -> None:
    """Let accelerate's FSDP plugin act on CPU processes (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # both shared states: every later AcceleratorState() copies PartialState's over its own
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def perturbed(model, seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def finetuned_full():
    """ŵ2 of the full fine-tuning jobs: the pre-trained tiny CLIP moved on the tensors MergeTune trains (the logit
    scale stays: ``freeze_logit_scale``)."""
    from hf_cft.testing import tiny_clip

    model = tiny_clip()
    model.logit_scale.requires_grad_(False)
    return perturbed(model, 3, 0.02)


def lora(seed: int):
    from peft import LoraConfig, get_peft_model

    from hf_cft.testing import tiny_clip

    torch.manual_seed(seed)  # LoRA's A initialisation
    return get_peft_model(tiny_clip(), LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS))


def build(job: str, out: Path, world: int, bf16: bool = False):
    from conftest import ToyTokenizer
    from tests_helpers import CLASSES, colour_dataset, trainer_kwargs

    from hf_cft.testing import tiny_clip
    from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments, MergeTuneConfig, MergeTuneTrainer

    kw = trainer_kwargs(out, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world, bf16=bf16)
    kw.update(learning_rate=0.02, output_dir=str(out / "run"))
    data, tok, templates = colour_dataset(16), ToyTokenizer(), ["a photo of a {}."]
    if job == "clip-full":
        args = ClipTrainingArguments(**kw, freeze_logit_scale=False)
        return ClipClassificationTrainer(tiny_clip(), args, CLASSES, templates, tok, train_dataset=data)
    if job == "mergetune-full":
        args = MergeTuneConfig(**kw, anchor_weight=1e-2, tau=0.5, num_alphas=2)
        finetuned = finetuned_full()
        return MergeTuneTrainer(tiny_clip(), args, CLASSES, templates, tok, finetuned=finetuned, train_dataset=data)
    if job == "mergetune-lora":
        args = MergeTuneConfig(**kw, anchor_weight=1e-2, tau=0.5, num_alphas=2)
        finetuned = perturbed(lora(1), 4, 0.05)
        return MergeTuneTrainer(lora(0), args, CLASSES, templates, tok, finetuned=finetuned, train_dataset=data)
    raise SystemExit(f"unknown job {job!r}")


def main(job: str, out: str) -> None:
    if os.environ.get("HF_CFT_TEST_FSDP_ON_CPU") == "1":
        fsdp_on_cpu()
    out = Path(out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = build(job, out, world)
    trainer.train()
    trainer.save_model(str(out / "artefact"))
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result = {
            "processes": trainer.accelerator.num_processes,
            "type": str(trainer.accelerator.distributed_type),
            "fsdp": bool(trainer.is_fsdp_enabled),
            "losses": losses,
        }
        (out / "result.json").write_text(json.dumps(result))
    trainer.accelerator.wait_for_everyone()
    if world == 1:
        trainer.accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    # Under ``accelerate launch``: every rank is past the last barrier, everything is written; leave without the
    # process group's teardown. Tearing gloo down at exit raced now and then (1 run in ~70 on the CI machine): a
    # rank aborted with "terminate called without an active exception" after all its work was done, and the launcher
    # counted the job as failed. The test checks what the job wrote, not how torch's C++ destructors end.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

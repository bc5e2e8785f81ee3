"""Every recipe gives the same results under ``accelerate launch`` with 2 CPU processes (gloo,
``hf_cft/accelerate_configs/cpu_2proc.yaml``) as with one process, up to float rounding (slow, RUN_SLOW=1).

Each recipe runs twice on the offline digits demo at the smallest settings that still train and evaluate: once as
``python recipes/<r>.py`` and once as ``accelerate launch --config_file cpu_2proc.yaml recipes/<r>.py``, each into
its own output folder, and the final numbers they write are compared. The 2-process run keeps the global batch:
the Trainer recipes (coop, mergetune, condu, pam, mtil) take *per-device* batch sizes, so it gets half of the
1-process ``per_device_train_batch_size``; ``pretrain_clip``'s ``--batch_size`` is global (the same flag). CoOp and
MergeTune train 20 images with global batches of 6 and 8, so every epoch ends with a partial batch that accelerate
pads with repeated samples on 2 processes (the trainer trains on the real rows only).

Tolerances (float32 sums taken in another order, then a few optimiser steps):

- accuracies (%): ``ACC_TOL`` = 1 point (2 images of the smallest test split); the runs measured here agree exactly;
- losses: relative ``LOSS_RTOL`` = 1e-4 (measured: ≤ 1e-7);
- trained prompt contexts (CoOp, MergeTune) and the pretrained demo CLIP: absolute ``WEIGHT_ATOL`` = 1e-4 (measured:
  ≤ 5e-5). Not compared for the continual experts: Adam turns the float noise of gradients that are zero in exact
  arithmetic (e.g. attention key biases) into ±lr steps, so those weights differ by O(lr) while every prediction and
  loss agrees; their accuracy matrices and per-task losses are compared instead.

The demo CLIP is pretrained once per session into a temporary ``HF_CFT_CACHE`` and shared; the 2-process MergeTune
run uses an empty cache instead, so that it pretrains the demo CLIP with 2 processes (one writer, all waiting).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="launches 2-process runs of every recipe; RUN_SLOW=1"),
]

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "hf_cft" / "accelerate_configs" / "cpu_2proc.yaml"
ACC_TOL = 1.0
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4
DEMO_STEPS = 10  # pretraining steps of the demo CLIP (batch 128): enough to give it above-chance accuracy
# the continual recipes: 4 steps per task of a global batch of 8 on the three digits tasks, every step logged
CONTINUAL = ["--max_steps", "4", "--warmup_steps", "0", "--logging_steps", "1", "--use_cpu", "true"]
CONTINUAL += ["--demo_pretrain_steps", str(DEMO_STEPS)]


def _env(cache: Path) -> dict:
    return {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",  # cpu_2proc.yaml: accelerate does not pass use_cpu on to the processes
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),  # this checkout's hf_cft
        "HF_CFT_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
    }


def run_recipe(recipe: str, args: list[str], procs: int, cache: Path) -> float:
    """Run ``recipes/<recipe>.py`` with ``args`` on 1 process (plain python) or 2 (accelerate launch, gloo); return
    its wall time in seconds."""
    script = str(REPO / "recipes" / f"{recipe}.py")
    if procs == 1:
        cmd = [sys.executable, script]
    else:
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        cmd = [accelerate, "launch", "--config_file", str(CONFIG), script]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd + args, env=_env(cache), capture_output=True, text=True, timeout=420, cwd=str(REPO), check=False
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, (
        f"{recipe} on {procs} process(es) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    return seconds


def both(recipe: str, args: list[str], tmp_path: Path, cache: Path, per_device: int | None = None, cache2=None):
    """Run the recipe on 1 and on 2 processes into ``tmp_path/{p1,p2}``; with ``per_device`` (the 1-process
    per-device batch) the 2-process run gets half of it. Returns the two output folders and wall times."""
    outs, times = [], []
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        extra = ["--output_dir", str(out)]
        if per_device is not None:
            assert per_device % 2 == 0
            extra += ["--per_device_train_batch_size", str(per_device // procs)]
        times.append(run_recipe(recipe, args + extra, procs, cache2 if (procs == 2 and cache2) else cache))
        outs.append(out)
    return outs, times


def report(recipe: str, rows: list[tuple[str, float, float]], times: list[float]) -> None:
    """Print the parity rows (run pytest with -s to see them)."""
    for metric, a, b in rows:
        print(f"| {recipe} | {metric} | {a:.6g} | {b:.6g} | {abs(a - b):.2g} | {times[0]:.1f} s | {times[1]:.1f} s |")


def assert_close_accuracy(a, b, where: str) -> None:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape, where
    assert np.all(np.abs(a - b) <= ACC_TOL), f"{where}: 1 process {a.tolist()}, 2 processes {b.tolist()}"


def assert_close_loss(a: float, b: float, where: str) -> None:
    assert np.isfinite(a) and b == pytest.approx(a, rel=LOSS_RTOL), f"{where}: 1 process {a}, 2 processes {b}"


def assert_close_weights(file_a: Path, file_b: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(str(file_a)), load_file(str(file_b))
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff <= WEIGHT_ATOL, f"{file_a.name}: max |Δ| {diff}"
    return diff


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """A fresh HF_CFT_CACHE holding the digits demo CLIP (pretrained once, on one process)."""
    root = tmp_path_factory.mktemp("hf_cft_cache")
    code = (
        "from hf_cft.recipe_utils import load_sibling_recipe; "
        f"load_sibling_recipe({str(REPO / 'recipes' / 'mergetune.py')!r}, 'mergetune').demo_clip({DEMO_STEPS})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(root), capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "mergetune-demo-clip" / f"steps{DEMO_STEPS}-seed0" / "model" / "config.json").is_file()
    return root


def test_zeroshot(tmp_path, cache):
    (o1, o2), times = both("zeroshot", [], tmp_path, cache)
    r1, r2 = (json.loads((o / "zeroshot_results.json").read_text()) for o in (o1, o2))
    assert r2["machine"]["processes"] == 2 and r1["machine"]["processes"] == 1
    a, b = r1["results"]["digits"], r2["results"]["digits"]
    assert a["total"] == b["total"] == 539  # sharded and gathered without counting a padded image twice
    assert a["correct"] == b["correct"] and a["per_class_accuracy"] == b["per_class_accuracy"]
    report("zeroshot", [("digits accuracy (%)", a["accuracy"], b["accuracy"])], times)


def test_coop(tmp_path, cache):
    # 4 shots x 5 base digits = 20 images, global batch 6: 4 steps per epoch, the last one of 2 images (on 2
    # processes: 2 real + 1 repeated on rank 0, 3 repeated on rank 1), 2 epochs
    args = ["--shots", "4", "--num_train_epochs", "2", "--learning_rate", "0.05", "--optim", "adamw_torch"]
    args += ["--logging_steps", "1", "--use_cpu", "true", "--disable_tqdm", "true"]
    (o1, o2), times = both("coop", args, tmp_path, cache, per_device=6)
    r1, r2 = (json.loads((o / "results.json").read_text()) for o in (o1, o2))
    for row in ("zero-shot", "CoOp"):
        splits = list(r1["results"][row])
        assert_close_accuracy(
            [r1["results"][row][s] for s in splits], [r2["results"][row][s] for s in splits], f"coop {row}"
        )
    assert r1["results"]["CoOp"] != r1["results"]["zero-shot"]  # the training changed the predictions
    for a, b in zip(r1["train_loss_first_last"], r2["train_loss_first_last"]):
        assert_close_loss(a, b, "coop loss")
    diff = assert_close_weights(
        o1 / "adapter" / "adapter_model.safetensors", o2 / "adapter" / "adapter_model.safetensors"
    )
    assert (o2 / "adapter" / "README.md").is_file()
    rows = [(f"CoOp {s} accuracy (%)", r1["results"]["CoOp"][s], r2["results"]["CoOp"][s]) for s in ("base", "hm")]
    rows += [("last train loss", r1["train_loss_first_last"][-1], r2["train_loss_first_last"][-1])]
    report("coop", rows + [("context max |Δ|", 0.0, diff)], times)


def test_mergetune(tmp_path, cache):
    # the README's main job at demo size: CoOp 2 epochs, MergeTune 2 epochs, 20 shots, global batch 8 (the last
    # batch of each epoch: 4 images, all on rank 0 of 2 processes)
    args = ["--shots", "4", "--coop_epochs", "2", "--num_train_epochs", "2"]
    args += ["--demo_pretrain_steps", str(DEMO_STEPS), "--logging_steps", "1", "--use_cpu", "true"]
    args += ["--disable_tqdm", "true", "--demo_pretrain_pool", "1", "--demo_pretrain_views", "clean"]
    cold = tmp_path / "cold-cache"  # the 2-process run pretrains the demo CLIP itself
    (o1, o2), times = both("mergetune", args, tmp_path, cache, per_device=8, cache2=cold)
    demo = Path("mergetune-demo-clip") / f"steps{DEMO_STEPS}-seed0" / "model" / "model.safetensors"
    demo_diff = assert_close_weights(cache / demo, cold / demo)
    r1, r2 = (json.loads((o / "results.json").read_text()) for o in (o1, o2))
    for row in r1["results"]:
        keys = ("base", "novel", "hm")
        assert_close_accuracy(
            [r1["results"][row][k] for k in keys], [r2["results"][row][k] for k in keys], f"mergetune {row}"
        )
    assert r1["results"]["CoOp + MergeTune"] != r1["results"]["zero-shot (ensemble)"]
    for name, (a, b) in {
        k: (r1["train_loss_first_last"][k], r2["train_loss_first_last"][k]) for k in ("CoOp", "MergeTune")
    }.items():
        for x, y in zip(a, b):
            assert_close_loss(x, y, f"mergetune {name} loss")
    c1, c2 = (json.loads((o / "path_curves.json").read_text()) for o in (o1, o2))
    for split in c1:
        for path, curve in c1[split]["paths"].items():
            other = c2[split]["paths"][path]
            assert_close_accuracy(curve["accuracy"], other["accuracy"], f"{split} {path} accuracy")
            np.testing.assert_allclose(other["loss"], curve["loss"], rtol=LOSS_RTOL, err_msg=f"{split} {path}")
    diffs = [
        assert_close_weights(o1 / d / "adapter_model.safetensors", o2 / d / "adapter_model.safetensors")
        for d in ("coop", "mergetune")
    ]
    assert (o2 / "paths.png").is_file() and (o2 / "mergetune" / "README.md").is_file()
    row = "CoOp + MergeTune"
    rows = [(f"{row} {k} (%)", r1["results"][row][k], r2["results"][row][k]) for k in ("base", "novel", "hm")]
    rows += [
        (
            "MergeTune last train loss",
            r1["train_loss_first_last"]["MergeTune"][-1],
            r2["train_loss_first_last"]["MergeTune"][-1],
        )
    ]
    rows += [
        ("CoOp / MergeTune context max |Δ|", 0.0, max(diffs)),
        ("demo CLIP (pretrained on 1 vs 2 procs) max |Δ|", 0.0, demo_diff),
    ]
    report("mergetune", rows, times)


def test_pretrain_clip(tmp_path, cache):
    args = ["--datasets", "digits", "--pool_fraction", "1.0", "--image_size", "16", "--patch_size", "4"]
    args += ["--width", "32", "--layers", "1", "--heads", "2", "--projection_dim", "16", "--batch_size", "32"]
    args += ["--warmup_steps", "2", "--max_steps", "6", "--eval_every_minutes", "0", "--seed", "0"]
    (o1, o2), times = both("pretrain_clip", args, tmp_path, cache)  # --batch_size is global: the same flag
    r1, r2 = (json.loads((o / "zeroshot.json").read_text()) for o in (o1, o2))
    assert (r1["processes"], r2["processes"]) == (1, 2) and r1["images_seen"] == r2["images_seen"] == 6 * 32
    assert_close_loss(r1["final_loss"], r2["final_loss"], "pretrain final loss")
    a, b = r1["zeroshot"]["digits"], r2["zeroshot"]["digits"]
    assert_close_accuracy([a["ensemble"], a["single"]], [b["ensemble"], b["single"]], "pretrain zero-shot")
    diff = assert_close_weights(o1 / "model" / "model.safetensors", o2 / "model" / "model.safetensors")
    assert len((o2 / "curve.jsonl").read_text().splitlines()) == 1  # the final evaluation, written once
    rows = [("final contrastive loss", r1["final_loss"], r2["final_loss"])]
    rows += [("zero-shot accuracy (%)", a["ensemble"], b["ensemble"]), ("weights max |Δ|", 0.0, diff)]
    report("pretrain_clip", rows, times)


def _continual(recipe: str, strategies: list[str], tmp_path, cache, extra=()):
    args = ["--strategy", *strategies, *CONTINUAL, *extra]
    (o1, o2), times = both(recipe, args, tmp_path, cache, per_device=8)
    r1, r2 = (json.loads((o / "results.json").read_text())["results"] for o in (o1, o2))
    assert list(r1) == list(r2) == strategies
    rows = []
    for name in strategies:
        a, b = r1[name], r2[name]
        assert_close_accuracy(a["matrix"], b["matrix"], f"{recipe} {name} matrix")
        for key in a["metrics"]:
            assert abs(a["metrics"][key] - b["metrics"][key]) <= ACC_TOL, (name, key)
        assert len(a["history"]) == len(b["history"]) == 3
        for t, (h1, h2) in enumerate(zip(a["history"], b["history"])):
            assert_close_loss(h1["train_loss"], h2["train_loss"], f"{recipe} {name} task {t} loss")
            for key in h1:  # PAM's misalignment rates and reset counts, ConDU's timings aside
                if key.startswith("misalignment") or key == "reset_entries":
                    assert h2[key] == pytest.approx(h1[key], rel=1e-3, abs=1e-6), (name, t, key)
        # the matrix moved: training changed the predictions, so the comparison can tell runs apart
        assert np.array(a["matrix"])[-1].tolist() != np.array(a["matrix"])[0].tolist() or name == "zeroshot"
        assert (o2 / name / "README.md").is_file() and not list((o2 / name).glob(".checkpoint-*"))
        rows += [(f"{name} ACC (Last) (%)", a["metrics"]["last"], b["metrics"]["last"])]
        rows += [(f"{name} last task train loss", a["history"][-1]["train_loss"], b["history"][-1]["train_loss"])]
    report(recipe, rows, times)
    return o1, o2, r2


def test_condu(tmp_path, cache):
    _continual("condu", ["condu"], tmp_path, cache)


def test_pam(tmp_path, cache):
    _continual("pam", ["pam"], tmp_path, cache, extra=["--align_every", "2"])


def test_mtil_and_two_process_resume(tmp_path, cache):
    """A merging baseline whose experts go through the on-disk store (main writes, all read), then the finished
    2-process command re-run: every process resumes from the checkpoint, trains nothing, reports the same."""
    o1, o2, r2 = _continual("mtil", ["magmax"], tmp_path, cache)
    args = ["--strategy", "magmax", *CONTINUAL, "--output_dir", str(o2), "--per_device_train_batch_size", "4"]
    run_recipe("mtil", args, 2, cache)
    again = json.loads((o2 / "results.json").read_text())["results"]["magmax"]
    assert again["resumed_at"] == 3 and r2["magmax"]["resumed_at"] == 0
    assert again["matrix"] == r2["magmax"]["matrix"]
    assert sorted(p.name for p in (o2 / "magmax" / "store" / "experts").iterdir()) == [
        f"00{i}.safetensors" for i in range(3)
    ]


GRAD_PROBE = """
import os, sys, importlib.util, torch, torch.distributed as dist
import torch.nn.functional as F
spec = importlib.util.spec_from_file_location("pretrain_clip", {recipe!r})
pc = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pc; spec.loader.exec_module(pc)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

def setup():
    torch.manual_seed(0)
    w1, w2, s = (torch.randn(5, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True),
                 torch.tensor(2.0, requires_grad=True))
    return w1, w2, s, torch.randn(8, 5), torch.randn(8, 6)

def loss(w1, w2, s, x, y, n, r):
    return pc.contrastive_loss(F.normalize(x @ w1, dim=-1), F.normalize(y @ w2, dim=-1), s.exp(), n, r)

w1, w2, s, x, y = setup()
mine = slice(rank * 4, rank * 4 + 4)
local = loss(w1, w2, s, x[mine], y[mine], world, rank)
local.backward()
grads = [w1.grad, w2.grad, s.grad.reshape(1), local.detach().reshape(1)]
for g in grads:  # what DDP does with the gradients; the loss averaged for the log
    dist.all_reduce(g)
    g /= world
if rank == 0:
    w1, w2, s, x, y = setup()
    full = loss(w1, w2, s, x, y, 1, 0)
    full.backward()
    ref = [w1.grad, w2.grad, s.grad.reshape(1), full.detach().reshape(1)]
    print("MAXDIFF", max(float((a - b).abs().max()) for a, b in zip(grads, ref)))
dist.destroy_process_group()
"""


def test_pretrain_contrastive_loss_gradient_over_two_processes(tmp_path):
    """pretrain_clip's all-gathered contrastive loss: 2 processes with 4 pairs each, gradients averaged as DDP does,
    give the loss and gradient of one process with all 8 pairs (AdamW hides a gradient scale error; this does not)."""
    script = tmp_path / "probe.py"
    script.write_text(GRAD_PROBE.format(recipe=str(REPO / "recipes" / "pretrain_clip.py")))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        torchrun + [str(script)], env=_env(tmp_path), capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = float(proc.stdout.split("MAXDIFF")[1].split()[0])
    assert diff < 1e-6

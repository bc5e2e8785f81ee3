"""Subprocess worker for ``tests/test_resilience.py``: the victims of the SIGKILL tests.

Importing torch, transformers and hf_cft takes seconds (more on a busy machine), too long to pay for every kill, so
the worker is a small fork server: ``python tests/resilience_worker.py`` (``PYTHONPATH`` = the repository root)
imports everything once, then for each line ``MODE OUT [ARGS]`` on stdin forks a child that runs the job with its
stdout/stderr sent to ``OUT.log``, answers ``PID <pid>``, waits for the child and answers ``EXIT <pid> <status>``
(the raw ``waitpid`` status). The parent kills children with SIGKILL by pid: each is a real process dying
mid-write. Modes:

``continual OUT [STEPS]``
    A deterministic tiny CLIP and a 4-task synthetic colour stream (the helpers of ``tests/test_continual.py``)
    driven by ``ContinualRunner(ConDUStrategy(top_k=2))`` into ``OUT`` with ``resume=True``: rerunning after a kill
    continues from the last checkpoint.
``bundle-loop OUT``
    Saves :class:`~hf_cft.merging.DeltaFusionMerger` bundles into the same folder ``OUT`` forever, version after
    version (version ``v`` holds the tasks built from seeds ``0..v``, see :func:`bundle_version`), printing
    ``SAVED v`` after each complete save.
``artefact-loop OUT KIND``
    The same for a LoRA adapter, a full model, a PAM state (``KIND`` = ``adapter``, ``model``, ``pam``) and for
    ``hf-cft merge --overwrite`` into ``OUT`` (``merge``), versions 0, 1, 2 in turn (:func:`artefact_version`).
``checkpoint-loop OUT``
    The same with ``ContinualRunner._write_checkpoint`` (a ConDU strategy holding version ``v``'s merger, the
    manifest saying ``completed = v``) into ``OUT``.

Children log ``READY`` once their set-up is done and ``SAVED v`` / ``DONE`` lines to ``OUT.log``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(1)

NUM_TASKS = 4


def stream():
    """The 3-task stream of ``test_continual`` plus a fourth task with its own class permutation."""
    from test_continual import _colour_task, _tasks

    return [*_tasks(), _colour_task("d", [0, 2, 1], ["red", "tan", "sky"], 3)]


def run_continual(out: str, steps: int = 4) -> None:
    from conftest import ToyTokenizer
    from test_continual import _model, _runner

    from hf_cft.continual import ConDUStrategy

    model, tasks = _model(), stream()
    runner = _runner(ConDUStrategy(top_k=2), out, ToyTokenizer(), model=model, tasks=tasks, max_steps=steps)
    print("READY", flush=True)
    result = runner.run()
    print(f"DONE resumed_at={result.resumed_at}", flush=True)


def bundle_version(v: int, base_model):
    """Version ``v`` of the looped bundle: tasks ``t0..tv`` with seeded random deltas and prototypes, the base
    model's parameter names and shapes on the first two linear layers (small and quick to save)."""
    from hf_cft.merging import DeltaFusionMerger

    keys = [(n, p.shape) for n, p in base_model.named_parameters() if p.ndim == 2][:2]
    merger = DeltaFusionMerger(base_model=base_model)
    for t in range(v + 1):
        g = torch.Generator().manual_seed(1000 * v + t)
        delta = {n: torch.randn(s, generator=g) * 0.01 for n, s in keys}
        merger.add_task(delta, name=f"t{t}", prototypes=torch.randn(3, 8, generator=g), classnames=["x", "y", "z"])
    return merger


def bundle_loop(out: str) -> None:
    from test_continual import _model

    model = _model()
    versions = [bundle_version(v, model) for v in range(4)]
    print("READY", flush=True)
    v = 0
    while True:
        versions[v % len(versions)].save_pretrained(out)
        print(f"SAVED {v % len(versions)}", flush=True)
        v += 1


def checkpoint_loop(out: str) -> None:
    from conftest import ToyTokenizer
    from test_continual import _model, _runner

    from hf_cft.continual import ConDUStrategy
    from hf_cft.continual.strategies import RunContext

    model, tasks = _model(), stream()
    strategy = ConDUStrategy(top_k=2)
    runner = _runner(strategy, out, ToyTokenizer(), model=model, tasks=tasks)
    strategy.bind(RunContext(model, runner.tokenizer, runner.config, runner.evaluator, runner.tasks, Path(out)))
    versions = [bundle_version(v, model) for v in range(4)]
    identity = runner._identity()
    print("READY", flush=True)
    v = 0
    while True:
        strategy.merger = versions[v % len(versions)]
        runner._write_checkpoint({**identity, "completed": v % len(versions), "matrix": []})
        print(f"SAVED {v % len(versions)}", flush=True)
        v += 1


def artefact_version(kind: str, v: int, root: str | None = None):
    """Version ``v`` (0..2) of a looped artefact of ``kind``: a LoRA ``PeftModel`` of rank v+1 whose factors are
    all v+1 (config and weights disagree if mixed), a tiny CLIP built from seed v, or a PAM state merged v+1 times.
    ``merge`` versions are the ``--lam`` values of ``hf-cft merge`` (their weights are compared by the test)."""
    from peft import LoraConfig, get_peft_model

    from hf_cft.testing import tiny_clip

    if kind == "adapter":
        peft = get_peft_model(tiny_clip(), LoraConfig(r=v + 1, target_modules=["q_proj", "v_proj", "fc1"]))
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_" in n:
                    p.fill_(float(v + 1))
        return peft
    if kind == "model":
        return tiny_clip(seed=v)
    if kind == "pam":
        from hf_cft.merging import PAMConfig, PAMState, adapter_state, prepare_pam_model

        pam = prepare_pam_model(tiny_clip(), LoraConfig(r=2, target_modules=["fc1"]), PAMConfig())
        state = PAMState.from_model(pam)
        for t in range(v + 1):
            state.merge({k: x + 0.1 * (t + 1) for k, x in adapter_state(pam, "task").items()}, f"t{t}")
        return state
    if kind == "merge":
        return MERGE_LAMS[v]
    raise ValueError(kind)


MERGE_LAMS = (0.1, 0.2, 0.3)


def merge_assets(root: Path) -> tuple[Path, Path]:
    """A base model folder and a LoRA adapter folder under ``root`` for the ``hf-cft merge`` loop."""
    from peft import LoraConfig, get_peft_model

    from hf_cft.testing import tiny_clip

    base, lora = root / "merge_base", root / "merge_lora"
    if not base.is_dir():
        tiny_clip().save_pretrained(base)
        torch.manual_seed(0)
        get_peft_model(
            tiny_clip(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
        ).save_pretrained(lora)
    return base, lora


def artefact_loop(out: str, kind: str) -> None:
    """Save versions 0, 1, 2, 0, ... of an artefact of ``kind`` into ``out`` forever, each through hf_cft's
    crash-safe save (``save_pretrained_atomic`` for adapters and models, ``PAMState.save_pretrained``, ``hf-cft
    merge --overwrite``), printing ``SAVED v`` after each."""
    from hf_cft.utils import save_pretrained_atomic

    out_path = Path(out)
    if kind == "merge":
        from hf_cft.cli import main

        base, lora = merge_assets(out_path.parent)
    versions = [artefact_version(kind, v) for v in range(3)]
    print("READY", flush=True)
    v = 0
    while True:
        x = versions[v % 3]
        if kind in ("adapter", "model"):
            save_pretrained_atomic(x, out_path)
        elif kind == "pam":
            x.save_pretrained(out_path)
        else:
            argv = ["merge", "--base", str(base), "--method", "task_arithmetic", "--adapters", str(lora)]
            status = main([*argv, "--out", out, "--lam", str(x), "--overwrite"])
            assert status == 0, status
        print(f"SAVED {v % 3}", flush=True)
        v += 1


JOBS = {
    "continual": run_continual,
    "bundle-loop": bundle_loop,
    "checkpoint-loop": checkpoint_loop,
    "artefact-loop": artefact_loop,
}


def _child(mode: str, args: list[str]) -> None:
    """Run one job in the forked child and leave with ``os._exit`` (never back into the server loop)."""
    code = 1
    try:
        fd = os.open(args[0] + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        JOBS[mode](*args)
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import test_continual  # noqa: F401

    import hf_cft.continual  # noqa: F401  (the imports the children share)
    import hf_cft.merging  # noqa: F401

    print("SERVER", flush=True)
    for line in sys.stdin:
        mode, *args = line.split()
        if mode not in JOBS:
            print(f"ERROR unknown mode {mode!r}", flush=True)
            continue
        if mode == "continual" and len(args) > 1:
            args[1] = int(args[1])
        pid = os.fork()
        if pid == 0:
            _child(mode, args)
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {pid} {status}", flush=True)


if __name__ == "__main__":
    serve()

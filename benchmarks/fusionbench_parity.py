"""hf_cft's merging methods against FusionBench's own functions, on random CLIP-shaped task vectors.

    pip install --no-deps fusion-bench omegaconf hydra-core antlr4-python3-runtime==4.9.3 bidict lightning \
        lightning-utilities torchmetrics            # FusionBench without its training stack (any folder on sys.path)
    python benchmarks/fusionbench_parity.py          # writes benchmarks/results/fusionbench_parity.{json,md}

For every method that FusionBench (the ``fusion-bench`` package, imported, never copied) implements, the same
random task vectors τ_t (CLIP-like keys: square and non-square linear weights, biases, LayerNorms, a 2-D position
embedding, a 4-D patch embedding; T = 2, 3, 4; fixed seeds; every τ_t = shared part + own part, so that cosines
are positive as between real experts) go through FusionBench's function and through hf_cft's with matching
options, and the largest |Δ| of the merged task vector and |Δ| / max|reference| are reported, with a verdict:

* ``equal``: equal up to float rounding (relative difference ≤ 1e-4; SVDs and inverses in fp32);
* ``equal (convention)``: equal once a documented option or key selection is matched (the row says which);
* ``differs by design``: a documented difference (the row says what differs and what was checked instead).

Random methods (DARE) draw their masks from different random streams, so only their deterministic parts are
compared: the kept fraction, the rescale of the survivors and the mean over many seeds.

``tests/test_fusionbench_parity.py`` runs the same comparisons (smaller) when ``fusion_bench`` imports and skips
otherwise (CI does not install it).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import math
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "results"
TOL = 1e-4  # relative: fp32 SVDs / inverses on both sides

# CLIP-like keys (hidden 64, MLP 256, projection 32, 49 patches + CLS): name -> shape
SHAPES: dict[str, tuple[int, ...]] = {
    "vision_model.embeddings.class_embedding": (64,),
    "vision_model.embeddings.patch_embedding.weight": (64, 3, 4, 4),
    "vision_model.embeddings.position_embedding.weight": (50, 64),
    "vision_model.encoder.layers.0.layer_norm1.weight": (64,),
    "vision_model.encoder.layers.0.layer_norm1.bias": (64,),
    "vision_model.encoder.layers.0.self_attn.q_proj.weight": (64, 64),
    "vision_model.encoder.layers.0.self_attn.q_proj.bias": (64,),
    "vision_model.encoder.layers.0.mlp.fc1.weight": (256, 64),
    "vision_model.encoder.layers.0.mlp.fc1.bias": (256,),
    "vision_model.encoder.layers.0.mlp.fc2.weight": (64, 256),
    "visual_projection.weight": (32, 64),
}
LINEAR_KEYS = [k for k, s in SHAPES.items() if len(s) == 2 and "embed" not in k]


# ------------------------------------------------------------------------------------------------ FusionBench


def fusion_bench_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("fusion-bench")
    except metadata.PackageNotFoundError:
        return None


def fb(module: str):
    """A module of the installed FusionBench (``fusion_bench.<module>``)."""
    return importlib.import_module(f"fusion_bench.{module}")


def missing_reason() -> str | None:
    """Why FusionBench cannot be used here, or ``None`` when its merging modules import."""
    try:
        found = importlib.util.find_spec("fusion_bench") is not None
    except ValueError:  # already imported: FusionBench's lazy top-level module has no __spec__
        found = True
    if not found:
        return (
            "fusion_bench is not installed (pip install --no-deps fusion-bench; see benchmarks/fusionbench_parity.py)"
        )
    try:
        fb("method.isotropic_merging.iso_utils")
    except ImportError as e:  # its top level needs a few of its dependencies (omegaconf, lightning, bidict, ...)
        return f"fusion_bench is installed but its merging modules do not import: {e}"
    return None


class StateDictModel(nn.Module):
    """An ``nn.Module`` that is only a state dict (FusionBench's model-level functions read ``state_dict()`` and
    write ``load_state_dict()``; CLIP's dotted key names need no module tree this way)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self.state = {k: v.clone() for k, v in state.items()}

    def state_dict(self, *args, **kwargs):
        return dict(self.state)

    def load_state_dict(self, state, strict=True, assign=False):
        self.state = {k: v.clone() for k, v in state.items()}
        return SimpleNamespace(missing_keys=[], unexpected_keys=[])


def model_pool(base: dict, models: list[dict]) -> SimpleNamespace:
    """A stand-in for FusionBench's ``BaseModelPool``: what its algorithms' ``run`` reads."""
    names = [f"task{i}" for i in range(len(models))]
    by_name = dict(zip(names, models))
    return SimpleNamespace(
        model_names=names,
        all_model_names=names,
        load_pretrained_model=lambda: StateDictModel(base),
        load_model=lambda name: StateDictModel(base if name == "_pretrained_" else by_name[name]),
    )


# ------------------------------------------------------------------------------------------------ data


def task_vectors(num_tasks: int, seed: int, shared: float = 0.7, shapes=None) -> list[dict[str, torch.Tensor]]:
    """Random fp32 task vectors: per key shared·c + own_t (scaled like fine-tuning updates, 1e-2 for weights and
    1e-3 for LayerNorms and biases)."""
    shapes = shapes or SHAPES
    g = torch.Generator().manual_seed(seed)
    out = [{} for _ in range(num_tasks)]
    for key, shape in shapes.items():
        scale = 1e-3 if len(shape) == 1 else 1e-2
        common = torch.randn(shape, generator=g)
        for t in range(num_tasks):
            out[t][key] = scale * (shared * common + torch.randn(shape, generator=g))
    return out


def base_weights(seed: int, shapes=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return {k: 0.05 * torch.randn(s, generator=g) for k, s in (shapes or SHAPES).items()}


def diff(ours: dict, ref: dict) -> tuple[float, float]:
    """(max |ours − ref|, that / max |ref|) over every key of ``ref``."""
    if set(ours) != set(ref):
        raise AssertionError(f"key sets differ: {sorted(set(ours) ^ set(ref))}")
    worst = max(float((ours[k].double() - ref[k].double()).abs().max()) for k in ref)
    scale = max(float(ref[k].double().abs().max()) for k in ref)
    return worst, worst / scale if scale > 0 else worst


def minus(a: dict, b: dict) -> dict:
    return {k: a[k].double() - b[k].double() for k in b}


def plus(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


# ------------------------------------------------------------------------------------------------ comparisons
# Each returns one row: method, FusionBench function, ours, options, per-case differences, verdict, note.


def _row(method, fb_fn, ours_fn, options, cases, verdict, note, **extra):
    worst = max((c["max_rel"] for c in cases if "max_rel" in c), default=None)
    if verdict in ("equal", "equal (convention)") and worst is not None and worst > TOL:
        verdict = "DIFFERS"
    return {
        "method": method,
        "fusion_bench": fb_fn,
        "ours": ours_fn,
        "options": options,
        "cases": cases,
        "max_abs": max((c["max_abs"] for c in cases if "max_abs" in c), default=None),
        "max_rel": worst,
        "verdict": verdict,
        "note": note,
        **extra,
    }


def _case(T, seed, ours, ref, **more):
    a, r = diff(ours, ref)
    return {"T": T, "seed": seed, "max_abs": a, "max_rel": r, **more}


def compare_tsv_m(tasks=(2, 3, 4), seeds=(0, 1)) -> list[dict]:
    from hf_cft.merging import merge_deltas

    tsvm = fb("method.task_singular_vector.utils.TSVM_utils")
    excluded = [k for k, s in SHAPES.items() if len(s) == 2 and k not in LINEAR_KEYS]
    same_keys, all_2d = [], []
    for T in tasks:
        for seed in seeds:
            tv = task_vectors(T, seed)
            ref = tsvm.compute_and_sum_svd_mem_reduction(copy.deepcopy(tv), exclude_keys=excluded, accelerator="cpu")
            same_keys.append(_case(T, seed, merge_deltas(tv, "tsv_m"), ref))
            from hf_cft.merging.methods import tsv_m

            ref = tsvm.compute_and_sum_svd_mem_reduction(copy.deepcopy(tv), accelerator="cpu")
            all_2d.append(_case(T, seed, tsv_m(tv, matrix_keys=lambda k, t: t.ndim == 2), ref))
    # r < T: FusionBench keeps ⌊r/T⌋ = 0 triplets per task, hf_cft at least one
    small = {"w": (3, 16)}
    tv = task_vectors(4, 0, shapes=small)
    ref = tsvm.compute_and_sum_svd_mem_reduction(copy.deepcopy(tv), accelerator="cpu")
    ours = merge_deltas(tv, "tsv_m", shapes=None)
    fn = "fusion_bench.method.task_singular_vector.utils.TSVM_utils.compute_and_sum_svd_mem_reduction"
    return [
        _row(
            "tsv_m",
            fn,
            "merge_deltas(deltas, 'tsv_m') (hf_cft.merging.methods.tsv_m)",
            "alpha=1; FusionBench exclude_keys = the 2-D embeddings",
            same_keys,
            "equal (convention)",
            "hf_cft treats 2-D weights that are not embeddings as matrices (others averaged); FusionBench every 2-D "
            "tensor not in exclude_keys: equal with exclude_keys = the embeddings",
        ),
        _row(
            "tsv_m (every 2-D key a matrix)",
            fn,
            "tsv_m(deltas, matrix_keys=lambda k, t: t.ndim == 2)",
            "alpha=1; exclude_keys=None",
            all_2d,
            "equal (convention)",
            "matrix_keys= reproduces FusionBench's default key rule (position embedding merged by SVD too)",
        ),
        _row(
            "tsv_m, rank r < T",
            fn,
            "merge_deltas(deltas, 'tsv_m')",
            "a [3, 16] matrix, T = 4",
            [{"T": 4, "seed": 0, "fb_norm": float(ref["w"].norm()), "ours_norm": float(ours["w"].norm())}],
            "differs by design",
            "FusionBench keeps ⌊r/T⌋ = 0 singular triplets per task and returns a zero matrix; hf_cft keeps at least "
            "one per task (documented in tsv_m)",
        ),
    ]


def compare_iso(tasks=(2, 3, 4), seeds=(0, 1)) -> list[dict]:
    from hf_cft.merging import merge_deltas

    iso = fb("method.isotropic_merging.iso_utils")
    excluded = [k for k, s in SHAPES.items() if len(s) == 2 and k not in LINEAR_KEYS]
    rows = []
    for name, run_fb, params, fb_name in (
        (
            "iso_c",
            lambda tv: iso.iso_c(tv, accelerator="cpu", exclude_keys=excluded),
            {},
            "iso_c",
        ),
        (
            "iso_cts",
            lambda tv: iso.iso_cts(tv, common_space_fraction=0.8, accelerator="cpu", exclude_keys=excluded),
            {"common_fraction": 0.8},
            "iso_cts",
        ),
        (
            "iso_cts (common_fraction 0.5)",
            lambda tv: iso.iso_cts(tv, common_space_fraction=0.5, accelerator="cpu", exclude_keys=excluded),
            {"common_fraction": 0.5},
            "iso_cts",
        ),
    ):
        cases = []
        for T in tasks:
            for seed in seeds:
                tv = task_vectors(T, seed)
                ref = run_fb(copy.deepcopy(tv))
                cases.append(_case(T, seed, merge_deltas(tv, name.split()[0], params), ref))
        rows.append(
            _row(
                name,
                f"fusion_bench.method.isotropic_merging.iso_utils.{fb_name}",
                f"merge_deltas(deltas, {name.split()[0]!r}, {params})",
                f"alpha / scaling_factor = 1{', common_space_fraction = ' + str(params['common_fraction']) if params else ''}"
                "; FusionBench exclude_keys = the 2-D embeddings",
                cases,
                "equal (convention)",
                "same key rule as tsv_m (exclude_keys = the embeddings); FusionBench concatenates the task-specific "
                "directions before the common ones, which leaves U_⊥V_⊥ᵀ unchanged",
            )
        )
    return rows


def compare_model_stock(tasks=(2, 3, 4), seeds=(0, 1)) -> list[dict]:
    from hf_cft.merging import merge_deltas

    ms = fb("method.model_stock.model_stock")
    cases, negative = [], []
    for T in tasks:
        for seed in seeds:
            tv, base = task_vectors(T, seed), base_weights(seed)
            tv64 = [{k: v.double() for k, v in d.items()} for d in tv]
            base64 = {k: v.double() for k, v in base.items()}
            algo = ms.ModelStock(ignore_keys=[], model_save_path=None)
            merged = algo.run(model_pool(base64, [plus(base64, d) for d in tv64]))
            ref = minus(merged.state_dict(), base64)
            cases.append(_case(T, seed, merge_deltas(tv, "model_stock", {"average": "angle"}), ref))
    # a key whose deltas point apart (cos < 0): FusionBench's ratio turns negative, hf_cft clips t to 0
    g = torch.Generator().manual_seed(5)
    a = torch.randn(64, 64, generator=g) * 1e-2
    apart = [{"w": a}, {"w": -a + 1e-3 * torch.randn(64, 64, generator=g)}]
    base = {"w": torch.zeros(64, 64, dtype=torch.float64)}
    merged = ms.ModelStock(ignore_keys=[]).run(model_pool(base, [plus(base, d) for d in apart]))
    ref = minus(merged.state_dict(), base)
    ours = merge_deltas(apart, "model_stock")
    negative.append({"T": 2, "seed": 5, "fb_norm": float(ref["w"].norm()), "ours_norm": float(ours["w"].norm())})
    fn = "fusion_bench.method.model_stock.model_stock.ModelStock.run (compute_angle, compute_ratio, merge_weights)"
    return [
        _row(
            "model_stock",
            fn,
            "merge_deltas(deltas, 'model_stock', {'average': 'angle'})",
            "ignore_keys=[]; average='angle' (FusionBench's mean pairwise angle)",
            cases,
            "equal (convention)",
            "average='angle' reproduces FusionBench's mean of the pairwise angles (hf_cft's default 'cosine' averages "
            "the cosines; the two agree for T = 2); FusionBench's ignore_keys (open_clip names) keep the plain average "
            "there, hf_cft has no such list",
        ),
        _row(
            "model_stock, cos θ < 0",
            fn,
            "merge_deltas(deltas, 'model_stock')",
            "two deltas pointing apart (cos ≈ −1)",
            negative,
            "differs by design",
            "FusionBench's t = T·cos/(1 + (T−1)·cos) turns negative (or blows up near cos = −1/(T−1)); hf_cft clips "
            "cos θ to 0, i.e. t = 0 (θ0 for that tensor), documented in model_stock_ratio",
        ),
    ]


def compare_slerp(seeds=(0, 1, 2)) -> list[dict]:
    from hf_cft.merging import merge_deltas
    from hf_cft.merging.methods import slerp

    su = fb("method.slerp.slerp_utils")
    sl = fb("method.slerp.slerp")
    weights, deltas_ = [], []
    for seed in seeds:
        for t in (0.3, 0.5, 0.8):
            tv, base = task_vectors(2, seed), base_weights(seed)
            tv[1]["visual_projection.weight"] = tv[0]["visual_projection.weight"] * 1.5  # colinear: the lerp branch
            ref = minus(
                sl.slerp_on_state_dicts(t, plus(base, tv[0]), plus(base, tv[1])),
                base,
            )
            weights.append(_case(2, seed, slerp(tv, t=t, base=base), ref, t=t))
            ref = {k: su.slerp(t, tv[0][k], tv[1][k]) for k in tv[0]}
            deltas_.append(_case(2, seed, merge_deltas(tv, "slerp", {"t": t, "space": "delta"}), ref, t=t))
    zero = [{"w": torch.zeros(8, 8)}, {"w": torch.ones(8, 8)}]
    ref = su.slerp(0.5, zero[0]["w"], zero[1]["w"])
    ours = merge_deltas(zero, "slerp", {"t": 0.5, "space": "delta"})["w"]
    fn = "fusion_bench.method.slerp.slerp.slerp_on_state_dicts / slerp_utils.slerp"
    return [
        _row(
            "slerp (of the models θ0 + τ)",
            fn,
            "slerp(deltas, t, base=θ0) (merge_deltas 'slerp', space='weights', from files)",
            "t ∈ {0.3, 0.5, 0.8}; DOT_THRESHOLD 0.9995; one colinear key (lerp branch)",
            weights,
            "equal",
            "",
        ),
        _row(
            "slerp (of the deltas)",
            "fusion_bench.method.slerp.slerp_utils.slerp",
            "merge_deltas(deltas, 'slerp', {'space': 'delta'})",
            "t ∈ {0.3, 0.5, 0.8}",
            deltas_,
            "equal",
            "",
        ),
        _row(
            "slerp, a zero tensor",
            "fusion_bench.method.slerp.slerp_utils.slerp",
            "merge_deltas(deltas, 'slerp', {'space': 'delta'})",
            "t = 0.5, one input all zeros",
            [{"T": 2, "seed": 0, "fb_value": float(ref[0, 0]), "ours_value": float(ours[0, 0])}],
            "differs by design",
            "FusionBench leaves a zero vector unnormalised (dot = 0, ω = 90°): sin(tπ/2)·b; hf_cft interpolates "
            "linearly (t·b) where either tensor is zero (no angle is defined)",
        ),
    ]


def compare_regmean(tasks=(2, 3, 4), seeds=(0, 1)) -> list[dict]:
    from hf_cft.merging.data_dependent import regmean

    rm = fb("method.regmean.regmean")
    cases = []
    for alpha in (0.95, 0.6):
        for T in tasks:
            for seed in seeds:
                tv, base = task_vectors(T, seed), base_weights(seed)
                g = torch.Generator().manual_seed(100 + seed)
                grams = []
                for _ in range(T):
                    per = {}
                    for key in LINEAR_KEYS:
                        x = torch.randn(4 * SHAPES[key][1], SHAPES[key][1], generator=g) * torch.rand(
                            SHAPES[key][1], generator=g
                        )
                        per[key] = x.T @ x / x.shape[0]  # FusionBench's statistic: XᵀX / rows
                    grams.append(per)
                ours = regmean(tv, grams, alpha=alpha)
                refs = {}
                for dtype in (torch.float64, torch.float32):  # FusionBench's fp32 inverse adds its own rounding
                    params = {k: [(base[k] + d[k]).to(dtype) for d in tv] for k in SHAPES}
                    fb_grams = [{k[: -len(".weight")]: gk.to(dtype) for k, gk in gr.items()} for gr in grams]
                    merged = rm.merging_with_regmean_weights(
                        params, fb_grams, reduce_non_diagonal_ratio=alpha, weight_transpose=True
                    )
                    refs[dtype] = minus(merged, base)
                fp32 = diff(ours, refs[torch.float32])[1]
                cases.append(_case(T, seed, ours, refs[torch.float64], alpha=alpha, max_rel_vs_fusion_bench_fp32=fp32))
    return [
        _row(
            "regmean (the merge, given Gram matrices)",
            "fusion_bench.method.regmean.regmean.merging_with_regmean_weights",
            "hf_cft.merging.data_dependent.regmean(deltas, grams, alpha)",
            "alpha = reduce_non_diagonal_ratio ∈ {0.95 (FusionBench's CLIP config), 0.6}; weight_transpose=True",
            cases,
            "equal",
            "FusionBench run on float64 weights and Gram matrices (on fp32 ones its fp32 torch.inverse adds up to "
            "~2e-4 relative rounding on these Gram matrices: max_rel_vs_fusion_bench_fp32). "
            "FusionBench merges the weights W_t, hf_cft the deltas: (Σ G̃_t)⁻¹ Σ G̃_t W_t − W0 = (Σ G̃_t)⁻¹ Σ G̃_t τ_t; "
            "hf_cft solves in float64, FusionBench inverts in fp32. The Gram statistic itself: FusionBench keeps the "
            "running mean XᵀX / rows, hf_cft the sum (regmean(normalize=True) divides by the rows: the two agree "
            "whenever the tasks' calibration sets have the same number of rows, as here)",
        )
    ]


def compare_regmean_end_to_end(tasks=(2, 3, 4), seeds=(0, 1), alpha: float = 0.95) -> list[dict]:
    """RegMean from models and data: FusionBench's CLIP hooks (``get_regmean_weights``) on each expert's vision
    tower, then its merge, against ``merge_deltas(..., "regmean")`` on the same batches (tasks with different
    numbers of examples, so the Gram normalisation matters)."""
    from hf_cft.merging import merge_deltas
    from hf_cft.testing import tiny_clip

    rm = fb("method.regmean.regmean")
    cr = fb("method.regmean.clip_regmean")
    ru = fb("method.regmean.utils")
    fake = SimpleNamespace(  # what get_regmean_weights reads from its algorithm object
        clip_processor=None,  # the dataset already yields pixel tensors
        dataloader_kwargs={"batch_size": 4},
        fabric=SimpleNamespace(setup_dataloaders=lambda d: d, setup=lambda m: m),
        num_regmean_examples=10**9,  # every example
        compute_logits=lambda module, batch, task: module(batch[0]),  # the vision tower's forward (hooked)
    )
    cases = []
    for T in tasks:
        for seed in seeds:
            base = tiny_clip(seed=0)
            base_sd = {k: v for k, v in base.vision_model.state_dict().items() if v.is_floating_point()}
            experts, data = [], []
            for t in range(T):
                g = torch.Generator().manual_seed(1000 * seed + t)
                expert = copy.deepcopy(base)
                with torch.no_grad():
                    for p in expert.vision_model.parameters():
                        p.add_(0.02 * torch.randn(p.shape, generator=g))
                experts.append(expert)
                data.append([(torch.randn(3, 30, 30, generator=g), 0) for _ in range(8 + 4 * t)])
            refs = {}
            for dtype in (torch.float64, torch.float32):  # FusionBench's fp32 statistics and inverse round more
                fb_stats, params = [], {}
                for t, expert in enumerate(experts):
                    tower = copy.deepcopy(expert.vision_model).to(dtype)
                    modules = ru.get_modules_to_merge(tower, [nn.Linear])
                    batches = [(x.to(dtype), y) for x, y in data[t]]
                    fb_stats.append(
                        cr.RegMeanAlgorithmForCLIP.get_regmean_weights(fake, f"task{t}", tower, batches, modules)
                    )
                    for k, v in tower.state_dict().items():
                        if k in base_sd:
                            params.setdefault(k, []).append(v.detach())
                merged = rm.merging_with_regmean_weights(params, fb_stats, reduce_non_diagonal_ratio=alpha)
                refs[dtype] = {f"vision_model.{k}": merged[k].double() - base_sd[k].double() for k in base_sd}
            ref = refs[torch.float64]
            deltas = [
                {
                    f"vision_model.{k}": v.detach() - base_sd[k]
                    for k, v in e.vision_model.state_dict().items()
                    if k in base_sd
                }
                for e in experts
            ]
            loaders = [[torch.stack([x for x, _ in d[i : i + 4]]) for i in range(0, len(d), 4)] for d in data]
            ours = merge_deltas(
                deltas, "regmean", {"alpha": alpha, "normalize": True}, extra={"model": base, "calibration": loaders}
            )
            fp32 = diff(ours, refs[torch.float32])[1]
            cases.append(_case(T, seed, ours, ref, linear_keys=len(fb_stats[0]), max_rel_vs_fusion_bench_fp32=fp32))
    return [
        _row(
            "regmean (statistics + merge, tiny CLIP)",
            "fusion_bench.method.regmean.clip_regmean.RegMeanAlgorithmForCLIP.get_regmean_weights + "
            "regmean.merging_with_regmean_weights",
            "merge_deltas(deltas, 'regmean', {'alpha': 0.95, 'normalize': True}, extra={'model', 'calibration'})",
            f"reduce_non_diagonal_ratio = alpha = {alpha}; 8 + 4·t examples for task t, batches of 4; vision tower",
            cases,
            "equal (convention)",
            "normalize=True divides each Gram matrix by its rows, as FusionBench's running mean XᵀX / rows (hf_cft's "
            "default sums XᵀX: it differs from FusionBench when the tasks' calibration sets differ in size); the hooks "
            "see the same inputs of every nn.Linear. FusionBench run in float64 (its own fp32 run differs by ~1e-4 relative: "
            "max_rel_vs_fusion_bench_fp32)",
        )
    ]


def compare_fisher(tasks=(2, 3, 4), seeds=(0, 1)) -> list[dict]:
    from hf_cft.merging.data_dependent import fisher_merging

    fm = fb("method.fisher_merging.fisher_merging")
    rows = []
    for normalize in (False, True):
        cases = []
        for floor in (1e-6, 0.0):
            for T in tasks:
                for seed in seeds:
                    tv, base = task_vectors(T, seed), base_weights(seed)
                    g = torch.Generator().manual_seed(200 + seed)
                    # Fisher entries over several orders of magnitude, some below the 1e-6 floor
                    fishers = [
                        {
                            k: torch.rand(s, generator=g) ** 4 * 10 ** (-4 * torch.rand(1, generator=g))
                            for k, s in SHAPES.items()
                        }
                        for _ in range(T)
                    ]
                    lam = [1.0 + 0.5 * t for t in range(T)]
                    params = {k: [base[k] + d[k] for d in tv] for k in SHAPES}
                    merged = fm.merging_with_fisher_weights(
                        params,
                        fishers,
                        fisher_scaling_coefficients=torch.tensor(lam),
                        normalize_fisher_weight=normalize,
                        minimal_fisher_weight=floor,
                    )
                    ours = fisher_merging(tv, fishers, weights=lam, floor=floor, normalize=normalize)
                    cases.append(_case(T, seed, ours, minus(merged, base), floor=floor))
        rows.append(
            _row(
                f"fisher (the merge, given Fishers; normalize={normalize})",
                "fusion_bench.method.fisher_merging.fisher_merging.merging_with_fisher_weights",
                f"hf_cft.merging.data_dependent.fisher_merging(deltas, fishers, weights, floor, normalize={normalize})",
                f"normalize_fisher_weight={normalize}; minimal_fisher_weight = floor ∈ {{1e-6, 0}}; "
                "fisher_scaling_coefficients = weights",
                cases,
                "equal",
                "normalize=True: each task's weight is λ_t·(F_t + floor)/(‖F_t‖ + floor), ‖·‖ over every key "
                "(FusionBench's placement of the floor)"
                if normalize
                else "",
            )
        )
    rows.append(
        _row(
            "fisher (the Fisher statistic)",
            "fusion_bench.method.fisher_merging.fisher_merging.fisher_merging",
            "hf_cft.merging.data_dependent.fisher_diagonal",
            "",
            [],
            "differs by design",
            "not compared: FusionBench squares the gradient of the batch sum Σ_i Σ_y √p(y|x_i)·log p(y|x_i) (one "
            "backward per batch: cross terms between examples and classes), hf_cft averages per-example squared "
            "gradients of log p(y|x) (the paper's diagonal Fisher; y sampled, expected or the label)",
        )
    )
    return rows


def compare_ties(tasks=(2, 3, 4), seeds=(0, 1)) -> list[dict]:
    from hf_cft.merging import merge_deltas

    tu = fb("method.ties_merging.ties_merging_utils")
    rows = []
    for merge in ("sum", "mean", "max"):
        cases = []
        for T in tasks:
            for seed in seeds:
                tv = task_vectors(T, seed)
                flat = torch.vstack([tu.state_dict_to_vector(d) for d in tv])
                merged = tu.ties_merging(flat, reset_thresh=20, merge_func=merge)
                ref = tu.vector_to_state_dict(0.3 * merged, copy.deepcopy(tv[0]))
                ours = merge_deltas(tv, "ties", {"density": 0.2, "trim_scope": "model", "merge": merge, "weight": 0.3})
                cases.append(_case(T, seed, ours, ref))
        rows.append(
            _row(
                f"ties (merge_func={merge})",
                "fusion_bench.method.ties_merging.ties_merging_utils.ties_merging",
                f"merge_deltas(deltas, 'ties', {{'trim_scope': 'model', 'merge': {merge!r}}})",
                "threshold 20 = density 0.2; scaling_factor = weight 0.3",
                cases,
                "equal (convention)",
                "trim_scope='model' is FusionBench's trim over the whole task vector (hf_cft's default trims per "
                "tensor, as peft); merge= is its merge_func (hf_cft's default 'mean' is the paper's)",
            )
        )
    return rows


def compare_task_arithmetic(tasks=(2, 3, 4), seeds=(0, 1)) -> list[dict]:
    from hf_cft.merging import merge_deltas

    ta = fb("method.task_arithmetic.task_arithmetic")
    mm = fb("method.magmax.magmax")
    rows = []
    for name, fn, params, fb_name in (
        ("task_arithmetic", ta.task_arithmetic_merge, {"weight": 0.3}, "task_arithmetic.task_arithmetic_merge"),
        ("magmax", mm.magmax_merge, {"weight": 0.5}, "magmax.magmax.magmax_merge"),
    ):
        cases = []
        for T in tasks:
            for seed in seeds:
                tv, base = task_vectors(T, seed), base_weights(seed)
                if name == "magmax":  # exact magnitude ties: the later task wins in both
                    tv[-1]["visual_projection.weight"] = -tv[0]["visual_projection.weight"]
                tv64 = [{k: v.double() for k, v in d.items()} for d in tv]
                base64 = {k: v.double() for k, v in base.items()}
                merged = fn(StateDictModel(base64), [StateDictModel(plus(base64, d)) for d in tv64], params["weight"])
                cases.append(_case(T, seed, merge_deltas(tv, name, params), minus(merged.state_dict(), base64)))
        rows.append(
            _row(
                name,
                f"fusion_bench.method.{fb_name}",
                f"merge_deltas(deltas, {name!r}, {params})",
                f"scaling_factor = {params['weight']}" + ("; exact |τ| ties included" if name == "magmax" else ""),
                cases,
                "equal",
                "",
            )
        )
    return rows


def compare_dare(rho: float = 0.9, num_seeds: int = 300) -> list[dict]:
    from hf_cft.merging.baselines import dare

    du = fb("method.dare.utils")
    tv = task_vectors(2, 0, shapes={"w": (64, 64)})
    tau = tv[0]["w"]
    kept = {"fb": [], "ours": []}
    rescale = {"fb": 0.0, "ours": 0.0}
    mean = {"fb": torch.zeros_like(tau, dtype=torch.float64), "ours": torch.zeros_like(tau, dtype=torch.float64)}
    for s in range(num_seeds):
        torch.manual_seed(s)
        d = {"w": tau.clone()}
        du.module_random_drop_(d, rho, rescale=True)
        ours = dare([{"w": tau}], rho=rho, seed=s, then="ta", lam=1.0)["w"]
        for who, out in (("fb", d["w"]), ("ours", ours)):
            nz = out != 0
            kept[who].append(float(nz.float().mean()))
            rescale[who] = max(rescale[who], float((out[nz] - tau[nz] / (1 - rho)).abs().max()))
            mean[who] += out.double() / num_seeds
    n = tau.numel() * num_seeds
    sd = math.sqrt(rho * (1 - rho) / n)
    # the mean over seeds of an unbiased estimator: its error against τ, in units of its standard error
    se = (tau.double().abs() * math.sqrt(rho / ((1 - rho) * num_seeds))).clamp(min=1e-12)
    z = {who: float(((mean[who] - tau.double()) / se).pow(2).mean().sqrt()) for who in mean}
    case = {
        "rho": rho,
        "seeds": num_seeds,
        "kept_fraction_fb": sum(kept["fb"]) / num_seeds,
        "kept_fraction_ours": sum(kept["ours"]) / num_seeds,
        "kept_fraction_sd": sd,
        "survivor_rescale_max_abs_fb": rescale["fb"],
        "survivor_rescale_max_abs_ours": rescale["ours"],
        "mean_over_seeds_rms_z_fb": z["fb"],
        "mean_over_seeds_rms_z_ours": z["ours"],
    }
    ok = (
        abs(case["kept_fraction_fb"] - (1 - rho)) < 5 * sd
        and abs(case["kept_fraction_ours"] - (1 - rho)) < 5 * sd
        and rescale["ours"] <= 1e-6 * float(tau.abs().max()) / (1 - rho)
        and rescale["fb"] <= 1e-6 * float(tau.abs().max()) / (1 - rho)
        and 0.8 < z["ours"] < 1.2
        and 0.8 < z["fb"] < 1.2
    )
    return [
        _row(
            "dare (drop and rescale)",
            "fusion_bench.method.dare.utils.param_random_drop_ (DareTaskArithmetic)",
            "hf_cft.merging.baselines.dare(then='ta') (merge_deltas 'dare', density = 1 − ρ)",
            f"sparsity_ratio = rho = {rho}, rescale=True; {num_seeds} seeds",
            [case],
            "differs by design" if ok else "DIFFERS",
            "masks from different random streams (FusionBench: torch.rand_like on the global generator, keep where "
            "> ρ; hf_cft: a generator per key seeded from (seed, key)); checked instead: kept fraction 1 − ρ, "
            "survivors exactly τ/(1 − ρ), mean over seeds → τ (RMS z ≈ 1: unbiased). DARE+TIES differs by design: "
            "FusionBench's DareTiesMerging trims the dropped vectors again (TIES threshold) and sums, hf_cft's "
            "then='ties' elects signs on the dropped vectors and takes the disjoint mean (peft's dare_ties)",
        )
    ]


def compare_emr(tasks=(2, 3, 4), seeds=(0, 1)) -> list[dict]:
    from hf_cft.merging.baselines import emr

    eu = fb("method.emr_merging.utils")
    cases = []
    for T in tasks:
        for seed in seeds:
            tv = task_vectors(T, seed)
            tv[-1]["vision_model.encoder.layers.0.self_attn.q_proj.bias"] = -sum(
                d["vision_model.encoder.layers.0.self_attn.q_proj.bias"] for d in tv[:-1]
            )  # Σ_t τ_t = 0 exactly on a key: the zero-sign rule
            unified, masks, rescalers = eu.emr_merge(copy.deepcopy(tv))
            ours = emr(tv)
            case = _case(T, seed, ours.unified, unified)
            case["mask_mismatches"] = sum(
                int((ours.masks[t][k] != masks[k][t]).sum()) for t in range(T) for k in unified
            )
            case["rescaler_max_rel"] = max(
                abs(a - float(b)) / abs(float(b)) for a, b in zip(ours.rescalers, rescalers)
            )
            per_task = max(
                diff(ours.task_delta(t), {k: rescalers[t] * masks[k][t] * unified[k] for k in unified})[1]
                for t in range(T)
            )
            case["task_delta_max_rel"] = per_task
            cases.append(case)
    ok = all(c["mask_mismatches"] == 0 and c["rescaler_max_rel"] < TOL for c in cases)
    return [
        _row(
            "emr",
            "fusion_bench.method.emr_merging.utils.emr_merge",
            "hf_cft.merging.baselines.emr(deltas) (rescaler='mean', zero_sign=-1, the defaults)",
            "a key with Σ_t τ_t = 0 exactly included",
            cases,
            "equal" if ok else "DIFFERS",
            "unified vector, every mask and every rescaler compared",
        )
    ]


def compare_tall(tasks=(2, 3, 4), seeds=(0, 1), lam: float = 0.4, k: int = 2) -> list[dict]:
    from hf_cft.merging.baselines import consensus, tall_masks

    tm = fb("method.tall_mask.utils")
    tu = fb("method.ties_merging.ties_merging_utils")
    tall_cases, cons_cases, fb_bug = [], [], []
    for T in tasks:
        for seed in seeds:
            tv = task_vectors(T, seed)
            zero = {kk: torch.zeros_like(v) for kk, v in tv[0].items()}
            flat_tv = torch.vstack([tu.state_dict_to_vector(d) for d in tv])
            flat_ptm = tu.state_dict_to_vector(zero)  # θ0 = 0: θ_t = τ_t exactly, no rounding in θ0 + τ − θ0
            masks = tm.generate_task_masks(flat_tv, flat_tv + flat_ptm, flat_ptm, tall_mask_lambda=lam)
            ours = tall_masks(tv, lam)
            mism = sum(
                int(
                    (
                        tu.state_dict_to_vector({kk: m.float() for kk, m in ours.masks[t].items()}) != masks[t].float()
                    ).sum()
                )
                for t in range(T)
            )
            tall_cases.append({"T": T, "seed": seed, "mask_mismatches": mism, "entries": int(masks.numel())})
            if k <= T:
                votes = masks.float().sum(0)
                ref = tu.vector_to_state_dict(0.3 * (votes >= k).float() * flat_tv.sum(0), copy.deepcopy(zero))
                cons_cases.append(_case(T, seed, consensus(tv, lambdas=lam, k=k, lam=0.3), ref))
            # FusionBench's TallMaskTaskArithmeticAlgorithm.run passes τ_t where θ_t is expected
            ta = fb("method.tall_mask.task_arithmetic")
            base = base_weights(seed)
            mtl = {kk: sum(d[kk] for d in tv) for kk in tv[0]}
            as_run = ta.generate_task_masks(mtl, tv[0], base, tall_mask_lambda=lam)
            as_paper = ta.generate_task_masks(plus(base, mtl), plus(base, tv[0]), base, tall_mask_lambda=lam)
            fb_bug.append(
                {
                    "T": T,
                    "seed": seed,
                    "masks_differing_entries": sum(int((as_run[kk] != as_paper[kk]).sum()) for kk in mtl),
                    "entries": sum(v.numel() for v in mtl.values()),
                }
            )
    return [
        _row(
            "tall_masks",
            "fusion_bench.method.tall_mask.utils.generate_task_masks",
            "hf_cft.merging.baselines.tall_masks(deltas, lambdas)",
            f"tall_mask_lambda = {lam}; tv = Σ_t τ_t",
            tall_cases,
            "equal" if all(c["mask_mismatches"] == 0 for c in tall_cases) else "DIFFERS",
            "m_t = |θ0 − θ_t| > λ·|θ_MTL − θ_t|, every mask entry compared. FusionBench's own "
            "TallMaskTaskArithmeticAlgorithm.run calls the state-dict generate_task_masks with the task vector τ_t "
            "where θ_t is expected, i.e. |θ0 − τ_t| > λ·|τ_MTL − τ_t| (see fusionbench_tall_run_masks)",
            fusionbench_tall_run_masks=fb_bug,
        ),
        _row(
            "consensus",
            "fusion_bench.method.tall_mask.utils.generate_task_masks (+ the vote count of construct_consensus_mask)",
            "hf_cft.merging.baselines.consensus(deltas, lambdas, k, lam)",
            f"tall_mask_lambda = {lam}, prun_thre_k = k = {k}, λ = 0.3",
            cons_cases,
            "equal",
            "FusionBench's construct_consensus_mask reads the TALL masks from files; the same count ≥ k is applied "
            "to its generate_task_masks output here",
        ),
    ]


NOT_IN_FUSIONBENCH = [
    {
        "method": "breadcrumbs",
        "fusion_bench": None,
        "ours": "hf_cft.merging.methods.breadcrumbs",
        "verdict": "not compared",
        "note": "FusionBench (this version) has no Model Breadcrumbs; tested against the paper's definition only",
    },
    {
        "method": "della",
        "fusion_bench": None,
        "ours": "hf_cft.merging.methods.della",
        "verdict": "not compared",
        "note": "FusionBench (this version) has no DELLA; tested against the paper's definition only",
    },
]

COMPARISONS: dict[str, Callable[..., list[dict]]] = {
    "tsv_m": compare_tsv_m,
    "iso": compare_iso,
    "model_stock": compare_model_stock,
    "slerp": compare_slerp,
    "regmean": compare_regmean,
    "regmean_models": compare_regmean_end_to_end,
    "fisher": compare_fisher,
    "ties": compare_ties,
    "task_arithmetic": compare_task_arithmetic,
    "dare": compare_dare,
    "emr": compare_emr,
    "tall": compare_tall,
}


# ------------------------------------------------------------------------------------------------ output


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.1e}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# hf_cft merging against FusionBench",
        "",
        f"FusionBench {meta['fusion_bench_version']}, torch {meta['torch']}, {meta['date']} (CPU). Command: "
        "`python benchmarks/fusionbench_parity.py`. Random CLIP-shaped task vectors (T = 2, 3, 4; seeds 0, 1); "
        "max |Δ| of the merged task vector and |Δ| / max |reference|.",
        "",
        "| method | FusionBench function | hf_cft | options | max abs | max rel | verdict | note |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(text) -> str:
        return str(text).replace("|", "\\|")

    for r in rows:
        fb_fn = "—" if r["fusion_bench"] is None else f"`{r['fusion_bench']}`"
        lines.append(
            f"| {r['method']} | {fb_fn} | `{r['ours']}` | {cell(r.get('options', ''))} | "
            f"{_fmt(r.get('max_abs'))} | {_fmt(r.get('max_rel'))} | {r['verdict']} | {cell(r['note'])} |"
        )
    extra = [r for r in rows if r["verdict"] in ("differs by design", "DIFFERS") and r.get("cases")]
    if extra:
        lines += ["", "## Cases that differ", ""]
        for r in extra:
            lines.append(f"- **{r['method']}**: {json.dumps(r['cases'][0])}")
    tall = next((r for r in rows if r["method"] == "tall_masks"), None)
    if tall:
        lines += [
            "",
            "FusionBench's `TallMaskTaskArithmeticAlgorithm.run` masks (τ_t passed as θ_t) against the same function "
            "given θ_t, entries that differ: "
            + ", ".join(
                f"T={c['T']}: {c['masks_differing_entries']}/{c['entries']}"
                for c in tall["fusionbench_tall_run_masks"]
            ),
        ]
    return "\n".join(lines) + "\n"


def run(names=None, **kwargs) -> list[dict]:
    import contextlib
    import io

    rows = []
    for name, fn in COMPARISONS.items():
        if names and name not in names:
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints progress and profiler tables
            rows.extend(fn(**kwargs.get(name, {})))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(COMPARISONS), help="run these comparisons only")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    reason = missing_reason()
    if reason:
        raise SystemExit(reason)
    torch.manual_seed(0)
    rows = run(args.only) + ([] if args.only else NOT_IN_FUSIONBENCH)
    meta = {
        "fusion_bench_version": fusion_bench_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "tolerance_rel": TOL,
    }
    from hf_cft.utils import atomic_path

    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "fusionbench_parity.json") as tmp:
        Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float) + "\n")
    with atomic_path(args.out / "fusionbench_parity.md") as tmp:
        Path(tmp).write_text(markdown(rows, meta))
    for r in rows:
        print(f"{r['method']:45s} {_fmt(r.get('max_rel')):>8s}  {r['verdict']}")


if __name__ == "__main__":
    main()

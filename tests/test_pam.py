"""PAM (pam.md §1–§6): config validation, hand-checked alignment / merge / diagnostics, the callback in a plain loop
(exact resets and optimiser moments), inside ClipClassificationTrainer, and PAMState persistence."""

import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import TrainerControl, TrainerState

from hf_cft.errors import AlignmentError, BundleError, NonFiniteError
from hf_cft.merging.pam import (
    PAMCallback,
    PAMConfig,
    PAMState,
    adapter_state,
    factor_merge_gap,
    importance_mask,
    importance_masks,
    merge_weight,
    pam_align,
    pam_merge,
    prepare_pam_model,
    sign_misalignment,
)
from hf_cft.models.clip import image_features
from hf_cft.testing import tiny_clip


def T(x):
    return torch.tensor(x, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"align_every": 0}, "align_every"),
        ({"align_every": 2.5}, "align_every"),
        ({"reset": "mean"}, "reset"),
        ({"moment_reset": "second"}, "moment_reset"),
        ({"merge_weight": 0.0}, "merge_weight"),
        ({"merge_weight": "average"}, "merge_weight"),
        ({"factors": ("A", "C")}, "factors"),
        ({"factors": ()}, "factors"),
        ({"task_adapter": "global"}, "task_adapter"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(AlignmentError, match=field):
        PAMConfig(**kwargs)
    assert issubclass(AlignmentError, ValueError)


def test_config_defaults_and_dict_round_trip():
    cfg = PAMConfig()
    assert (cfg.top_p, cfg.align_every, cfg.reset, cfg.moment_reset, cfg.merge_weight, cfg.factors) == (
        0.5,
        10,
        "zero",
        "first",
        "half",
        ("A", "B"),
    )
    other = PAMConfig(top_p=0.3, align_every=3, reset="global", merge_weight=0.25, factors=("B",))
    assert PAMConfig.from_dict(json.loads(json.dumps(other.to_dict()))) == other
    with pytest.raises(AlignmentError, match="no field"):
        PAMConfig.from_dict({"p": 0.5})


def test_merge_weight_rules():
    assert merge_weight(1, "half") == 1.0  # first task: copy
    assert merge_weight(1, 0.3) == 1.0
    assert merge_weight(2, "half") == 0.5
    assert merge_weight(4, "running") == 0.25
    assert merge_weight(3, 0.3) == 0.3
    with pytest.raises(AlignmentError, match="task index"):
        merge_weight(0)


# ------------------------------------------------------------------------------------------------ hand examples

GA, GB = "m.lora_A.weight", "m.lora_B.weight"
GLOBAL = {GA: T([[0.5, -0.4, 0.1, 0.05]]), GB: T([[-1.0], [0.2]])}
TASK = {GA: T([[-0.2, -0.1, -0.3, 0.0]]), GB: T([[0.0], [-0.3]])}


def test_importance_mask_by_hand():
    g = T([0.1, -0.5, 0.3, 0.0, -0.2, 0.4])
    assert importance_mask(g, 0.5).tolist() == [False, True, True, False, False, True]  # top 3 of 6
    assert importance_mask(g, 1.0).tolist() == [True, True, True, False, True, True]  # zeros never count
    assert importance_mask(T([1.0, -1.0, 1.0, 0.5]), 0.25).tolist() == [True, True, True, False]  # ties kept
    assert importance_mask(T([0.3, 0.2, 0.1, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]), 0.3).sum() == 3


def test_pam_align_by_hand():
    # A: I = top 2 of |[.5,-.4,.1,.05]| = {0, 1}; task [-.2,-.1,...]: entry 0 flips sign → C = {0}
    # B: I = {0} (|-1|); task entry 0 is 0 → excluded; C = {}.  rate = |C| / |I| = 1 / 3
    new, mask, rate = pam_align(GLOBAL, TASK, top_p=0.5, reset="zero")
    assert rate == pytest.approx(1 / 3)
    assert mask[GA].tolist() == [[True, False, False, False]]
    assert mask[GB].tolist() == [[False], [False]]
    torch.testing.assert_close(new[GA], T([[0.0, -0.1, -0.3, 0.0]]))
    torch.testing.assert_close(new[GB], TASK[GB])
    torch.testing.assert_close(TASK[GA], T([[-0.2, -0.1, -0.3, 0.0]]))  # out of place
    new_g, _, _ = pam_align(GLOBAL, TASK, top_p=0.5, reset="global")
    torch.testing.assert_close(new_g[GA], T([[0.5, -0.1, -0.3, 0.0]]))
    # p = 1: entry 2 of A (task -.3 vs global .1) joins; B entry 1 (-.3 vs .2) too; |I| = 6
    new1, mask1, rate1 = pam_align(GLOBAL, TASK, top_p=1.0)
    assert rate1 == pytest.approx(3 / 6)
    torch.testing.assert_close(new1[GB], T([[0.0], [0.0]]))
    # only the B factor
    _, mask_b, rate_b = pam_align(GLOBAL, TASK, top_p=0.5, keys=[GB])
    assert set(mask_b) == {GB} and rate_b == 0.0
    # precomputed importance gives the same
    imp = importance_masks(GLOBAL, 0.5)
    assert pam_align(GLOBAL, TASK, 0.5, importance=imp)[2] == pytest.approx(1 / 3)


def test_pam_align_rejects_bad_input():
    with pytest.raises(AlignmentError, match="task adapter lacks tensor 'm.lora_B.weight'"):
        pam_align(GLOBAL, {GA: TASK[GA]})
    with pytest.raises(AlignmentError, match="shape"):
        pam_align(GLOBAL, {GA: torch.zeros(2, 2), GB: TASK[GB]})
    with pytest.raises(NonFiniteError, match="task adapter tensor 'm.lora_A.weight'"):
        pam_align(GLOBAL, {GA: T([[float("nan"), 0, 0, 0]]), GB: TASK[GB]})
    with pytest.raises(AlignmentError, match="top_p"):
        pam_align(GLOBAL, TASK, top_p=0.0)


def test_sign_misalignment_by_hand():
    stats = sign_misalignment(GLOBAL, TASK, top_p=0.5)
    assert stats["top_p"] == pytest.approx(1 / 3)
    # all entries: A has 2 sign flips (entries 0 and 2) of 4, B one (entry 1) of 2
    assert stats["all"] == pytest.approx(3 / 6)
    assert stats["top_p/A"] == pytest.approx(1 / 2) and stats["all/A"] == pytest.approx(2 / 4)
    assert stats["top_p/B"] == 0.0 and stats["all/B"] == pytest.approx(1 / 2)
    assert stats["layers"][GB] == {"top_p": 0.0, "all": 0.5}


def test_pam_merge_by_hand():
    torch.testing.assert_close(pam_merge(GLOBAL, TASK, t=1)[GA], TASK[GA])  # first task: copy
    half = pam_merge(GLOBAL, TASK, t=2)
    torch.testing.assert_close(half[GA], T([[0.15, -0.25, -0.1, 0.025]]))
    torch.testing.assert_close(half[GB], T([[-0.5], [-0.05]]))
    running = pam_merge(GLOBAL, TASK, t=3, weighting="running")  # ω = 1/3
    torch.testing.assert_close(running[GB], T([[-2 / 3], [0.4 / 3 - 0.1]]))
    quarter = pam_merge(GLOBAL, TASK, t=2, weighting=0.25)
    torch.testing.assert_close(quarter[GA], T([[0.325, -0.325, 0.0, 0.0375]]))
    with pytest.raises(AlignmentError, match="task adapter lacks tensor 'm.lora_B.weight'"):
        pam_merge(GLOBAL, {GA: TASK[GA]}, t=2)
    with pytest.raises(NonFiniteError, match="global adapter tensor"):
        pam_merge({GA: T([[float("inf"), 0, 0, 0]]), GB: GLOBAL[GB]}, TASK, t=2)


def test_factor_merge_gap_by_hand():
    g = {"x.lora_A.weight": T([[1.0, 0.0]]), "x.lora_B.weight": T([[1.0], [0.0]])}
    t = {"x.lora_A.weight": T([[0.0, 1.0]]), "x.lora_B.weight": T([[0.0], [1.0]])}
    # avg(BA) = diag(.5, .5); avg(B)avg(A) = .25·ones; difference = -¼ δB δA with norm .5; ‖avg(BA)‖ = √.5
    assert factor_merge_gap(g, t, 0.5) == pytest.approx(0.5 / 0.5**0.5)
    assert factor_merge_gap(g, g, 0.5) == 0.0


# ------------------------------------------------------------------------------------------------ model helpers


def _pam_model(cfg=None, seed=0):
    return prepare_pam_model(tiny_clip(seed), LoraConfig(r=2, target_modules=["fc1", "fc2"]), cfg or PAMConfig())


def _adapters_equal(model, state):
    for adapter in ("global", "task"):
        got = adapter_state(model, adapter)
        assert set(got) == set(state)
        for k in got:
            torch.testing.assert_close(got[k], state[k])


def test_prepare_pam_model_sets_up_two_adapters():
    model = _pam_model()
    assert set(model.peft_config) == {"global", "task"}
    assert model.active_adapter == "task"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task." in n for n in trainable)
    assert len(adapter_state(model, "global")) == len(trainable) == 16  # 2 towers x 2 layers x (fc1, fc2) x (A, B)
    # an existing PEFT model without the global adapter is refused with the adapter list
    other = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(AlignmentError, match=r"no adapter 'global'.*\['default'\]"):
        prepare_pam_model(other)
    dora = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["fc1"], use_dora=True), adapter_name="global")
    with pytest.raises(AlignmentError, match="DoRA"):
        prepare_pam_model(dora)


def _hooks():
    return TrainerState(), TrainerControl()


def _loss(model, seed):
    x = torch.randn(4, 3, 30, 30, generator=torch.Generator().manual_seed(seed))
    return (image_features(model, x, normalize=False) - 1.0).pow(2).mean()


def _train_steps(cb, model, opt, state, control, n, seed=0):
    for i in range(n):
        opt.zero_grad()
        _loss(model, seed + i).backward()
        opt.step()
        state.global_step += 1
        cb.on_step_end(None, state, control, optimizer=opt)


def _task_opt(model, lr=0.05):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


@pytest.mark.parametrize("moment_reset", ["first", "both", "none"])
def test_callback_plain_loop_resets_exactly_the_conflicts_and_their_moments(moment_reset):
    cfg = PAMConfig(top_p=0.5, align_every=3, moment_reset=moment_reset)
    model = _pam_model(cfg)
    cb = PAMCallback(cfg, model=model)

    # task 1: no alignment, G ← L_1
    state, control = _hooks()
    opt = _task_opt(model)
    cb.on_train_begin(None, state, control, optimizer=opt)
    _train_steps(cb, model, opt, state, control, 3)
    assert cb.alignment_log == []
    l1 = adapter_state(model, "task")
    cb.on_train_end(None, state, control)
    assert cb.state.num_tasks == 1
    _adapters_equal(model, l1)

    # task 2: L_2 starts as an exact copy of G
    state, control = _hooks()
    opt = _task_opt(model)
    cb.on_train_begin(None, state, control, optimizer=opt)
    _adapters_equal(model, l1)
    _train_steps(cb, model, opt, state, control, 2, seed=10)  # steps 1, 2: no alignment yet
    assert cb.alignment_log == []
    # force sign conflicts: negate the first column of every task tensor, then take one more optimiser step
    params = cb._task_params  # key -> the task adapter's Parameter
    with torch.no_grad():
        for p in params.values():
            p[:, 0] *= -1
    opt.zero_grad()
    _loss(model, 99).backward()
    opt.step()
    before = adapter_state(model, "task")
    moments = {k: {n: v.clone() for n, v in opt.state[p].items() if torch.is_tensor(v)} for k, p in params.items()}
    expected, reset_mask, rate = pam_align(cb.state.global_state, before, top_p=0.5)
    state.global_step += 1
    cb.on_step_end(None, state, control, optimizer=opt)  # step 3 = K: align

    assert len(cb.alignment_log) == 1 and cb.alignment_log[0]["step"] == 3
    assert cb.alignment_log[0]["misalignment"] == pytest.approx(rate)
    assert cb.alignment_log[0]["reset"] == sum(int(m.sum()) for m in reset_mask.values()) > 0
    after = adapter_state(model, "task")
    checked = 0
    for key in after:
        torch.testing.assert_close(after[key], expected[key], rtol=0, atol=0)
        m, p = reset_mask[key], params[key]
        if not moments[key]:  # text-tower LoRA gets no gradient from an image loss: no optimiser state
            continue
        checked += int(m.sum())
        for moment in ("exp_avg", "exp_avg_sq"):
            now, was = opt.state[p][moment], moments[key][moment]
            zeroed = moment_reset == "both" or (moment_reset == "first" and moment == "exp_avg")
            torch.testing.assert_close(now[~m], was[~m], rtol=0, atol=0)
            if zeroed:
                assert bool((now[m] == 0).all())
            else:
                torch.testing.assert_close(now[m], was[m], rtol=0, atol=0)
    assert checked > 0
    assert any(e.get("pam/misalignment") is not None for e in state.log_history)

    # task end: G ← ½ G + ½ L_2 element-wise, written into both adapters
    g_old, l2 = {k: v.clone() for k, v in cb.state.global_state.items()}, adapter_state(model, "task")
    cb.on_train_end(None, state, control)
    want = {k: 0.5 * g_old[k] + 0.5 * l2[k] for k in g_old}
    _adapters_equal(model, want)
    rec = cb.state.history[-1]
    assert rec["task"] == 2 and rec["merge_weight"] == 0.5 and rec["alignment_steps"] == 1
    assert rec["adapter_params"] == cb.state.history[0]["adapter_params"] == sum(v.numel() for v in want.values())
    assert 0.0 <= rec["misalignment"]["top_p"] <= 1.0 and rec["factor_merge_gap"] > 0.0


def test_callback_reset_to_global_and_resume_does_not_recopy():
    cfg = PAMConfig(top_p=1.0, align_every=1, reset="global")
    model = _pam_model(cfg)
    gen = torch.Generator().manual_seed(1)
    g = {k: torch.randn(v.shape, generator=gen) for k, v in adapter_state(model, "global").items()}  # a "trained" G
    cb = PAMCallback(cfg, model=model, state=PAMState(cfg, g, num_tasks=1))
    assert cb.aligning
    for k, v in adapter_state(model, "global").items():
        torch.testing.assert_close(v, g[k])
    state, control = _hooks()
    cb.on_train_begin(None, state, control)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.mul_(-1)  # every entry conflicts
    state.global_step = 1
    cb.on_step_end(None, state, control)
    _adapters_equal(model, g)  # reset="global", p=1: every entry back to G (task adapter = G = global adapter)
    assert cb.alignment_log[0]["misalignment"] == 1.0
    # resuming (global_step > 0) keeps the task adapter's weights
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(1.0)
    snapshot = adapter_state(model, "task")
    resumed = TrainerState()
    resumed.global_step = 7
    cb.on_train_begin(None, resumed, control)
    for k, v in adapter_state(model, "task").items():
        torch.testing.assert_close(v, snapshot[k])


def test_callback_refuses_an_optimizer_without_the_task_adapter():
    model = _pam_model()
    cb = PAMCallback(model=model)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    state, control = _hooks()
    with pytest.raises(AlignmentError, match="'task'"):
        cb.on_train_begin(None, state, control, optimizer=opt)


# ------------------------------------------------------------------------------------------------ persistence


def _two_task_state():
    cfg = PAMConfig(top_p=0.5, align_every=2, merge_weight="running")
    model = _pam_model(cfg)
    cb = PAMCallback(cfg, model=model)
    for task in range(2):
        state, control = _hooks()
        opt = _task_opt(model)
        cb.on_train_begin(None, state, control, optimizer=opt)
        _train_steps(cb, model, opt, state, control, 2, seed=task * 10)
        cb.on_train_end(None, state, control)
    return model, cb


def test_state_save_load_round_trip_and_deploy_with_peft(tmp_path):
    model, cb = _two_task_state()
    cb.state.save_pretrained(tmp_path / "pam")
    assert {p.name for p in (tmp_path / "pam").iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "pam_state.json",
    }
    loaded = PAMState.from_pretrained(tmp_path / "pam")
    assert loaded.num_tasks == 2 and loaded.config == cb.state.config and loaded.history == cb.state.history
    assert set(loaded.global_state) == set(cb.state.global_state)
    for k, v in loaded.global_state.items():
        torch.testing.assert_close(v, cb.state.global_state[k], rtol=0, atol=0)
    # the folder is a regular LoRA adapter: PeftModel deploys G with the same outputs
    deployed = PeftModel.from_pretrained(tiny_clip(0), tmp_path / "pam")
    x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(5))
    model.set_adapter("global")
    with torch.no_grad():
        torch.testing.assert_close(image_features(deployed, x), image_features(model, x))
    # a new callback continues from the loaded state on a fresh model
    fresh = _pam_model(loaded.config, seed=0)
    cb2 = PAMCallback(model=fresh, state=loaded)
    assert cb2.aligning
    for k, v in adapter_state(fresh, "global").items():
        torch.testing.assert_close(v, loaded.global_state[k])


def test_state_load_errors(tmp_path):
    _, cb = _two_task_state()
    folder = tmp_path / "pam"
    cb.state.save_pretrained(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="lacks pam_state.json"):
        PAMState.from_pretrained(tmp_path / "empty")
    with pytest.raises(BundleError, match="neither a local"):
        PAMState.from_pretrained(tmp_path / "missing")
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BundleError, match="safetensors"):
        PAMState.from_pretrained(folder)
    bad = {k: v.clone() for k, v in cb.state.global_state.items()}
    key = next(iter(bad))
    bad[key][0, 0] = float("nan")
    PAMState(cb.state.config, bad, 2).save_pretrained(folder)
    with pytest.raises(NonFiniteError, match=key):
        PAMState.from_pretrained(folder)
    (folder / "pam_state.json").write_text("{broken")
    with pytest.raises(BundleError, match="not valid JSON"):
        PAMState.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ in the project trainer


def test_pam_callback_inside_clip_classification_trainer(toy_tokenizer, tmp_path):
    from tests_helpers import CLASSES, colour_dataset, trainer_kwargs
    from transformers import TrainerCallback

    from hf_cft.trainers import ClipClassificationTrainer, ClipTrainingArguments

    class Snapshot(TrainerCallback):  # runs before PAM's on_train_end: sees G and L_t before the merge
        def on_train_end(self, args, state, control, **kwargs):
            self.g, self.l = adapter_state(model, "global"), adapter_state(model, "task")

    cfg = PAMConfig(top_p=0.5, align_every=2)
    model = _pam_model(cfg)
    pam, snap = PAMCallback(cfg, model=model), Snapshot()
    merged = []
    for task in range(2):
        args = ClipTrainingArguments(
            **trainer_kwargs(tmp_path / f"task{task}", max_steps=2 + 2 * task, optim="adamw_torch", learning_rate=0.05)
        )
        trainer = ClipClassificationTrainer(
            model,
            args,
            CLASSES,
            ["a photo of a {}."],
            toy_tokenizer,
            train_dataset=colour_dataset(8, seed=task),
            callbacks=[snap, pam],
        )
        start_g = adapter_state(model, "global")
        trainer.train()
        merged.append({k: v.clone() for k, v in pam.state.global_state.items()})
        for k in start_g:  # G is never trained by gradients
            torch.testing.assert_close(snap.g[k], start_g[k], rtol=0, atol=0)
        _adapters_equal(model, merged[-1])  # after train(): both adapters hold the deployed G

    assert pam.state.num_tasks == 2
    # task 1: copied, no alignment; task 2: aligned at steps 2 and 4, then G ← ½(G_1 + L_2)
    assert [r["step"] for r in pam.alignment_log] == [2, 4]
    assert [e["step"] for e in trainer.state.log_history if "pam/misalignment" in e] == [2, 4]
    for k, v in merged[1].items():
        torch.testing.assert_close(v, 0.5 * merged[0][k] + 0.5 * snap.l[k])
    rec = pam.state.history[1]
    assert rec["alignment_steps"] == 2 and set(rec["misalignment"]) >= {"top_p", "all", "top_p/A", "top_p/B"}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_no_alignment_in_the_first_task_and_plain_sgd_needs_no_moment_reset(recwarn):
    cfg = PAMConfig(top_p=1.0, align_every=1)
    model = _pam_model(cfg)
    cb = PAMCallback(cfg, model=model)
    with pytest.raises(AlignmentError, match="first task"):
        cb.align()
    state, control = _hooks()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    cb.on_train_begin(None, state, control, optimizer=opt)
    _train_steps(cb, model, opt, state, control, 1)
    cb.on_train_end(None, state, control)
    cb.on_train_begin(None, TrainerState(), control, optimizer=opt)
    with torch.no_grad():
        for p in cb._task_params.values():
            p.mul_(-1)
    state = TrainerState()
    _train_steps(cb, model, opt, state, control, 1, seed=3)
    assert cb.alignment_log[0]["reset"] > 0
    assert not [w for w in recwarn if "PAM" in str(w.message)]


# ------------------------------------------------------------------------------------------------ pinned rules
# Each test below fails on a small plausible change that the tests above let through (mutation testing,
# scripts/mutation.py).


def test_config_from_dict_without_factors_and_with_a_json_list():
    assert PAMConfig.from_dict({"top_p": 0.3}) == PAMConfig(top_p=0.3)
    assert PAMConfig.from_dict({"factors": ["B"]}).factors == ("B",)


def test_importance_and_alignment_options_reach_every_path():
    """importance_masks' default p is 0.5 and ``keys`` restricts it; pam_align checks ``reset``, uses a given
    importance instead of recomputing it, and reports a rate of 0 when nothing is important (all-zero G)."""
    assert {k: v.tolist() for k, v in importance_masks(GLOBAL).items()} == {
        k: v.tolist() for k, v in importance_masks(GLOBAL, 0.5).items()
    }
    assert set(importance_masks(GLOBAL, 0.5, keys=[GB])) == {GB}
    with pytest.raises(AlignmentError, match="reset"):
        pam_align(GLOBAL, TASK, reset="mean")
    only_third = {GA: torch.tensor([[False, False, True, False]]), GB: torch.zeros(2, 1, dtype=torch.bool)}
    new, mask, rate = pam_align(GLOBAL, TASK, top_p=0.5, importance=only_third)
    assert mask[GA].tolist() == [[False, False, True, False]] and rate == 1.0  # entry 2: task −.3 vs global .1
    torch.testing.assert_close(new[GA], T([[-0.2, -0.1, 0.0, 0.0]]))
    zero = {k: torch.zeros_like(v) for k, v in GLOBAL.items()}
    new0, mask0, rate0 = pam_align(zero, TASK, top_p=1.0)
    assert rate0 == 0.0 and not any(m.any() for m in mask0.values())


def _write_state(folder, **meta_changes):
    """A saved state whose pam_state.json is then edited (None deletes a field)."""
    _, cb = _two_task_state()
    cb.state.save_pretrained(folder)
    meta = json.loads((folder / "pam_state.json").read_text())
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    (folder / "pam_state.json").write_text(json.dumps(meta))
    return cb.state


def test_state_files_carry_peft_metadata_and_the_inference_flag_and_keep_other_files(tmp_path):
    from safetensors import safe_open

    _, cb = _two_task_state()
    folder = tmp_path / "pam"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    cb.state.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "card"  # not one of the state's files: kept
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as h:
        assert h.metadata() == {"format": "pt"}
    assert json.loads((folder / "adapter_config.json").read_text())["inference_mode"] is True
    loaded = PAMState.from_pretrained(folder)
    assert loaded.lora_config["inference_mode"] is False  # loaded to be trained on
    assert {k: v for k, v in loaded.lora_config.items() if k != "inference_mode"} == {
        k: v for k, v in json.loads((folder / "adapter_config.json").read_text()).items() if k != "inference_mode"
    }
    with pytest.raises(AlignmentError, match=r"^PAMState has no global adapter tensors to save.$"):
        PAMState(PAMConfig(), {}, 0).save_pretrained(tmp_path / "empty")


def test_state_load_fills_missing_optional_fields_and_names_the_folder_in_every_error(tmp_path):
    folder = tmp_path / "pam"
    state = _write_state(folder, config=None, num_tasks=None, history=None)
    (folder / "adapter_config.json").unlink()
    loaded = PAMState.from_pretrained(folder)
    assert (
        loaded.config == PAMConfig() and loaded.num_tasks == 0 and loaded.history == [] and loaded.lora_config is None
    )
    assert set(loaded.global_state) == set(state.global_state)
    where = str(folder)
    for meta in ([1], {"format_version": 2}):  # not a dict, or another version
        (folder / "pam_state.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError) as err:
            PAMState.from_pretrained(folder)
        assert str(err.value) == f"pam_state.json in {where!r} has an unknown format (version 1 expected)."
    key = sorted(state.global_state)[0]
    _write_state(folder, keys=None)  # no key list: every tensor is unlisted
    with pytest.raises(BundleError) as err:
        PAMState.from_pretrained(folder)
    assert (
        str(err.value)
        == f"adapter_model.safetensors in {where!r} has tensor {key!r} that pam_state.json does not list."
    )
    _write_state(folder, keys=[*sorted(state.global_state)[1:], "zz.lora_A.weight"])
    with pytest.raises(BundleError) as err:
        PAMState.from_pretrained(folder)
    assert str(err.value) == f"adapter_model.safetensors in {where!r} lacks tensor 'zz.lora_A.weight'."
    _write_state(folder)
    (folder / "adapter_config.json").write_text("{oops")
    with pytest.raises(BundleError, match=rf"^adapter_config.json in {where!r} is not valid JSON: "):
        PAMState.from_pretrained(folder)
    (folder / "pam_state.json").write_text("{oops")
    with pytest.raises(BundleError, match=rf"^pam_state.json in {where!r} is not valid JSON: "):
        PAMState.from_pretrained(folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(BundleError) as err:
        PAMState.from_pretrained(folder)
    assert str(err.value) == f"PAM state folder {where!r} lacks adapter_model.safetensors."


def test_state_load_names_the_folder_for_unreadable_weights_and_nan(tmp_path):
    folder = tmp_path / "pam"
    state = _write_state(folder)
    good = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BundleError, match=rf"^adapter_model.safetensors in {str(folder)!r} is not a readable"):
        PAMState.from_pretrained(folder)
    (folder / "adapter_model.safetensors").write_bytes(good)
    bad = {k: v.clone() for k, v in state.global_state.items()}
    key = sorted(bad)[0]
    bad[key].view(-1)[0] = float("inf")
    PAMState(state.config, bad, 2).save_pretrained(folder)
    with pytest.raises(NonFiniteError) as err:
        PAMState.from_pretrained(folder)
    assert str(err.value) == f"global adapter tensor {key!r} in {str(folder)!r} holds NaN or inf."


def test_state_from_the_hub_downloads_only_the_state_files(tmp_path, monkeypatch):
    import huggingface_hub

    folder = tmp_path / "pam"
    _write_state(folder)
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert PAMState.from_pretrained("someone/pam-state").num_tasks == 2
    assert calls == [
        (
            "someone/pam-state",
            {"allow_patterns": ["pam_state.json", "adapter_model.safetensors", "adapter_config.json"]},
        )
    ]


def test_end_task_records_the_alignment_totals_and_logs_one_line(caplog):
    """The task record carries the task's name, its alignment steps, the entries they reset and the mean of their
    misalignment rates; one INFO line reports them; without a model end_task is refused."""
    import logging

    cfg = PAMConfig(top_p=0.5, align_every=1, merge_weight="running")
    model = _pam_model(cfg)
    cb = PAMCallback(cfg, model=model)
    records = []
    for task in range(2):
        state, control = _hooks()
        opt = _task_opt(model)
        cb.on_train_begin(None, state, control, optimizer=opt)
        _train_steps(cb, model, opt, state, control, 3, seed=task * 10)
        log = list(cb.alignment_log)
        with caplog.at_level(logging.INFO, logger="hf_cft.merging.pam"):
            caplog.clear()
            record = cb.end_task(task_name=f"t{task}")
        records.append(record)
        rates = [r["misalignment"] for r in log if "misalignment" in r]
        assert record["name"] == f"t{task}" and record["alignment_steps"] == len(log)
        assert record["reset_entries"] == sum(r["reset"] for r in log)
        if rates:
            assert record["mean_step_misalignment"] == pytest.approx(sum(rates) / len(rates))
        else:
            assert record["mean_step_misalignment"] is None
        mis = record.get("misalignment", {})
        top_p, everything = mis.get("top_p", float("nan")), mis.get("all", float("nan"))
        want = (
            f"PAM task {record['task']} merged (ω={record['merge_weight']:.3g}): misalignment top-p {top_p:.4f}, "
            f"all {everything:.4f}; {record['alignment_steps']} alignment steps reset {record['reset_entries']} entries"
        )
        assert [r.getMessage() for r in caplog.records if r.name == "hf_cft.merging.pam"] == [want]
    assert records[1]["alignment_steps"] > 0 and records[1]["mean_step_misalignment"] is not None
    with pytest.raises(AlignmentError, match=r"^PAMCallback is not attached to a model: pass model= or call attach"):
        PAMCallback(cfg).end_task()


def test_pam_model_checks_name_what_pam_cannot_merge_and_state_loads_name_the_mismatch():
    """Embedding LoRA, LoRA biases and adapters on different modules are refused naming the module; a wrapped
    PeftModel is found inside its wrapper and gets a trainable task adapter with the global one's config; loading a
    state with a missing, extra or reshaped tensor names it."""
    import re

    emb = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["token_embedding"]), adapter_name="global")
    with pytest.raises(AlignmentError, match=r"^adapter 'global' puts LoRA on embedding '[\w.]*token_embedding'; PAM"):
        prepare_pam_model(emb)
    biased = get_peft_model(
        tiny_clip(), LoraConfig(r=2, target_modules=["fc1"], lora_bias=True), adapter_name="global"
    )
    with pytest.raises(
        AlignmentError, match=r"^adapter 'global' has a lora_bias at '[\w.]*fc1'; PAM merges LoRA factors"
    ):
        prepare_pam_model(biased)
    split = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["fc1"]), adapter_name="global")
    split.add_adapter("task", LoraConfig(r=2, target_modules=["fc2"]))
    first = r"'[\w.]*text_model.encoder.layers.0.mlp.fc1'"  # the first of the differing modules, sorted
    with pytest.raises(
        AlignmentError, match=rf"^adapters 'global' and 'task' adapt different modules \(e.g. {first}\).$"
    ):
        prepare_pam_model(split)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    peft_inside = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["fc1"]), adapter_name="global")
    model = prepare_pam_model(Wrapper(peft_inside))
    assert model is peft_inside and set(model.peft_config) == {"global", "task"}
    assert model.peft_config["task"].inference_mode is False
    assert model.peft_config["task"].target_modules == model.peft_config["global"].target_modules
    assert model.peft_config["global"] is not model.peft_config["task"]
    state = PAMState(PAMConfig(), adapter_state(model, "global"), 1)
    key = sorted(state.global_state)[0]
    missing = PAMState(PAMConfig(), {k: v for k, v in state.global_state.items() if k != key}, 1)
    with pytest.raises(AlignmentError, match=rf"^PAM state lacks tensor {re.escape(repr(key))} of adapter 'global'.$"):
        missing.load_into(model)
    extra = PAMState(PAMConfig(), {**state.global_state, "zz.lora_A.weight": torch.zeros(1)}, 1)
    with pytest.raises(
        AlignmentError, match=r"^PAM state has tensor 'zz.lora_A.weight' that adapter 'global' lacks.$"
    ):
        extra.load_into(model)
    reshaped = PAMState(PAMConfig(), {**state.global_state, key: torch.zeros(1, 1)}, 1)
    shape = tuple(state.global_state[key].shape)
    with pytest.raises(
        AlignmentError,
        match=rf"^tensor {re.escape(repr(key))} has shape \(1, 1\) in the PAM state but {re.escape(str(shape))} in adapter 'global'.$",
    ):
        reshaped.load_into(model)
    half = PAMState(PAMConfig(), {k: v.half() for k, v in state.global_state.items()}, 1)
    half.load_into(model)  # copied in the adapter's own dtype
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_importance_mask_of_an_empty_or_half_precision_tensor():
    assert (
        importance_mask(torch.zeros(0), 0.5).dtype == torch.bool and importance_mask(torch.zeros(0), 0.5).numel() == 0
    )
    g = T([0.1, -0.5, 0.3, 0.0, -0.2, 0.4])
    assert torch.equal(importance_mask(g.half(), 0.5), importance_mask(g, 0.5))
    assert importance_mask(T([2.0]), 1.0).tolist() == [True]  # one entry, p = 1: kept
    assert importance_mask(T([1.0, 2.0, 3.0]), 0.6).tolist() == [False, True, True]  # ⌈0.6·3⌉ = 2, not 1.8 → 2


def test_sign_misalignment_skips_zero_global_entries_and_empty_groups():
    """Entries where G is 0 carry no sign and never count as conflicts; an all-zero factor has no important entry
    and reports 0 (not a division by zero); the default p is 0.5; ``keys`` restricts the statistics."""
    g = {"m.lora_A.weight": torch.zeros(1, 3), "m.lora_B.weight": T([[1.0], [0.0], [-2.0]])}
    x = {"m.lora_A.weight": T([[1.0, -1.0, 0.0]]), "m.lora_B.weight": T([[-1.0], [5.0], [-1.0]])}
    stats = sign_misalignment(g, x, top_p=1.0)
    assert stats["layers"]["m.lora_A.weight"] == {"top_p": 0.0, "all": 0.0}
    assert stats["layers"]["m.lora_B.weight"] == {"top_p": 0.5, "all": pytest.approx(1 / 3)}
    assert stats["top_p"] == 0.5 and stats["all"] == pytest.approx(1 / 6)
    assert stats["top_p/A"] == 0.0 and stats["all/A"] == 0.0 and stats["top_p/B"] == 0.5
    zero = sign_misalignment({"m.lora_A.weight": torch.zeros(0, 3)}, {"m.lora_A.weight": torch.zeros(0, 3)})
    assert (
        zero["top_p"] == 0.0 and zero["all"] == 0.0 and zero["layers"]["m.lora_A.weight"] == {"top_p": 0.0, "all": 0.0}
    )
    assert sign_misalignment(GLOBAL, TASK) == sign_misalignment(GLOBAL, TASK, top_p=0.5)
    only_b = sign_misalignment(GLOBAL, TASK, top_p=0.5, keys=[GB])
    assert set(only_b["layers"]) == {GB} and "top_p/A" not in only_b


def test_state_merge_uses_the_configured_weight_factors_and_p_and_skips_the_first_task_statistics():
    """PAMState.merge: task 1 is copied with no misalignment statistics (G carries no signs yet); later tasks use
    the configured ω (also for the factor gap), p, and the configured factors for the statistics."""
    state = PAMState(
        PAMConfig(merge_weight=0.25, factors=("A",), top_p=1.0), {k: v.clone() for k, v in GLOBAL.items()}, 0
    )
    first = state.merge(TASK, task_name="one")
    assert (
        first["task"] == 1
        and first["name"] == "one"
        and "misalignment" not in first
        and "factor_merge_gap" not in first
    )
    assert first["merge_weight"] == 1.0 and first["adapter_params"] == 6
    torch.testing.assert_close(state.global_state[GA], TASK[GA])  # the first task is copied
    state.global_state = {k: v.clone() for k, v in GLOBAL.items()}
    second = state.merge(TASK, task_name="two")
    assert second["task"] == 2 and second["merge_weight"] == 0.25
    assert second["misalignment"] == sign_misalignment(GLOBAL, TASK, top_p=1.0, keys=[GA])
    assert second["factor_merge_gap"] == pytest.approx(factor_merge_gap(GLOBAL, TASK, 0.25))
    torch.testing.assert_close(state.global_state[GA], 0.75 * GLOBAL[GA] + 0.25 * TASK[GA])
    assert [r["name"] for r in state.history] == ["one", "two"]
    with pytest.raises(
        AlignmentError, match=r"^PAMState has no global adapter tensors yet \(build it with PAMState.from_model\).$"
    ):
        PAMState(PAMConfig(), {}, 0).merge(TASK)


# ------------------------------------------------------------------------------------------------ pinned rules (2)


def test_config_refuses_wrong_types_naming_the_value():
    """top_p must be a real number (a string or a bool is refused, not compared); the adapter names must be
    non-empty strings; a factors string names one factor ("AB" is not "A" and "B")."""
    with pytest.raises(AlignmentError, match=r"^PAMConfig.top_p must be a number in \(0, 1\], got '0.5'.$"):
        PAMConfig(top_p="0.5")
    with pytest.raises(AlignmentError, match=r"^PAMConfig.top_p must be a number in \(0, 1\], got True.$"):
        PAMConfig(top_p=True)
    for name in ("global_adapter", "task_adapter"):
        for bad in ("", 3, None):
            with pytest.raises(
                AlignmentError, match=rf"^PAMConfig.{name} must be a non-empty string, got {re.escape(repr(bad))}.$"
            ):
                PAMConfig(**{name: bad})
    assert PAMConfig(factors="B").factors == ("B",)
    with pytest.raises(
        AlignmentError, match=r"^PAMConfig.factors must be a non-empty subset of \('A', 'B'\), got 'AB'"
    ):
        PAMConfig(factors="AB")


def test_merge_weight_default_bounds_and_types():
    """The default weighting is "half" (½ for every t, not 1/t); ω = 1 is allowed, > 1 is not; the task index and the
    weighting refuse bools and non-numbers with a message naming the value."""
    assert merge_weight(2) == merge_weight(3) == merge_weight(5, "half") == 0.5
    assert merge_weight(2, 1.0) == merge_weight(3, 1) == 1.0
    for t in (True, 2.5, 0):
        with pytest.raises(AlignmentError, match=rf"^task index t must be an integer >= 1, got {t!r}.$"):
            merge_weight(t)
    for bad in (True, None, [0.5]):
        with pytest.raises(
            AlignmentError,
            match=rf"^PAMConfig.merge_weight must be 'half', 'running' or a float in \(0, 1\], got {re.escape(repr(bad))}.$",
        ):
            merge_weight(2, bad)
    for bad in (1.5, 2.0, float("nan")):
        with pytest.raises(AlignmentError, match=rf"^PAMConfig.merge_weight must lie in \(0, 1\], got {bad}.$"):
            merge_weight(2, bad)


def test_pair_checks_name_the_side_and_the_shapes():
    with pytest.raises(AlignmentError, match=r"^global adapter lacks tensor 'm.lora_B.weight'.$"):
        sign_misalignment({GA: GLOBAL[GA]}, TASK, keys=[GA, GB])
    with pytest.raises(
        AlignmentError,
        match=r"^tensor 'm.lora_A.weight' has shape \(1, 4\) in the global adapter but \(2, 2\) in the task adapter.$",
    ):
        pam_align(GLOBAL, {GA: torch.zeros(2, 2), GB: TASK[GB]})
    # a merge refuses a tensor only one side has, naming the side that lacks it
    with pytest.raises(
        AlignmentError, match=r"^global adapter lacks tensor 'x.lora_A.weight': cannot merge adapters with different"
    ):
        pam_merge(GLOBAL, {**TASK, "x.lora_A.weight": T([[1.0]])}, t=2)
    with pytest.raises(AlignmentError, match=r"^task adapter lacks tensor 'm.lora_B.weight': cannot merge adapters"):
        pam_merge(GLOBAL, {GA: TASK[GA]}, t=2)


def test_importance_mask_rounds_p_times_n_up():
    """keep = ⌈p·n⌉ (here ⌈1.25⌉ = 2), not p·n rounded to the nearest integer."""
    assert importance_mask(T([1.0, 2.0, 3.0, 4.0, 5.0]), 0.25).tolist() == [False, False, False, True, True]


def test_merges_compute_in_fp32_whatever_the_input_dtype():
    """pam_merge returns fp32 (also for the copied first task) and averages in fp32: a half G is not multiplied by
    (1 − ω) in half precision; PAMState and adapter_state hold fp32 copies of half tensors."""
    half_task = {k: v.half() for k, v in TASK.items()}
    assert pam_merge(GLOBAL, half_task, t=1)[GA].dtype == torch.float32
    half_global = {k: v.half() for k, v in GLOBAL.items()}
    merged = pam_merge(half_global, TASK, t=2, weighting=0.3)
    for k in GLOBAL:
        torch.testing.assert_close(merged[k], 0.7 * half_global[k].float() + 0.3 * TASK[k], rtol=0, atol=0)
    assert all(v.dtype == torch.float32 for v in PAMState(PAMConfig(), half_global).global_state.values())
    model = _pam_model().to(torch.bfloat16)
    assert {v.dtype for v in adapter_state(model, "global").values()} == {torch.float32}


def test_factor_merge_gap_sums_over_modules_and_skips_incomplete_ones():
    """The gap is √(Σ num / Σ den) over every complete LoRA module, whatever the key order; a module lacking a factor
    on either side is skipped, not the rest of the modules; a zero dense average gives 0; the default ω is ½."""
    g = {"x.lora_A.weight": T([[1.0, 0.0]]), "x.lora_B.weight": T([[1.0], [0.0]])}
    t = {"x.lora_A.weight": T([[0.0, 1.0]]), "x.lora_B.weight": T([[0.0], [1.0]])}
    same = {"y.lora_A.weight": T([[1.0, 0.0]]), "y.lora_B.weight": T([[1.0], [0.0]])}  # num 0, den 1
    # x alone: num ¼, den ½ (test_factor_merge_gap_by_hand); with y: √(¼ / 1.5)
    b_first = {
        k: {**g, **same}[k] for k in ("x.lora_B.weight", "y.lora_B.weight", "x.lora_A.weight", "y.lora_A.weight")
    }
    assert factor_merge_gap(b_first, {**t, **same}, 0.5) == pytest.approx((0.25 / 1.5) ** 0.5)
    assert factor_merge_gap(g, t) == factor_merge_gap(g, t, 0.5)
    lone_a = {"a.lora_A.weight": T([[1.0, 0.0]])}  # no B factor in G (the task has both): skipped
    task_ab = {**lone_a, "a.lora_B.weight": T([[1.0], [1.0]])}
    assert factor_merge_gap({**lone_a, **g}, {**task_ab, **t}, 0.5) == pytest.approx(0.5 / 0.5**0.5)
    task_without_b = {"a.lora_A.weight": T([[1.0, 0.0]])}
    g_with_a = {"a.lora_A.weight": T([[1.0, 0.0]]), "a.lora_B.weight": T([[1.0], [1.0]])}
    assert factor_merge_gap({**g_with_a, **g}, {**task_without_b, **t}, 0.5) == pytest.approx(0.5 / 0.5**0.5)
    zeros = {k: torch.zeros_like(v) for k, v in g.items()}
    assert factor_merge_gap(zeros, zeros, 0.5) == 0.0
    conv = {"c.lora_A.weight": torch.ones(2, 3, 1, 1), "c.lora_B.weight": torch.ones(4, 2, 1, 1)}  # skipped
    assert factor_merge_gap({**conv, **g}, {**conv, **t}, 0.5) == pytest.approx(0.5 / 0.5**0.5)


def test_peft_model_checks_name_what_is_wrong():
    """A model without PEFT, a non-LoRA adapter, an adapter without layers, and adapters of different rank (same
    scaling) are refused with messages naming them; a PEFT model with another adapter gets the global one from the
    given LoraConfig."""
    from peft import IA3Config
    from peft.tuners.lora import LoraLayer

    from hf_cft.errors import AdapterError

    with pytest.raises(
        AdapterError, match=r"^PAM needs a peft.PeftModel with a LoRA adapter; got a CLIPModel without"
    ):
        adapter_state(tiny_clip(), "global")
    ia3 = get_peft_model(
        tiny_clip(), IA3Config(target_modules=["fc1"], feedforward_modules=["fc1"]), adapter_name="global"
    )
    with pytest.raises(AlignmentError, match=r"^adapter 'global' is a PeftType.IA3 adapter; PAM needs LoRA.$"):
        prepare_pam_model(ia3)
    empty = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["fc1"]), adapter_name="global")
    for module in empty.modules():
        if isinstance(module, LoraLayer):
            del module.lora_A["global"]
    with pytest.raises(AlignmentError, match=r"^the model has no LoRA layer for adapter 'global'.$"):
        adapter_state(empty, "global")
    ranks = get_peft_model(tiny_clip(), LoraConfig(r=2, lora_alpha=8, target_modules=["fc1"]), adapter_name="global")
    ranks.add_adapter("task", LoraConfig(r=4, lora_alpha=16, target_modules=["fc1"]))  # scaling 4 in both
    with pytest.raises(
        AlignmentError,
        match=r"^adapters 'global' and 'task' differ in rank or scaling at '[\w.]*fc1' \(2/4.0 vs 4/4.0\); PAM "
        r"averages factors and needs identical LoRA configs.$",
    ):
        prepare_pam_model(ranks)
    other = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["fc2"]))
    prepared = prepare_pam_model(other, LoraConfig(r=2, target_modules=["fc1"]))
    assert set(prepared.peft_config) == {"default", "global", "task"}
    assert set(prepared.peft_config["global"].target_modules) == {"fc1"}


def test_state_defaults_config_and_json_safe_history():
    cfg = PAMConfig(top_p=0.3)
    assert PAMState().config == PAMConfig() and PAMState(cfg).config is cfg
    model = _pam_model()
    assert PAMState.from_model(model).config == PAMConfig()
    assert PAMState.from_model(model, cfg).config is cfg
    state = PAMState(PAMConfig(), {k: v.clone() for k, v in GLOBAL.items()})
    from pathlib import Path

    state.merge(TASK, where=Path("runs") / "t1", dtype=torch.float16)
    assert state.history[-1]["where"] == str(Path("runs") / "t1") and state.history[-1]["dtype"] == "torch.float16"


def test_inner_optimizer_unwraps_at_most_five_wrappers():
    from hf_cft.merging.pam import _inner_optimizer

    class Wrap:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    chain = opt
    wrappers = []
    for _ in range(7):
        chain = Wrap(chain)
        wrappers.append(chain)
    assert _inner_optimizer(wrappers[4]) is opt  # five wrappers: all unwrapped
    assert _inner_optimizer(wrappers[5]) is wrappers[0]  # six: stops after five
    assert _inner_optimizer(wrappers[6]) is wrappers[1]
    loop = Wrap(None)
    loop.optimizer = loop  # a wrapper that wraps itself ends the loop too
    assert _inner_optimizer(loop) is loop


def test_callback_construction_keeps_the_given_config_state_and_weights():
    """The callback takes the state's config when given none, writes a given config into the state, starts with an
    empty alignment log, refuses a non-config, uses custom adapter names throughout, fills an empty state and its
    LoRA config from the model, keeps a given LoRA config, and copies G into the global adapter only."""
    cfg = PAMConfig(top_p=0.3)
    assert PAMCallback(state=PAMState(cfg)).config is cfg
    other = PAMState(PAMConfig())
    assert PAMCallback(cfg, state=other).config is cfg and other.config is cfg
    with pytest.raises(AlignmentError, match=r"^PAMCallback needs a PAMConfig, got a dict.$"):
        PAMCallback({"top_p": 0.5})

    named = PAMConfig(global_adapter="G", task_adapter="L")
    cb = PAMCallback(named, model=prepare_pam_model(tiny_clip(), LoraConfig(r=2, target_modules=["fc1"]), named))
    assert set(cb.model.peft_config) == {"G", "L"} and cb.state.config is named
    assert cb.alignment_log == [] and cb.state.lora_config["r"] == 2

    model = _pam_model()
    empty = PAMState(PAMConfig())
    cb = PAMCallback(model=model, state=empty)
    assert cb.state is empty and empty.lora_config["r"] == 2
    for k, v in adapter_state(model, "global").items():  # filled from the model's global adapter
        torch.testing.assert_close(empty.global_state[k], v, rtol=0, atol=0)
    kept = PAMState(PAMConfig(), adapter_state(model, "global"), 1, lora_config={"r": 2, "note": "mine"})
    PAMCallback(model=model, state=kept)
    assert kept.lora_config == {"r": 2, "note": "mine"}

    gen = torch.Generator().manual_seed(3)
    g = {k: torch.randn(v.shape, generator=gen) for k, v in adapter_state(model, "global").items()}
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if ".task." in n):
            p.fill_(0.25)
    PAMCallback(model=model, state=PAMState(PAMConfig(), g, 1))
    for k, v in adapter_state(model, "global").items():
        torch.testing.assert_close(v, g[k])
    assert all(bool((v == 0.25).all()) for v in adapter_state(model, "task").values())  # the task adapter untouched


def _second_task_callback(cfg):
    """A callback in its second task (G trained, num_tasks = 1) on a fresh model, and its trainer hooks."""
    model = _pam_model(cfg)
    gen = torch.Generator().manual_seed(1)
    g = {k: torch.randn(v.shape, generator=gen) for k, v in adapter_state(model, "global").items()}
    return model, PAMCallback(cfg, model=model, state=PAMState(cfg, g, num_tasks=1))


def test_callback_task_start_messages_and_copy_rules():
    """begin_task copies G into the task adapter by default; align before any begin_task aligns the current task
    weights (it must not copy G over them first); on_train_begin attaches a model given there, says when it has
    none, names the adapter the optimiser lacks, and treats global_step 1 as a resume."""
    cfg = PAMConfig(top_p=1.0, align_every=1)
    model, cb = _second_task_callback(cfg)
    with torch.no_grad():
        for p in cb._task_params.values():
            p.fill_(0.5)
    cb.begin_task()
    _adapters_equal(model, cb.state.global_state)

    model, cb = _second_task_callback(cfg)
    with torch.no_grad():
        for key, p in cb._task_params.items():
            p.copy_(-cb.state.global_state[key])  # every entry conflicts
    record = cb.align()
    assert record["reset"] == sum(int((v != 0).sum()) for v in cb.state.global_state.values())
    assert all(bool((v == 0).all()) for v in adapter_state(model, "task").values())

    with pytest.raises(AlignmentError, match=r"^PAMCallback is not attached to a model: pass model= or call attach"):
        PAMCallback(cfg).begin_task()
    with pytest.raises(
        AlignmentError,
        match=r"^PAM does not align during the first task: the global adapter is still untrained \(pam.md §2\).$",
    ):
        PAMCallback(cfg, model=_pam_model(cfg)).align()
    state, control = _hooks()
    with pytest.raises(AlignmentError, match=r"^PAMCallback got no model: pass model= when creating it.$"):
        PAMCallback(cfg).on_train_begin(None, state, control)
    late = PAMCallback(cfg)
    model = _pam_model(cfg)
    late.on_train_begin(None, state, control, model=model)
    assert late.model is model
    with pytest.raises(
        AlignmentError,
        match=r"^the optimiser does not train adapter 'task': create PAMCallback\(model=...\) \(or call "
        r"prepare_pam_model\) before the Trainer builds its optimiser.$",
    ):
        late.on_train_begin(
            None, state, control, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1)
        )

    model, cb = _second_task_callback(cfg)
    with torch.no_grad():
        for p in cb._task_params.values():
            p.fill_(0.5)
    resumed = TrainerState()
    resumed.global_step = 1
    cb.on_train_begin(None, resumed, control)
    assert all(bool((v == 0.5).all()) for v in adapter_state(model, "task").values())


def test_alignment_rates_per_factor_and_the_logged_entry():
    """An alignment record's per-factor rates are the conflicts over the important entries of that factor (as
    sign_misalignment computes them before the reset); the logged entry has the pam/ keys, the step and the task."""
    cfg = PAMConfig(top_p=0.5, align_every=2)
    model, cb = _second_task_callback(cfg)
    state, control = _hooks()
    cb.on_train_begin(None, state, control)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in cb._task_params.values():
            p.copy_(torch.randn(p.shape, generator=gen))
    before = sign_misalignment(cb.state.global_state, adapter_state(model, "task"), top_p=0.5)
    state.global_step = 2
    cb.on_step_end(None, state, control)
    record = cb.alignment_log[-1]
    assert record["misalignment"] == pytest.approx(before["top_p"])
    assert record["misalignment/A"] == pytest.approx(before["top_p/A"])
    assert record["misalignment/B"] == pytest.approx(before["top_p/B"])
    assert 0 < before["top_p/A"] < 1 and 0 < before["top_p/B"] < 1
    assert state.log_history == [
        {
            "pam/reset": record["reset"],
            "pam/misalignment": record["misalignment"],
            "pam/misalignment/A": record["misalignment/A"],
            "pam/misalignment/B": record["misalignment/B"],
            "step": 2,
            "pam_task": 2,
        }
    ]


class _KeepsState(torch.optim.SGD):
    """SGD that also keeps per-parameter state under names PAM does not know (``shaped``: tensors of the
    parameter's shape, else a scalar tensor)."""

    def __init__(self, params, shaped):
        super().__init__(params, lr=0.01)
        self.shaped = shaped

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["velocity"] = torch.ones_like(p) if self.shaped else torch.tensor(3.0)


def _flip_and_align(cb, opt):
    with torch.no_grad():
        for key, p in cb._task_params.items():
            p.copy_(-cb.state.global_state[key])
    return cb.align(opt)


def test_moment_reset_warns_once_at_the_callers_line_when_the_optimiser_keeps_unknown_state():
    cfg = PAMConfig(top_p=1.0, align_every=1)
    for shaped, warns in ((True, 1), (False, 0)):
        model, cb = _second_task_callback(cfg)
        opt = _KeepsState([p for p in model.parameters() if p.requires_grad], shaped)
        state, control = _hooks()
        cb.on_train_begin(None, state, control, optimizer=opt)
        _loss(model, 0).backward()
        opt.step()
        with _catch_warnings() as caught:
            _flip_and_align(cb, opt)
            _flip_and_align(cb, opt)  # warned once per callback
        pam = [w for w in caught if "PAM" in str(w.message)]
        assert len(pam) == warns
        if warns:
            assert str(pam[0].message) == (
                "PAM: the optimiser state has none of ('exp_avg', 'momentum_buffer') for the task adapter; moments "
                "were not reset (state keys: ['velocity'])."
            )
            assert pam[0].filename == __file__
    # Adam keeps exp_avg: reset, no warning
    model, cb = _second_task_callback(cfg)
    opt = _task_opt(model)
    cb.on_train_begin(None, *_hooks(), optimizer=opt)
    _loss(model, 0).backward()
    opt.step()
    with _catch_warnings() as caught:
        _flip_and_align(cb, opt)
    assert not [w for w in caught if "PAM" in str(w.message)]


def _catch_warnings():
    import warnings

    class Catch(warnings.catch_warnings):
        def __init__(self):
            super().__init__(record=True)

        def __enter__(self):
            caught = super().__enter__()
            warnings.simplefilter("always")
            return caught

    return Catch()


def test_default_lora_config_and_the_states_lora_config_object():
    """default_lora_config is pam.md §6's LoRA (r 32, α 32, attention q/k/v/out and MLP fc1/fc2), with overrides
    passed on; PAMState.lora_config_object rebuilds the global adapter's LoraConfig from the stored dict, ignoring
    keys LoraConfig does not have (and the peft_type), and is None when the state has no LoRA config."""
    from hf_cft.merging.pam import DEFAULT_TARGET_MODULES, default_lora_config

    cfg = default_lora_config()
    assert (cfg.r, cfg.lora_alpha) == (32, 32)
    assert (
        set(cfg.target_modules)
        == set(DEFAULT_TARGET_MODULES)
        == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    )
    small = default_lora_config(r=4, lora_alpha=8, target_modules=["fc1"], lora_dropout=0.1)
    assert (small.r, small.lora_alpha, set(small.target_modules), small.lora_dropout) == (4, 8, {"fc1"}, 0.1)
    assert PAMState().lora_config_object() is None
    model = _pam_model()
    state = PAMState.from_model(model)
    rebuilt = state.lora_config_object()
    assert isinstance(rebuilt, LoraConfig) and rebuilt.r == 2 and set(rebuilt.target_modules) == {"fc1", "fc2"}
    state.lora_config = {**state.lora_config, "not_a_lora_field": 1}
    assert state.lora_config_object().r == 2

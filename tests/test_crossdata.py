"""Protocols C and D (``benchmarks/crossdata.py``) end to end on a tiny CLIP with synthetic features (one seed, two
epochs): the source models are evaluated on each target with the *target's* class names, on shifted sets with
the source's, and the tables summarise what was measured."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests_helpers import load_benchmark

from hf_cft.models import build_zeroshot_classifier
from hf_cft.testing import tiny_clip

CLASSES = ["cat", "dog", "sea lion", "owl", "fox", "eel"]
HP = {"optimizer": "adamw", "lr": 0.01, "epochs": 2, "batch_size": 16, "lam": 8.0, "beta": 0.5, "tau": 0.3}


def _load(name):
    return load_benchmark(name)


@pytest.fixture(scope="module")
def crossdata():
    return _load("crossdata")


def _task(name, classnames):
    return SimpleNamespace(name=name, classnames=classnames, templates=["a photo of a {}.", "a {}."],
                           num_classes=len(classnames))  # fmt: skip


@pytest.fixture(scope="module")
def setup(crossdata):
    """Features near each class's zero-shot text feature and five targets holding the source's test images with
    the source's class names rotated by k = 1..5 (labels mapped alike): the same images under another head."""
    from tests.conftest import ToyTokenizer

    tok, model = ToyTokenizer(), tiny_clip()
    with torch.no_grad():
        text = build_zeroshot_classifier(model, tok, CLASSES, ["a photo of a {}."]).float()
    g = torch.Generator().manual_seed(0)

    def feats(n_per_class):
        y = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
        f = text[y] + 0.02 * torch.randn(len(y), text.shape[1], generator=g)
        return torch.nn.functional.normalize(f, dim=-1), y

    down_f, down_y = feats(20)
    test_f, test_y = feats(5)
    source = _task("toy", CLASSES)
    src = {"down_f": down_f, "down_y": down_y, "test_f": test_f, "test_y": test_y}
    n = len(CLASSES)
    targets = {
        f"roll{k}": (_task(f"roll{k}", CLASSES[k:] + CLASSES[:k]), test_f, (test_y - k) % n) for k in range(1, n)
    }
    targets["last3"] = (_task("last3", CLASSES[3:]), test_f[test_y >= 3], test_y[test_y >= 3] - 3)
    shifted = {"identity": test_f.clone()}
    out = crossdata.run(model, tok, source, src, targets, shifted, [1], HP, log=lambda m: None)
    return SimpleNamespace(out=out, model=model, tok=tok, test_f=test_f, test_y=test_y)


def test_every_row_is_measured_on_source_targets_and_shifts(crossdata, setup):
    out = setup.out
    assert set(out) == {"source", "transfer", "domain", "seeds"} and out["seeds"] == [1]
    assert set(out["transfer"]) == {"roll1", "roll2", "roll3", "roll4", "roll5", "last3"}
    assert set(out["domain"]) == {"identity"}
    for table in (out["source"], *out["transfer"].values(), *out["domain"].values()):
        assert set(table) == set(crossdata.ROWS)
        assert all(len(v) == 1 and 0.0 <= v[0] <= 100.0 for v in table.values())
    # an unshifted copy of the source test set is the source test set
    assert out["domain"]["identity"] == out["source"]


def test_transfer_uses_the_targets_class_names(setup):
    """Target ``rollk`` holds the source's test images with the class names (and labels) rotated by k: a head built
    from the target's names classifies each exactly as the source. Had the source's head been used, every
    prediction would match the label of exactly one of the six rotations (k = 0 is the source), so the six
    accuracies would sum to 100 rather than be equal (6 × a = 100 only for a = 100/6)."""
    out = setup.out
    for row, acc in out["source"].items():
        assert acc[0] != pytest.approx(100 / 6), row
        for k in range(1, len(CLASSES)):
            assert out["transfer"][f"roll{k}"][row] == pytest.approx(acc), (row, k)
    with torch.no_grad():  # the zero-shot row by hand, with the target's names
        head = build_zeroshot_classifier(setup.model, setup.tok, CLASSES[2:] + CLASSES[:2], ["a photo of a {}."])
    pred = (setup.test_f @ head.float().t()).argmax(-1)
    expected = float((pred == (setup.test_y - 2) % len(CLASSES)).float().mean() * 100)
    assert out["transfer"]["roll2"]["zs_single"][0] == pytest.approx(expected)
    assert out["source"]["zs_single"][0] > 50  # and the features are what they should be: zero-shot is good


def test_the_prompt_rows_train_and_differ_from_zero_shot(crossdata):
    """train_source returns one context per prompt row, each moved away from "a photo of a"."""
    from b2n import Context

    from tests.conftest import ToyTokenizer

    tok, model = ToyTokenizer(), tiny_clip()
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(24, model.config.projection_dim, generator=g), dim=-1)
    y = torch.arange(len(CLASSES)).repeat(4)
    with torch.no_grad():
        zs = build_zeroshot_classifier(model, tok, CLASSES, ["a photo of a {}."]).float()
    ctx_model = Context(model, tok)
    try:
        ctxs = crossdata.train_source(ctx_model, tok, CLASSES, x, y, zs, 1, HP)
        e0 = ctx_model.e0
    finally:
        ctx_model.close()
    assert set(ctxs) == set(crossdata.PROMPT_ROWS)
    assert all(not torch.allclose(c, e0) for c in ctxs.values())
    assert not torch.allclose(ctxs["coop"], ctxs["mergetune"]) and not torch.allclose(ctxs["coop"], ctxs["kgcoop"])
    assert all(not p.requires_grad or "coop" not in n for n, p in model.named_parameters())  # adapter unloaded


def test_tables_average_per_seed_and_count_wins(crossdata):
    out = {
        "source": {r: [50.0, 52.0] for r in crossdata.ROWS},
        "transfer": {
            "a": {r: [10.0, 20.0] if r != "coop" else [30.0, 30.0] for r in crossdata.ROWS},
            "b": {r: [30.0, 40.0] if r != "coop" else [0.0, 10.0] for r in crossdata.ROWS},
        },
        "domain": {},
    }
    s = crossdata.summarise(out, "transfer")
    assert s["columns"]["a"]["zs_single"]["mean"] == 15.0
    assert s["columns"]["a"]["zs_single"]["std"] == pytest.approx(7.0710678)
    assert s["average"]["coop"]["runs"] == [15.0, 20.0] and s["average"]["coop"]["mean"] == 17.5
    assert s["source"]["coop"]["mean"] == 51.0
    assert s["beats_zs_single"]["coop"] == 1 and s["beats_zs_single"]["mergetune"] == 0
    lines = crossdata.markdown(s, "transfer")
    assert lines[0].startswith("| method | caltech101 (source) | a | b | average (2 targets) |")
    assert "| CoOp | 51.00 ± 1.41 | 30.00 ± 0.00 | 5.00 ± 7.07 | **17.50 ± 3.54** |" in lines
    assert "CoOp 1 of 2 targets (average -7.50)" in lines[-1]
    with pytest.raises(ValueError, match="no domain results"):
        crossdata.summarise(out, "domain")


def test_unknown_rows_are_refused(crossdata, setup):
    with pytest.raises(ValueError, match="unknown cross-dataset rows"):
        crossdata.run(setup.model, setup.tok, _task("t", CLASSES), {}, {}, {}, [1], HP, rows=("coop", "cocoop"))


def test_the_harness_names_the_protocol_files(crossdata):
    run = _load("run")
    assert run.PROTOCOL_DESIGN["transfer"] == run.PROTOCOL_DESIGN["domain"] == "C"
    assert crossdata.OUTPUT_NAMES == {"transfer": "protocolC", "domain": "protocolD"}
    assert {"transfer", "domain", "crossdata"} <= set(run.PROTOCOLS)


def test_a_time_budget_stops_before_a_seed_and_the_result_says_which_ran(crossdata, setup):
    asked = []

    def stop(per_seed):
        asked.append(per_seed)
        return True

    src = {"down_f": setup.test_f, "down_y": setup.test_y, "test_f": setup.test_f, "test_y": setup.test_y}
    out = crossdata.run(setup.model, setup.tok, _task("toy", CLASSES), src, {}, {"same": setup.test_f}, [1, 2, 3],
                        HP, rows=("zs_single", "coop"), log=lambda m: None, stop_before=stop)  # fmt: skip
    assert out["seeds"] == [1] and len(asked) == 1 and asked[0] > 0
    assert all(len(v) == 1 for v in out["source"].values())
    assert (
        crossdata.summarise(out, "domain", ("zs_single", "coop"))["average"]["coop"]["runs"] == out["source"]["coop"]
    )


def test_runs_on_disjoint_seeds_combine_into_one_table(crossdata, tmp_path):
    import json

    def record(seed, shift):
        runs = {r: [float(seed) + (r == "coop") * shift] for r in crossdata.ROWS}
        out = {"source": runs, "domain": {"blur": runs, "jpeg": runs}, "seeds": [seed]}
        res = crossdata.protocol_result(out, "domain", dict(HP), len(CLASSES), [seed, seed + 1], "22:38")
        rec = {"protocol": "protocolD", "quick": False, "seeds": [seed], "date": f"d{seed}", "machine": {"cpus": 2},
               "versions": {}, "checkpoint": {"path": "m"}, "threads": 1, "command": f"run {seed}", "seconds": 2.0,
               **{k: v for k, v in res.items() if k != "plot"}}  # fmt: skip
        path = tmp_path / f"d{seed}.json"
        path.write_text(json.dumps(rec))
        return str(path)

    files = [record(1, 10.0), record(3, 20.0)]
    assert "**Only seeds [1] of [1, 2] ran**" in json.loads(Path(files[0]).read_text())["table"][-1]
    rec = crossdata.combine(files, str(tmp_path / "protocolD"))
    assert rec["seeds"] == [1, 3] and rec["seconds"] == 4.0
    assert rec["columns"]["blur"]["coop"]["runs"] == [11.0, 23.0] and rec["average"]["coop"]["mean"] == 17.0
    assert rec["source"]["zs_single"]["std"] == pytest.approx(2**0.5)
    md = (tmp_path / "protocolD.md").read_text()
    assert "seeds [1, 3], combined from `run 1`" in md and "Only seeds" not in md
    assert (tmp_path / "protocolD.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="share seeds"):
        crossdata.combine([files[0], files[0]], str(tmp_path / "again"))

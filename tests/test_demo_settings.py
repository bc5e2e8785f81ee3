"""``benchmarks/demo_settings.py``: the verdicts counted per seed, the summary and its table, and the flags each run
gets (the validation protocol never touches the test split)."""

import pytest
from tests_helpers import load_benchmark


@pytest.fixture(scope="module")
def ds():
    return load_benchmark("demo_settings")


def _results(zs, ft, mt, mt_ens, label="CoOp"):
    row = lambda b, n: {"base": b, "novel": n, "hm": 2 * b * n / (b + n) if b + n else 0.0}  # noqa: E731
    return {
        "zero-shot (ensemble)": row(*zs),
        "zero-shot ('a photo of a {}.')": row(50, 50),
        label: row(*ft),
        f"{label} + MergeTune": row(*mt),
        f"{label} ⊕ zero-shot (γ = 0.5)": row(60, 60),
        f"{label} + MergeTune ⊕ zero-shot (γ = 0.5)": row(*mt_ens),
    }


def test_verdict_counts_what_the_issue_asks(ds):
    # fine-tuning helps base and forgets novel; MergeTune beats both; its ensemble does not
    v = ds.verdict(_results(zs=(80, 70), ft=(85, 60), mt=(84, 72), mt_ens=(80, 60)))
    assert v == {"ft_helps_base": True, "ft_forgets_novel": True, "mergetune_wins": True, "mergetune_ens_wins": False}
    # equal is not better; the fine-tuned row is found by position (KgCoOp, VPT)
    v = ds.verdict(_results(zs=(80, 70), ft=(80, 70), mt=(80, 70), mt_ens=(81, 71), label="KgCoOp"))
    assert v == {"ft_helps_base": False, "ft_forgets_novel": False, "mergetune_wins": False, "mergetune_ens_wins": True}
    # VPT has no output-ensemble rows
    res = {k: v for k, v in _results((80, 70), (85, 60), (84, 72), (0, 0), "VPT").items() if "⊕" not in k}
    assert ds.verdict(res)["mergetune_ens_wins"] is False


def test_summary_and_markdown(ds):
    runs = {
        "pool70": [
            {"seed": 1, "results": _results((80, 70), (85, 60), (84, 72), (80, 60))},
            {"seed": 2, "results": _results((80, 70), (79, 60), (70, 65), (90, 80))},
        ]
    }
    s = ds.summarise(runs)["pool70"]
    assert s["seeds"] == 2 and s["verdicts"] == {
        "ft_helps_base": 1,
        "ft_forgets_novel": 2,
        "mergetune_wins": 1,
        "mergetune_ens_wins": 1,
    }
    assert s["rows"]["CoOp"]["base"] == (82.0, pytest.approx(4.2426, abs=1e-3))
    meta = {"machine": "m", "date": "d", "seeds": [1, 2], "seconds": 1.0, "command": "c"}
    text = ds.markdown(ds.summarise(runs), "val", meta)
    assert "## pool70: `--demo_pretrain_pool 0.7 --downstream_pool true`" in text
    assert "beats the zero-shot ensemble on base: 1/2" in text and "| CoOp | 82.00 ± 4.24 |" in text


def test_validation_flags_replace_the_settings_own(ds):
    argv = ds._with(["--demo_pretrain_pool", "1.0", "--seed", "3"], ds.VAL)
    assert argv[argv.index("--demo_pretrain_pool") + 1] == "0.7" and argv.count("--demo_pretrain_pool") == 1
    assert argv[argv.index("--downstream_pool") + 1] == "true" and "--val_shots" in argv
    with pytest.raises(SystemExit):  # the current demo CLIP saw every train image: no validation split
        ds.main(["search", "--settings", "current"])

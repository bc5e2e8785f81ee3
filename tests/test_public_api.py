"""The public surface: top-level names (lazy, like ``from trl import SFTTrainer``), what ``import hf_cft`` loads,
deprecated aliases, and the layering rule that :mod:`hf_cft.merging` never imports :mod:`hf_cft.hub`."""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hf_cft

ROOT = Path(__file__).resolve().parents[1]


def test_every_name_in_all_resolves_to_the_object_of_its_module():
    assert len(hf_cft.__all__) == len(set(hf_cft.__all__))
    for name in hf_cft.__all__:
        value = getattr(hf_cft, name)
        module = hf_cft._NAME_TO_MODULE.get(name)
        if module is not None:
            assert value is getattr(importlib.import_module(module), name), name
    for name in (
        "MergeTuneTrainer",
        "MergeTuneConfig",
        "ClipClassificationTrainer",
        "ClipTrainingArguments",
        "DeltaFusionMerger",
        "SemanticRouter",
        "PAMConfig",
        "PAMState",
        "PAMCallback",
        "ContinualRunner",
        "push_to_hub",
        "load_adapter_model",
        "plot_accuracy_matrix",
        "evaluate",
        "class_logits",
    ):
        assert name in hf_cft.__all__, name
    assert set(hf_cft.__all__) <= set(dir(hf_cft))
    assert "load_adapter" not in hf_cft.__all__  # PEFT's name, deprecated in hf_cft.hub
    from hf_cft import DeltaFusionMerger, MergeTuneTrainer, evaluate  # noqa: F401 - the import itself is the test

    with pytest.raises(AttributeError, match="has no attribute 'NotAThing'"):
        hf_cft.NotAThing  # noqa: B018
    with pytest.raises(ImportError):
        exec("from hf_cft import NotAThing", {})


#: Public names of the subpackages deliberately kept off the top level (reach them through their subpackage).
NOT_AT_TOP_LEVEL = {
    "hf_cft.continual": {"fit", "lora_factor_delta"},  # too generic a name; another function than merging's
    "hf_cft.hub": {
        "ADAPTER_METHODS",
        "CARD_KINDS",
        "MERGETUNE_METHOD",
        "PAM_METHOD",
        "PICKLE_SUFFIXES",
        "load_adapter",
    },  # card constants; the deprecated alias of load_adapter_model
}


@pytest.mark.parametrize("sub", ["trainers", "merging", "continual", "hub", "plots"])
def test_every_public_name_of_the_user_facing_subpackages_is_at_the_top_level(sub):
    module = importlib.import_module(f"hf_cft.{sub}")
    missing = set(module.__all__) - set(hf_cft.__all__) - NOT_AT_TOP_LEVEL.get(module.__name__, set())
    assert not missing, f"add {sorted(missing)} to hf_cft._LAZY_IMPORTS (and its TYPE_CHECKING block)"


def test_type_checking_imports_list_the_same_names_as_the_lazy_table():
    tree = ast.parse((ROOT / "hf_cft" / "__init__.py").read_text())
    checked: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                checked.setdefault(imp.module, set()).update(a.name for a in imp.names)
    assert checked == {m: set(names) for m, names in hf_cft._LAZY_IMPORTS.items()}


def test_import_hf_cft_is_lazy_and_registers_the_peft_methods():
    code = (
        "import json, sys, hf_cft\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
        "print(json.dumps({'modules': sorted(m for m in sys.modules if m.startswith(('hf_cft', 'datasets'))),"
        " 'registered': sorted(k for k in map(str, M) if 'HF_CFT' in k)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = set(info["modules"])
    for heavy in (
        "hf_cft.trainers",
        "hf_cft.merging",
        "hf_cft.continual",
        "hf_cft.hub",
        "hf_cft.plots",
        "hf_cft.evaluation",
        "hf_cft.data",
        "datasets",
    ):
        assert heavy not in loaded, f"import hf_cft loaded {heavy}"
    assert len(info["registered"]) == 3, info["registered"]  # CoOp, VPT, linear head


def test_submodules_and_deprecated_names_resolve_lazily():
    assert hf_cft.merging is importlib.import_module("hf_cft.merging")
    with pytest.warns(FutureWarning, match="base_novel_summary"):
        assert hf_cft.base_novel_hm(80.0, 40.0)["hm"] == pytest.approx(hf_cft.harmonic_mean(80.0, 40.0))


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_merging_never_imports_the_hub_layer():
    """The Hub layer depends on the artefacts (hf_cft.hub imports hf_cft.merging), not the other way round —
    also not lazily inside a function."""
    files = sorted((ROOT / "hf_cft" / "merging").rglob("*.py"))
    assert files
    offenders = {
        f.name: sorted(i for i in _imports(f) if i == "hf_cft.hub" or i.startswith("hf_cft.hub.")) for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}

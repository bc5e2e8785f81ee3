#!/usr/bin/env python3
"""Build ``hf_cft/data/resources/{mtil,base_to_novel}.json`` and document where every entry comes from.

This script is provenance, not part of the package or of CI. It reads a folder of source files copied out
of public repositories (class-name lists and prompt templates are data; no code from them is imported or
executed here: Python sources are parsed with :mod:`ast` and only list/str literals are read) and writes
the two JSON resources.

Expected layout of ``--sources`` (repository@commit and path of every file)::

    zscl/collections.py              Thunderbeee/ZSCL@b96e71423e2c  mtil/src/datasets/collections.py
    zscl/cifar10.py                  Thunderbeee/ZSCL@b96e71423e2c  mtil/src/datasets/cifar10.py
    zscl/imagenet_classnames.py      Thunderbeee/ZSCL@b96e71423e2c  mtil/src/datasets/imagenet_classnames.py
    coop/zsclip.py                   KaiyangZhou/CoOp@ff61507c7904  trainers/zsclip.py  (CUSTOM_TEMPLATES)
    coop/eurosat.py                  KaiyangZhou/CoOp@ff61507c7904  datasets/eurosat.py (NEW_CNAMES)
    clip/prompts.md                  openai/CLIP@d05afc436d78       data/prompts.md
    clip/Prompt_Engineering_for_ImageNet.ipynb
                                     openai/CLIP@d05afc436d78       notebooks/Prompt_Engineering_for_ImageNet.ipynb
    tpt/cls_to_names.py              azshue/TPT@63ecbace7969        data/cls_to_names.py
                                     (class names of CoOp's split_zhou_*.json files, as TPT copied them)
    fusion_bench/<name>.py           tanganke/fusion_bench@54c9e8c9d962  fusion_bench/tasks/clip_classification/
    hf_datasets/food101_names.txt    huggingface/datasets  datasets/food101/food101.py  (_NAMES, one per line)
    hf_datasets/cifar100_fine_names.txt
                                     huggingface/datasets  datasets/cifar100/cifar100.py (fine_label names)
    hf_datasets/mnist_names.txt      huggingface/datasets  datasets/mnist/mnist.py (label names)

Where ZSCL takes class names from torchvision at run time (aircraft, cifar100, dtd, food, mnist, oxford_pet,
stanford_cars, sun397) the raw names come from the files above and torchvision's own naming rule (quoted in
``torchvision_*`` helpers below, from pytorch/vision ``torchvision/datasets/*.py``) is applied, followed by
ZSCL's ``underline_to_space``. Every derived list is cross-checked against an independent source (CLIP's
prompts.md, FusionBench, TPT) and the script stops if a check fails.

Usage::

    python scripts/build_dataset_specs.py --sources /path/to/sources --out hf_cft/data/resources
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import re
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# Source metadata (recorded in the JSON "source" field)
# --------------------------------------------------------------------------------------------------
ZSCL = "Thunderbeee/ZSCL@b96e71423e2cbd592ddd229aaf2f1e889b86f1af"
COOP = "KaiyangZhou/CoOp@ff61507c790454bce7c5052c3ac39e60772f1f89"
CLIP = "openai/CLIP@d05afc436d78f1c48dc0dbf8e5980a9d471f35f6"
TPT = "azshue/TPT@63ecbace79694205d7884e63fdc3137a200f0b0e"
FUSION = "tanganke/fusion_bench@54c9e8c9d9621620c720452cd8533332a32d3689"
TORCHVISION = "pytorch/vision torchvision/datasets/{fgvc_aircraft,cifar,dtd,food101,mnist,oxford_iiit_pet,stanford_cars,sun397,caltech}.py"
HF_SCRIPTS = "huggingface/datasets datasets/{food101,cifar100,mnist}/*.py (legacy loading scripts)"

# torchvision.datasets.MNIST.classes (a constant in torchvision/datasets/mnist.py).
TORCHVISION_MNIST_CLASSES = [
    "0 - zero",
    "1 - one",
    "2 - two",
    "3 - three",
    "4 - four",
    "5 - five",
    "6 - six",
    "7 - seven",
    "8 - eight",
    "9 - nine",
]


# --------------------------------------------------------------------------------------------------
# Readers: only literals are extracted, nothing from the sources is executed.
# --------------------------------------------------------------------------------------------------
def module_literals(path: Path) -> dict[str, object]:
    """Top-level ``NAME = <literal>`` assignments of a Python file."""
    out = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def fstring_lambda_to_template(node: ast.AST) -> str:
    """``lambda c: f"a photo of a {c}."`` -> ``"a photo of a {}."``."""
    assert isinstance(node, ast.Lambda) and isinstance(node.body, ast.JoinedStr), ast.dump(node)
    parts = []
    for v in node.body.values:
        if isinstance(v, ast.Constant):
            parts.append(v.value.replace("{", "{{").replace("}", "}}"))
        else:
            parts.append("{}")
    return "".join(parts)


def zscl_classes(collections_py: Path, cifar10_py: Path) -> dict[str, dict[str, list[str]]]:
    """Per ZSCL dataset class: hard-coded ``self.classnames`` (if any) and ``self.templates`` as strings."""
    cifar_templates = [
        fstring_lambda_to_template(el)
        for node in ast.parse(cifar10_py.read_text(encoding="utf-8")).body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "cifar10_template"
        for el in node.value.elts
    ]
    out: dict[str, dict[str, list[str]]] = {}
    for cls in ast.parse(collections_py.read_text(encoding="utf-8")).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        info: dict[str, list[str]] = {}
        for node in ast.walk(cls):
            if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)):
                continue
            attr = node.targets[0].attr
            if attr == "classnames" and isinstance(node.value, ast.List):
                info["classnames"] = ast.literal_eval(node.value)
            elif attr == "templates" and isinstance(node.value, ast.List):
                info["templates"] = [fstring_lambda_to_template(el) for el in node.value.elts]
            elif attr == "templates" and isinstance(node.value, ast.Attribute):  # CIFAR: dataset.template
                info["templates"] = list(cifar_templates)
        out[cls.name] = info
    return out


def clip_prompts(prompts_md: Path) -> dict[str, dict[str, list[str]]]:
    """``## Name`` sections of CLIP's prompts.md, each with ``classes = [...]`` and ``templates = [...]``."""
    out = {}
    for sec in re.split(r"^## ", prompts_md.read_text(encoding="utf-8"), flags=re.M)[1:]:
        name = sec.split("\n", 1)[0].strip()
        code = re.search(r"```bash\n(.*?)```", sec, re.S).group(1)
        out[name] = {
            n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(code).body if isinstance(n, ast.Assign)
        }
    return out


def clip_notebook_imagenet(ipynb: Path) -> list[str]:
    for cell in json.loads(ipynb.read_text(encoding="utf-8"))["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code" and "imagenet_classes = [" in src:
            return module_literals_from_source(src)["imagenet_classes"]
    raise SystemExit("imagenet_classes not found in the CLIP notebook")


def module_literals_from_source(src: str) -> dict[str, object]:
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


# --------------------------------------------------------------------------------------------------
# Naming rules re-stated from the libraries the benchmarks load data with.
# --------------------------------------------------------------------------------------------------
def underline_to_space(names):  # ZSCL ClassificationDataset.process_labels; CoOp PromptLearner/ZeroshotCLIP
    return [n.replace("_", " ") for n in names]


def torchvision_pet_name(raw: str) -> str:  # OxfordIIITPet.classes: title-case each "_"-separated part
    return " ".join(part.title() for part in raw.split("_"))


def coop_sun397_to_classname_txt(coop_name: str) -> str:
    """Invert CoOp's SUN397 naming ("outdoor apartment_building") back to ClassName.txt's path
    ("apartment_building/outdoor"); CoOp reversed the "/"-separated parts and joined them with spaces."""
    return "/".join(coop_name.split(" ")[::-1])


def coop_cars_name(meta_name: str) -> str:  # CoOp StanfordCars.read_data: move the trailing year to the front
    words = meta_name.split(" ")
    return " ".join([words[-1]] + words[:-1])


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"cross-check failed: {what}")


def norm(s: str) -> str:
    return re.sub(r"[\s_/]+", " ", s).strip().lower()


# --------------------------------------------------------------------------------------------------
# Hub metadata: ids, splits, columns (looked up on dataset cards / FusionBench configs; see notes).
# --------------------------------------------------------------------------------------------------
def hub(hub_id, splits=None, image="image", label="label", label_names=None, config=None):
    return {
        "hub_id": hub_id,
        "hub_config": config,
        "hub_splits": splits or {"train": "train", "test": "test"},
        "image_column": image,
        "label_column": label,
        "hub_label_names": label_names,
    }


def build(src: Path) -> tuple[dict, dict]:
    z = zscl_classes(src / "zscl/collections.py", src / "zscl/cifar10.py")
    clip = clip_prompts(src / "clip/prompts.md")
    tpt = module_literals(src / "tpt/cls_to_names.py")
    fb = {
        n: module_literals(src / f"fusion_bench/{n}.py")
        for n in ("stanford_cars", "sun397", "eurosat", "dtd", "flower102", "oxford_iiit_pet", "food101", "cifar100")
    }
    hf_food = lines(src / "hf_datasets/food101_names.txt")
    hf_cifar = lines(src / "hf_datasets/cifar100_fine_names.txt")
    hf_mnist = lines(src / "hf_datasets/mnist_names.txt")
    coop_templates = module_literals(src / "coop/zsclip.py")["CUSTOM_TEMPLATES"]
    coop_eurosat = module_literals(src / "coop/eurosat.py")["NEW_CNAMES"]
    imagenet_clip = clip_notebook_imagenet(src / "clip/Prompt_Engineering_for_ImageNet.ipynb")

    # ---------------- raw label names, in the official / torchvision label order ----------------
    raw = {}
    raw["aircraft"] = tpt["aircraft_classes"]  # = data/variants.txt (read by both CoOp and torchvision)
    check(raw["aircraft"] == clip["FGVCAircraft"]["classes"], "aircraft variants.txt vs CLIP")
    # CIFAR-100 meta fine_label_names: CLIP lists them with "_" -> " "; HF ClassLabel has the typo "cra".
    raw["cifar100"] = [c.replace(" ", "_") for c in clip["CIFAR100"]["classes"]]
    diff = [i for i, (a, b) in enumerate(zip(raw["cifar100"], hf_cifar)) if a != b]
    check(diff == [26] and hf_cifar[26] == "cra" and raw["cifar100"][26] == "crab", "cifar100 CLIP vs HF")
    raw["dtd"] = tpt["dtd_classes"]  # sorted image folder names
    check(raw["dtd"] == sorted(raw["dtd"]) == clip["DescribableTextures"]["classes"] == fb["dtd"]["classnames"], "dtd")
    raw["food"] = sorted(hf_food)  # torchvision: sorted(meta/train.json keys); CoOp: sorted(listdir(images))
    check(set(hf_food) == set(tpt["food101_classes"]), "food101 HF vs TPT")
    check(underline_to_space(raw["food"]) == fb["food101"]["classnames"], "food101 sorted vs FusionBench")
    raw["oxford_pet"] = tpt["pets_classes"]  # breed ids 1..37 (annotations/list.txt), lower-cased
    check(
        sorted(norm(r) for r in raw["oxford_pet"]) == sorted(norm(c) for c in clip["OxfordPets"]["classes"]),
        "pets vs CLIP (as a case-insensitive set; CLIP's list is not in label order)",
    )
    check(raw["oxford_pet"] == fb["oxford_iiit_pet"]["classnames"], "pets TPT vs FusionBench")
    raw["stanford_cars"] = fb["stanford_cars"]["classnames"]  # devkit/cars_meta.mat class_names
    check([coop_cars_name(n) for n in raw["stanford_cars"]] == tpt["cars_classes"], "cars meta vs CoOp/TPT")
    check(raw["stanford_cars"] == clip["StanfordCars"]["classes"], "cars meta vs CLIP")
    raw["sun397"] = [coop_sun397_to_classname_txt(n) for n in tpt["sun397_classes"]]  # ClassName.txt minus "/x/"
    # FusionBench (= tanganke/sun397 ClassLabel) sorts the space-joined names, which swaps ids 206/207
    # ("jail cell" before "jail indoor"); ClassName.txt (byte order) has jail/indoor first, as CoOp/TPT do.
    spaced = [re.sub(r"[_/]", " ", n) for n in raw["sun397"]]
    sun_diff = [i for i, (a, b) in enumerate(zip(spaced, fb["sun397"]["classnames"])) if a != b]
    check(sorted(spaced) == sorted(fb["sun397"]["classnames"]) and sun_diff == [206, 207], "sun397 vs FusionBench")
    clip_diff = [i for i, (a, b) in enumerate(zip(raw["sun397"], clip["SUN397"]["classes"])) if norm(a) != norm(b)]
    check(clip_diff == [206, 207], "sun397 vs CLIP (CLIP shares FusionBench's 206/207 order)")
    flower_map = tpt["flower102_maps"]  # cat_to_name.json: {"1": "pink primrose", ...}, label ids 1..102
    raw["flowers"] = [flower_map[str(i)] for i in range(1, len(flower_map) + 1)]
    raw["caltech101_coop"] = tpt["caltech101_classes"]  # CoOp: sorted folders - {BACKGROUND_Google, Faces_easy}
    raw["ucf101"] = tpt["ucf101_classes"]  # ucfTrainTestlist/classInd.txt order, CamelCase split with "_"
    # CLIP sorts case-sensitively and writes "Hand Stand Pushups"; classInd.txt (checked against an independent
    # copy: 35 Hammering, 36 HammerThrow, 37 HandstandPushups) is what CoOp's labels follow.
    squash = lambda n: norm(n).replace(" ", "")  # noqa: E731
    check(sorted(map(squash, raw["ucf101"])) == sorted(map(squash, clip["UCF101"]["classes"])), "ucf101 vs CLIP")
    check(
        imagenet_clip == module_literals(src / "zscl/imagenet_classnames.py")["openai_classnames"],
        "ImageNet: CLIP notebook vs ZSCL openai_classnames",
    )

    # ---------------- MTIL (ZSCL) ----------------
    def zs(cls):
        return z[cls]

    check(zs("Flowers")["classnames"] == raw["flowers"], "flowers ZSCL vs cat_to_name (TPT)")
    fl_diff = [i for i, (a, b) in enumerate(zip(raw["flowers"], clip["Flowers102"]["classes"])) if a != b]
    check(fl_diff == [15, 59, 92], "flowers vs CLIP (CLIP renames 3 classes)")
    check(zs("Caltech101")["classnames"] == clip["Caltech101"]["classes"][1:], "caltech101 ZSCL == CLIP minus bg")
    check(zs("EuroSAT")["classnames"] == fb["eurosat"]["classnames"], "eurosat ZSCL vs FusionBench")
    split_note = (
        "ZSCL has no official split here: it takes the whole torchvision dataset and calls "
        "torch.utils.data.random_split(dataset, [int(0.8*n), n-int(0.8*n)], "
        "generator=torch.Generator().manual_seed(42)); the Hub splits are NOT that split."
    )
    mtil_entries = {
        "aircraft": dict(
            display_name="FGVC-Aircraft",
            cls="Aircraft",
            classnames=underline_to_space(raw["aircraft"]),
            source_label_names=raw["aircraft"],
            **hub("HuggingFaceM4/FGVC-Aircraft", {"train": "train", "test": "test"}),
            notes="Class names: torchvision FGVCAircraft(annotation_level='variant').classes = data/variants.txt "
            "(same list as CoOp/TPT and CLIP). ZSCL trains on split='train' (3,334 images, not trainval) "
            "and tests on split='test'. Hub id not confirmed: HuggingFaceM4/FGVC-Aircraft was converted "
            "to Parquet (train/validation/test) but its column names and ClassLabel names were not "
            "verified (it may expose variant/family/manufacturer columns); check label_column and "
            "map labels by name against source_label_names.",
        ),
        "caltech101": dict(
            display_name="Caltech-101",
            cls="Caltech101",
            classnames=zs("Caltech101")["classnames"],
            source_label_names=caltech_folders(raw["caltech101_coop"], with_background=False),
            **hub("dpdl-benchmark/caltech101", {"train": "train", "test": "test"}),
            notes="Class names: hard-coded in ZSCL (CLIP's prompts.md list without 'background'); label order "
            "= torchvision Caltech101.categories = sorted(os.listdir) without BACKGROUND_Google: Faces "
            "('off-center face'), Faces_easy ('centered face'), Leopards, Motorbikes, accordion, "
            "airplanes, ... 'head of a  crocodile' has a double space in ZSCL/CLIP (kept verbatim). "
            + split_note
            + " Hub: dpdl-benchmark/caltech101 has 102 labels incl. 'background_google', "
            "lower-cased and sorted case-insensitively (accordion=0, airplanes=1, ..., faces=37, "
            "faces_easy=38) - a different order: drop background_google and remap (hub_label_names "
            "derived from the raw folder names and only partly checked against the card; splits not "
            "confirmed).",
        ),
        "cifar100": dict(
            display_name="CIFAR-100",
            cls="CIFAR100",
            classnames=underline_to_space(raw["cifar100"]),
            source_label_names=raw["cifar100"],
            **hub("uoft-cs/cifar100", image="img", label="fine_label", label_names=hf_cifar),
            notes="Class names: torchvision CIFAR100.classes (meta fine_label_names, alphabetical) with '_'->' '. "
            "The Hugging Face ClassLabel has the typo 'cra' for 'crab' at id 26; the order is identical. "
            "Columns img/fine_label (coarse_label also present). FusionBench uses tanganke/cifar100 "
            "instead (columns not checked). ZSCL ensembles 18 CIFAR templates at evaluation.",
        ),
        "dtd": dict(
            display_name="DTD",
            cls="DTD",
            classnames=underline_to_space(raw["dtd"]),
            source_label_names=raw["dtd"],
            **hub("tanganke/dtd", label_names=raw["dtd"]),
            notes="Class names: torchvision DTD.classes = sorted folder names. ZSCL uses torchvision DTD "
            "partition 1, split='train' (1,880 images) and split='test' (1,880); tanganke/dtd's train "
            "split size was not checked (it may be train+val). hub_label_names confirmed from the "
            "tanganke/dtd card (47 names, same order).",
        ),
        "eurosat": dict(
            display_name="EuroSAT",
            cls="EuroSAT",
            classnames=zs("EuroSAT")["classnames"],
            source_label_names=[
                "AnnualCrop",
                "Forest",
                "HerbaceousVegetation",
                "Highway",
                "Industrial",
                "Pasture",
                "PermanentCrop",
                "Residential",
                "River",
                "SeaLake",
            ],
            **hub("tanganke/eurosat", label_names=fb["eurosat"]["classnames"]),
            notes="Class names: hard-coded in ZSCL; label order = torchvision EuroSAT (ImageFolder over 2750/, "
            "sorted folder names; 'brushland or shrubland' = HerbaceousVegetation). "
            + split_note
            + " Hub: tanganke/eurosat (FusionBench) has its own train/test split; its ClassLabel names are "
            "taken from FusionBench's classnames (the card shows 'annual crop land' at id 0; the rest "
            "not individually verified).",
        ),
        "flowers": dict(
            display_name="Flowers102",
            cls="Flowers",
            classnames=zs("Flowers")["classnames"],
            source_label_names=raw["flowers"],
            **hub("dpdl-benchmark/oxford_flowers102", label_names=raw["flowers"]),
            notes="Class names: hard-coded in ZSCL, identical to cat_to_name.json (CLIP's prompts.md differs at ids "
            "15, 59, 92: 'globe flower', 'pink and yellow dahlia', 'air plant'); label ids 1..102 -> 0..101. "
            "ZSCL uses torchvision Flowers102 split='train' (1,020) and split='test' (6,149), which match "
            "the hub's train/test (it also has 'validation', 1,020). hub_label_names = cat_to_name order; "
            "the card's first 40 names were checked.",
        ),
        "food": dict(
            display_name="Food-101",
            cls="Food",
            classnames=underline_to_space(raw["food"]),
            source_label_names=raw["food"],
            **hub("ethz/food101", {"train": "train", "test": "validation"}, label_names=hf_food),
            notes="Class names: torchvision Food101.classes = sorted(meta/train.json keys), so 'cheese_plate' "
            "(16) precedes 'cheesecake' (17). The Hub ClassLabel (ethz/food101) follows classes.txt "
            "order with cheesecake=16, cheese_plate=17: labels 16/17 must be swapped (map by name). "
            "The Hub test split is called 'validation' (25,250 images).",
        ),
        "mnist": dict(
            display_name="MNIST",
            cls="MNIST",
            classnames=underline_to_space(TORCHVISION_MNIST_CLASSES),
            source_label_names=hf_mnist,
            **hub("ylecun/mnist", label_names=hf_mnist),
            notes="Class names: torchvision MNIST.classes ('0 - zero', ...), used verbatim by ZSCL with the "
            "template 'a photo of the number: \"{}\".'. Hub ClassLabel names are '0'..'9' (same order).",
        ),
        "oxford_pet": dict(
            display_name="Oxford-IIIT Pets",
            cls="OxfordPet",
            classnames=[torchvision_pet_name(r) for r in raw["oxford_pet"]],
            source_label_names=raw["oxford_pet"],
            **hub("timm/oxford-iiit-pet", label_names=raw["oxford_pet"]),
            notes="Class names: torchvision OxfordIIITPet.classes (breed file prefix, each '_' part title-cased, "
            "ordered by class id 1..37). ZSCL trains on split='trainval' (3,680) = hub 'train', tests on "
            "'test' (3,669). hub_label_names confirmed from the timm/oxford-iiit-pet card (37 names); "
            "the hub also has image_id and label_cat_dog columns. Note CLIP's prompts.md lists pets in a "
            "different (non-label) order.",
        ),
        "stanford_cars": dict(
            display_name="Stanford Cars",
            cls="StanfordCars",
            classnames=underline_to_space(raw["stanford_cars"]),
            source_label_names=raw["stanford_cars"],
            **hub("tanganke/stanford_cars", label_names=raw["stanford_cars"]),
            notes="Class names: torchvision StanfordCars.classes = devkit/cars_meta.mat class_names "
            "('AM General Hummer SUV 2000', ...), taken from FusionBench and cross-checked against CLIP and "
            "CoOp/TPT. Splits train (8,144) / test (8,041). hub_label_names assumed equal to the meta names "
            "(the card shows id 0 = 'AM General Hummer SUV 2000'; the rest not individually verified).",
        ),
        "sun397": dict(
            display_name="SUN397",
            cls="SUN397",
            classnames=underline_to_space(raw["sun397"]),
            source_label_names=raw["sun397"],
            **hub("tanganke/sun397", label_names=fb["sun397"]["classnames"]),
            notes="Class names: torchvision SUN397.classes = ClassName.txt lines without the '/x/' prefix "
            "(e.g. 'apartment_building/outdoor'), then ZSCL's '_'->' ' gives 'apartment building/outdoor'. "
            "ClassName.txt was reconstructed from CoOp's names (TPT) and checked against FusionBench and "
            "CLIP (both of which list 'jail cell' before 'jail indoor', ids 206/207 swapped w.r.t. ClassName.txt; "
            "CoOp/TPT and an independent ClassName.txt-ordered listing put jail/indoor first). "
            + split_note
            + " torchvision enumerates images with rglob, so even the ZSCL split "
            "depends on file-system order. Hub: tanganke/sun397 holds only the official partition-01 "
            "(19,850 train / 19,850 test), not the full 108,754 images; hub_label_names from FusionBench "
            "('apartment building outdoor' style, only the first ids checked on the card) - its ids 206/207 are "
            "swapped relative to classnames, so map labels by name, not by index.",
        ),
    }
    mtil = {
        "benchmark": "mtil",
        "source": (
            f"{ZSCL} mtil/src/datasets/collections.py, cifar10.py (class names where hard-coded, all "
            f"templates; training uses templates[0], evaluation ensembles all); torchvision naming rules "
            f"({TORCHVISION}) for names ZSCL reads at run time, raw names from {TPT} data/cls_to_names.py, "
            f"{FUSION} fusion_bench/tasks/clip_classification/*.py, {HF_SCRIPTS}; cross-checked "
            f"against {CLIP} data/prompts.md. Generated by scripts/build_dataset_specs.py."
        ),
        "orders": {
            "order_i": [
                "aircraft",
                "caltech101",
                "cifar100",
                "dtd",
                "eurosat",
                "flowers",
                "food",
                "mnist",
                "oxford_pet",
                "stanford_cars",
                "sun397",
            ],
            "order_ii": [
                "stanford_cars",
                "food",
                "mnist",
                "oxford_pet",
                "flowers",
                "sun397",
                "aircraft",
                "caltech101",
                "dtd",
                "eurosat",
                "cifar100",
            ],
        },
        "datasets": {},
    }
    for name, e in mtil_entries.items():
        cls = e.pop("cls")
        entry = {
            "display_name": e.pop("display_name"),
            "num_classes": len(e["classnames"]),
            "classnames": e.pop("classnames"),
            "templates": zs(cls)["templates"],
        }
        entry.update(e)
        mtil["datasets"][name] = entry

    # ---------------- Base-to-novel (CoOp / CoCoOp) ----------------
    coop_eurosat_names = [coop_eurosat[k] for k in sorted(coop_eurosat)]  # sorted folders -> NEW_CNAMES
    check(coop_eurosat_names == tpt["eurosat_classes"], "eurosat CoOp NEW_CNAMES vs TPT")
    b2n_src = {
        "imagenet": (
            "ImageNet",
            "ImageNet",
            imagenet_clip,
            None,
            hub("ILSVRC/imagenet-1k", {"train": "train", "test": "validation"}),
            "Class names: CLIP's 1000 ImageNet names from the notebook (CoOp's classnames.txt is copied from "
            "it; identical to ZSCL's openai_classnames); label order = sorted WordNet ids. CoOp tests on the "
            "ILSVRC-2012 val set (hub 'validation'). Hub id not confirmed: gated, and its ClassLabel names "
            "are the long WordNet lemmas ('tench, Tinca tinca'), so hub_label_names is left null; the "
            "order is the same standard order. DUPLICATES kept verbatim from CLIP/CoOp: 'missile' at ids 657 and 744 "
            "(n03773504 missile, n04008634 projectile, missile) and 'sunglasses' at ids 836 and 837 (n04355933 "
            "sunglass, n04356056 sunglasses, dark glasses); a loader that requires unique names must "
            "special-case them.",
        ),
        "caltech101": (
            "Caltech101",
            "Caltech-101",
            underline_to_space(raw["caltech101_coop"]),
            [f for f in caltech_folders(raw["caltech101_coop"], with_background=False) if f != "Faces_easy"],
            mtil_hub("caltech101", mtil),
            "Class names: CoOp's split_zhou_Caltech101.json names as copied in TPT (sorted folders without "
            "BACKGROUND_Google and Faces_easy; Faces->face, Leopards->leopard, Motorbikes->motorbike, "
            "airplanes->airplane), '_'->' '. 100 classes (CLIP's list has 102, ZSCL's 101). CoOp re-splits "
            "50/20/30 (train/val/test) per class; the Hub splits differ and the Hub labels (102, "
            "lower-case, case-insensitive order) need remapping by folder name (source_label_names), "
            "dropping background_google and faces_easy.",
        ),
        "oxford_pets": (
            "OxfordPets",
            "Oxford-IIIT Pets",
            underline_to_space(raw["oxford_pet"]),
            raw["oxford_pet"],
            mtil_hub("oxford_pet", mtil),
            "Class names: CoOp lower-cases the breed prefix of the image names (label = class id - 1), "
            "'_'->' ' (TPT copy of the split file). CoOp's test = official test (hub 'test'); its train/val "
            "are a 80/20 split of trainval (hub 'train'). CLIP's prompts.md lists pets in another order.",
        ),
        "stanford_cars": (
            "StanfordCars",
            "Stanford Cars",
            [coop_cars_name(n) for n in raw["stanford_cars"]],
            raw["stanford_cars"],
            mtil_hub("stanford_cars", mtil),
            "Class names: cars_meta.mat names with the year moved to the front (CoOp "
            "StanfordCars.read_data), e.g. '2000 AM General Hummer SUV'; checked against TPT. Test = "
            "official test; train/val = 80/20 of the official train.",
        ),
        "flowers102": (
            "OxfordFlowers",
            "Flowers102",
            raw["flowers"],
            raw["flowers"],
            mtil_hub("flowers", mtil),
            "Class names: cat_to_name.json (CoOp), label ids 1..102 -> 0..101; same as ZSCL (CLIP renames ids "
            "15, 59, 92). CoOp "
            "re-splits 50/20/30 per class, unlike the Hub train/validation/test.",
        ),
        "food101": (
            "Food101",
            "Food-101",
            underline_to_space(raw["food"]),
            raw["food"],
            mtil_hub("food", mtil),
            "Class names: sorted image folders (CoOp DTD.read_and_split_data), so cheese_plate=16, "
            "cheesecake=17 (TPT and the Hub list them the other way round; remap by name). CoOp re-splits "
            "50/20/30; Hub test split is 'validation'.",
        ),
        "fgvc_aircraft": (
            "FGVCAircraft",
            "FGVC-Aircraft",
            raw["aircraft"],
            raw["aircraft"],
            mtil_hub("aircraft", mtil),
            "Class names: data/variants.txt (CoOp); official train/val/test. Hub id/columns not "
            "confirmed (see mtil/aircraft).",
        ),
        "sun397": (
            "SUN397",
            "SUN397",
            underline_to_space(tpt["sun397_classes"]),
            raw["sun397"],
            mtil_hub("sun397", mtil),
            "Class names: CoOp's SUN397 naming (ClassName.txt parts reversed and joined, e.g. 'outdoor "
            "apartment building'), from TPT's copy of the split file, '_'->' '. CoOp uses partition 01: "
            "Testing_01 as test, Training_01 split 80/20 into train/val; tanganke/sun397 (19,850/19,850) "
            "appears to be partition 01 but this was not verified. Its ClassLabel swaps ids 206/207 "
            "('jail cell'/'jail indoor') relative to ClassName.txt/CoOp: map by name.",
        ),
        "dtd": (
            "DescribableTextures",
            "DTD",
            underline_to_space(raw["dtd"]),
            raw["dtd"],
            mtil_hub("dtd", mtil),
            "Class names: sorted folder names. CoOp re-splits all 5,640 images 50/20/30 per class, unlike the "
            "Hub train/test.",
        ),
        "eurosat": (
            "EuroSAT",
            "EuroSAT",
            coop_eurosat_names,
            sorted(coop_eurosat),
            mtil_hub("eurosat", mtil),
            "Class names: CoOp datasets/eurosat.py NEW_CNAMES applied to the sorted folder names "
            "(AnnualCrop, Forest, HerbaceousVegetation, ...). These differ from ZSCL's/CLIP's names and from "
            "the tanganke/eurosat ClassLabel names (same order, map by index). CoOp re-splits 50/20/30.",
        ),
        "ucf101": (
            "UCF101",
            "UCF101",
            underline_to_space(raw["ucf101"]),
            raw["ucf101"],
            hub(None),
            "Class names: ucfTrainTestlist/classInd.txt order, CamelCase split by CoOp's regex ('Apply_Eye_"
            "Makeup'), '_'->' ' (TPT copy). CLIP's prompts.md has the same names but in case-sensitive order (ids "
            "34/35 and 46/47 swapped) and 'Hand Stand Pushups'. CoOp uses the middle frame of each video "
            "(UCF-101-midframes), split 01 (testlist01 as test). No public Parquet image version was found: "
            "hub_id is null; provide a local folder.",
        ),
    }
    b2n = {
        "benchmark": "base_to_novel",
        "source": (
            f"{COOP} trainers/zsclip.py (CUSTOM_TEMPLATES), datasets/*.py (naming rules, NEW_CNAMES); "
            f"class names of CoOp's split_zhou_*.json files as copied in {TPT} data/cls_to_names.py; "
            f"ImageNet names from {CLIP} notebooks/Prompt_Engineering_for_ImageNet.ipynb; cars meta names "
            f"from {FUSION}; food101 names from {HF_SCRIPTS}; cross-checked against {CLIP} data/prompts.md. "
            "Generated by scripts/build_dataset_specs.py."
        ),
        "datasets": {},
    }
    for name, (coop_key, display, classnames, source_names, hubinfo, note) in b2n_src.items():
        n = len(classnames)
        base = math.ceil(n / 2)
        entry = {
            "display_name": display,
            "num_classes": n,
            "classnames": classnames,
            "templates": [coop_templates[coop_key]],
            "source_label_names": source_names,
        }
        entry.update(hubinfo)
        entry["notes"] = (
            note + f" Base/novel: CoOp's subsample_classes takes the first ceil(n/2) = {base} labels "
            f"as base and the remaining {n - base} as novel (by label id). Exact CoOp numbers need the "
            "split_zhou_*.json files (not in the repo)."
        )
        b2n["datasets"][name] = entry
    return mtil, b2n


def mtil_hub(name: str, mtil: dict) -> dict:
    """Re-use the Hub fields of an MTIL entry for the same dataset."""
    e = mtil["datasets"][name]
    return {k: e[k] for k in ("hub_id", "hub_config", "hub_splits", "image_column", "label_column", "hub_label_names")}


def caltech_folders(coop_names: list[str], with_background: bool) -> list[str]:
    """101_ObjectCategories folder names in torchvision order (case-sensitive sort), rebuilt from CoOp's names by
    undoing CoOp's NEW_CNAMES and adding back the folders CoOp ignores (Faces_easy, optionally BACKGROUND_Google)."""
    inverse = {"airplane": "airplanes", "face": "Faces", "leopard": "Leopards", "motorbike": "Motorbikes"}
    folders = [inverse.get(n, n) for n in coop_names] + ["Faces_easy"]
    if with_background:
        folders.append("BACKGROUND_Google")
    return sorted(folders)


def caltech_hub_label_names(coop_names: list[str]) -> list[str]:
    """dpdl-benchmark/caltech101 ClassLabel: folder names lower-cased, sorted (incl. background_google)."""
    return sorted(f.lower() for f in caltech_folders(coop_names, with_background=True))


def validate(doc: dict) -> None:
    for name, e in doc["datasets"].items():
        check(len(e["classnames"]) == e["num_classes"], f"{name}: count")
        dups = sorted({c for c in e["classnames"] if e["classnames"].count(c) > 1})
        # Only CLIP's ImageNet list has duplicates; they are kept verbatim (CoOp uses them) and named in the notes.
        check(not dups or (name == "imagenet" and dups == ["missile", "sunglasses"]), f"{name}: duplicates {dups}")
        check(all(t.count("{}") == 1 for t in e["templates"]), f"{name}: template placeholders")
        if e.get("source_label_names") is not None:
            check(len(e["source_label_names"]) == e["num_classes"], f"{name}: source_label_names length")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=Path, required=True, help="folder laid out as described above")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "hf_cft/data/resources")
    args = ap.parse_args()
    mtil, b2n = build(args.sources)
    # The Caltech-101 Hub labels are a re-ordering of the raw folder names (102 incl. background).
    cal = caltech_hub_label_names(b2n["datasets"]["caltech101"]["source_label_names"])
    mtil["datasets"]["caltech101"]["hub_label_names"] = cal
    b2n["datasets"]["caltech101"]["hub_label_names"] = cal
    for doc in (mtil, b2n):
        validate(doc)
        path = args.out / f"{doc['benchmark']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path}: " + ", ".join(f"{k}={v['num_classes']}" for k, v in doc["datasets"].items()))


if __name__ == "__main__":
    main()

"""Render model cards from hf_cft's templates with evaluation results in the Hub's model-index format."""

from __future__ import annotations

from importlib import resources

ADAPTER_METHODS = {
    "HF_CFT_COOP": {
        "name": "CoOp",
        "description": "learned context vectors in the text prompt of every class (soft prompts).",
        "paper": "Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022 (arXiv:2109.01134)",
        "tags": ["coop", "prompt-learning"],
        "citation": "@article{zhou2022coop,\n  title={Learning to Prompt for Vision-Language Models},\n"
        "  author={Zhou, Kaiyang and Yang, Jingkang and Loy, Chen Change and Liu, Ziwei},\n"
        "  journal={International Journal of Computer Vision},\n  year={2022}\n}",
        "usage": "features = model.class_text_features(AutoTokenizer.from_pretrained(...), classnames)",
    },
    "HF_CFT_VPT": {
        "name": "VPT",
        "description": "learned prompt tokens inserted after the CLS token of the vision tower.",
        "paper": "Jia et al., Visual Prompt Tuning, ECCV 2022 (arXiv:2203.12119)",
        "tags": ["vpt", "prompt-learning"],
        "citation": "@inproceedings{jia2022vpt,\n  title={Visual Prompt Tuning},\n"
        "  author={Jia, Menglin and Tang, Luming and Chen, Bor-Chun and Cardie, Claire and Belongie, Serge and "
        "Hariharan, Bharath and Lim, Ser-Nam},\n  booktitle={ECCV},\n  year={2022}\n}",
        "usage": "image_features = hf_cft.models.image_features(model, pixel_values)",
    },
    "HF_CFT_HEAD": {
        "name": "Zero-shot-initialised linear head",
        "description": "a linear classifier on normalised image features, initialised from the zero-shot text head.",
        "paper": "Wortsman et al., Robust fine-tuning of zero-shot models (WiSE-FT), CVPR 2022 (arXiv:2109.01903)",
        "tags": ["linear-probe"],
        "citation": "@inproceedings{wortsman2022robust,\n  title={Robust fine-tuning of zero-shot models},\n"
        "  author={Wortsman, Mitchell and others},\n  booktitle={CVPR},\n  year={2022}\n}",
        "usage": "logits = model.classify(pixel_values)",
    },
}


def render_card(template: str, card_data, **variables):
    """Render ``model_cards/<template>.md`` with ``card_data`` (a ``ModelCardData``) and template variables."""
    from huggingface_hub import ModelCard

    text = resources.files("hf_cft.model_cards").joinpath(f"{template}.md").read_text(encoding="utf-8")
    return ModelCard.from_template(card_data, template_str=text, **variables)


def adapter_card(
    peft_model,
    *,
    model_name: str,
    dataset_name: str,
    dataset_id: str | None = None,
    results: list[dict],
    hyperparameters: dict,
    training_data: str,
    task_description: str = "image classification",
    hm: float | None = None,
    results_note: str = "",
    limitations: str = "",
    repo_id: str | None = None,
    method: dict | None = None,
):
    """A model card for an hf_cft PEFT adapter (CoOp, VPT, linear head).

    ``results`` rows: ``{"name": split name, "num_classes": int, "accuracy": percent}``; each becomes a
    model-index entry (task image-classification, metric accuracy). ``method`` overrides entries of the method's
    description (``name``, ``description``, ``paper``, ``tags``, ``citation``, ``usage``), e.g. for a MergeTune
    continued CoOp adapter.
    """
    from huggingface_hub import EvalResult, ModelCardData

    adapter = peft_model.active_adapter
    cfg = peft_model.peft_config[adapter]
    known = ADAPTER_METHODS.get(str(cfg.peft_type))
    if known is None:
        raise ValueError(f"no card template for PEFT type {cfg.peft_type!r} (adapter {adapter!r})")
    method = {**known, **(method or {})}
    base_model = cfg.base_model_name_or_path or None
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset_id or dataset_name,
            dataset_name=f"{dataset_name} ({row['name']})",
            dataset_config=row["name"],
            dataset_split=row.get("split", "test"),
            metric_type="accuracy",
            metric_value=round(float(row["accuracy"]), 4),
            metric_name=f"{row['name']} accuracy",
        )
        for row in results
    ]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="peft",
        pipeline_tag="zero-shot-image-classification",
        base_model=base_model,
        tags=["hf_cft", "clip", *method["tags"]],
        eval_results=eval_results,
        license="apache-2.0",
    )
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return render_card(
        "adapter",
        card_data,
        model_name=model_name,
        base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if base_model and "/" in base_model else "#",
        method_name=method["name"],
        method_description=method["description"],
        paper=method["paper"],
        peft_type=cfg.peft_type,
        trainable_params=f"{trainable:,}",
        task_description=task_description,
        dataset_name=dataset_name,
        results=results,
        hm=hm,
        results_note=results_note,
        hyperparameters=hyperparameters,
        training_data=training_data,
        usage_snippet=method["usage"],
        limitations=limitations or "Evaluated only on the data listed above; accuracy elsewhere is unknown.",
        citation=method["citation"],
        repo_id=repo_id,
    )

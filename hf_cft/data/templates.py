"""Prompt templates: validation and formatting."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from hf_cft.errors import ClassNamesError, TemplateError
from hf_cft.utils import user_stacklevel
from hf_cft.validation import check_class_names_type, check_template

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def validate_templates(templates: Sequence[str], owner: str = "") -> list[str]:
    """Check that there is at least one template and that formatting a class name into each gives the name exactly
    once (:func:`hf_cft.validation.check_template`: ``'a {{}}'``, ``'a {0} {}'``, ``'{name} {}'`` are refused);
    return them as a list."""
    where = f" of {owner}" if owner else ""
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise TemplateError(f"The template list{where} is empty; give at least one, e.g. 'a photo of a {{}}.'.")
    for t in templates:
        check_template(t, owner)
    return templates


def validate_classnames(
    classnames: Sequence[str], owner: str = "", num_labels: int | None = None, duplicates: str = "warn"
) -> list[str]:
    """Check that class names are non-empty strings and as many as the labels (if given).

    Duplicated names occur in real sources (CLIP's ImageNet names hold "missile" twice); they make two classes
    indistinguishable to a text head, so ``duplicates="warn"`` (default) warns naming them, ``"error"`` raises
    :class:`ClassNamesError`, ``"ignore"`` accepts them silently.
    """
    where = f" of {owner}" if owner else ""
    names = check_class_names_type(classnames, owner)
    if not names:
        raise ClassNamesError(f"The class-name list{where} is empty.")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip():
            raise ClassNamesError(f"Class name #{i}{where} is {n!r}; class names must be non-empty strings.")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen and duplicates != "ignore":
            msg = f"Class name {n!r}{where} appears twice (ids {seen[n]} and {i})."
            if duplicates == "error":
                raise ClassNamesError(msg)
            warnings.warn(msg + " The two classes get identical text features.", stacklevel=user_stacklevel())
        seen.setdefault(n, i)
    if num_labels is not None and len(names) != num_labels:
        raise ClassNamesError(f"{len(names)} class names were given{where}, but its labels have {num_labels} classes.")
    return names


def format_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts, class-major: ``[t.format(c) for c in classnames for t in templates]``."""
    templates = validate_templates(templates)
    return [t.format(c) for c in classnames for t in templates]

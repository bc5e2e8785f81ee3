"""Typed errors raised by hf_cft.

Every error names the offending thing (dataset, class, template, model, tensor key) so that a user can
fix the input without reading a traceback from deep inside torch or datasets. All errors derive from
:class:`HfCftError` and from the closest built-in exception, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class HfCftError(Exception):
    """Base class of every error raised by hf_cft."""


class UnknownDatasetError(HfCftError, KeyError):
    """A dataset name is neither a registered spec, a local folder nor a usable Hub id."""

    def __init__(self, name: str, known: list[str] | None = None, hint: str = ""):
        self.name = name
        msg = f"Unknown dataset {name!r}."
        if known:
            msg += f" Known names: {', '.join(sorted(known))}."
        if hint:
            msg += f" {hint}"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return self.args[0]


class OptionError(HfCftError, ValueError):
    """A numeric or choice option is not finite, out of its range or not one of the allowed values (names it)."""


class TemplateError(HfCftError, ValueError):
    """A prompt template does not contain exactly one ``{}`` placeholder."""


class ClassNamesError(HfCftError, ValueError):
    """Class names are empty, duplicated or do not match the dataset's labels."""


class FewShotError(HfCftError, ValueError):
    """A class has fewer examples than the requested number of shots."""

    def __init__(self, class_name: str, class_id: int, available: int, requested: int, dataset: str = ""):
        self.class_name, self.class_id, self.available, self.requested = class_name, class_id, available, requested
        where = f" of dataset {dataset!r}" if dataset else ""
        super().__init__(
            f"Class {class_name!r} (id {class_id}){where} has only {available} example(s) but {requested} shots "
            "were requested. Lower k, or pass on_short='take_all' to take every example of short classes "
            "(with a warning)."
        )


class ImageDecodeError(HfCftError, ValueError):
    """An image could not be decoded."""


class DatasetFormatError(HfCftError, ValueError):
    """A dataset lacks the expected image / label columns, or is empty."""


class NotCLIPLikeError(HfCftError, TypeError):
    """A model does not expose the dual-encoder interface hf_cft needs."""


class ImageInputsError(HfCftError, ValueError):
    """The image inputs do not fit the model's family: SigLIP2 (NaFlex) needs ``pixel_attention_mask`` and
    ``spatial_shapes`` with its patches, other families take ``pixel_values`` alone (names the model and inputs)."""


class MethodNotApplicableError(HfCftError, TypeError):
    """A method cannot apply to a model family (names the method, the family and why)."""


class TokenizerError(HfCftError, ValueError):
    """A tokenizer cannot be loaded or built, or its output does not fit the model."""


class AdapterError(HfCftError, ValueError):
    """A PEFT adapter cannot be built, loaded or used as asked (names the adapter)."""


class AdapterMergeError(AdapterError):
    """``merge_and_unload`` was asked of an adapter that adds tokens or a head and has no weights to merge into."""


# --- merging and task deltas (hf_cft.merging) ---


class DeltaError(HfCftError, ValueError):
    """Task deltas do not fit together: different base models, mismatched keys or shapes (names the key)."""


class NonFiniteError(HfCftError, ValueError):
    """A tensor holds NaN or inf (names the tensor key and where it came from)."""


class BundleError(HfCftError, ValueError):
    """A saved bundle or checkpoint folder is missing files, is corrupt, or is not safetensors."""


class MergeConfigError(OptionError):
    """A merger is configured with an unknown option value (names the option and the allowed values)."""


# --- ConDU and routing (hf_cft.merging.condu, hf_cft.routing) ---


class TaskError(HfCftError, ValueError):
    """A task name is duplicated or unknown, or a task list is empty where tasks are needed."""


# --- continual driver (hf_cft.continual) ---


class ContinualError(HfCftError, ValueError):
    """A continual run cannot start or resume as asked (names the task, strategy or checkpoint)."""


# --- PAM (hf_cft.merging.pam) ---


class AlignmentError(HfCftError, ValueError):
    """PAM's global/task adapters cannot be aligned or merged as configured (names the adapter)."""


# --- Hub and model cards (hf_cft.hub, hf_cft.cli) ---


class MissingCheckpointError(HfCftError, FileNotFoundError):
    """A model folder a recipe or config names does not exist (names it, and the command that builds it when it is
    one of the project's pretrained CLIPs)."""


class CardError(HfCftError, ValueError):
    """A model card cannot be rendered or its metadata is invalid (names the field or the template)."""


class HubError(HfCftError, ValueError):
    """An artefact cannot be pushed to or pulled from the Hub as asked (names the file, folder or repo)."""


class UnsupportedArchitectureError(HfCftError, ValueError):
    """A checkpoint's architecture has no equivalent transformers model in the converter asked for (names the
    architecture and the option that selects it, e.g. an open_clip ConvNeXt tower or CoCa)."""


class CLIError(HfCftError, ValueError):
    """An option or input file of the ``hf-cft`` command line is invalid (names the option or the file)."""

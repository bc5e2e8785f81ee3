"""Where the Hub methods of the merging artefacts went.

The Hub layer (:mod:`hf_cft.hub`) depends on the artefacts of :mod:`hf_cft.merging`, never the other way round: a
:class:`~hf_cft.merging.DeltaFusionMerger` or :class:`~hf_cft.merging.PAMState` is pushed with
``hf_cft.hub.push_to_hub(artefact, repo_id, ...)`` and its card built with ``hf_cft.hub.condu_card`` /
``hf_cft.hub.pam_card``. :class:`MovedToHubMixin` turns the old method names into an ``AttributeError`` that says
so, instead of a bare "has no attribute".
"""

from __future__ import annotations


class MovedToHubMixin:
    """``obj.push_to_hub`` / ``obj.model_card`` raise an ``AttributeError`` naming the :mod:`hf_cft.hub` function."""

    #: old method name -> the call that replaces it (``{cls}``: the class name).
    _MOVED_TO_HUB: dict[str, str] = {"push_to_hub": "hf_cft.hub.push_to_hub(artefact, repo_id, card_kwargs=...)"}

    def __getattr__(self, name: str):
        hint = type(self)._MOVED_TO_HUB.get(name)
        if hint is not None:
            raise AttributeError(
                f"{type(self).__name__}.{name} is gone: the Hub layer depends on the artefacts, not the other way "
                f"round. Call {hint}."
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

"""ConDU's semantic router: prototypes computed with θ⁰, per-sample top-K task selection, and fusion of the
selected experts' logits (docs/methods/condu.md §7).

- :func:`compute_prototypes` — per class ``P_k = normalise((image_k + text_k)/2)``: ``image_k`` is the mean of
  θ⁰'s normalised image features of the class's training images, ``text_k`` the mean of θ⁰'s normalised text
  features over all templates; a class without images uses ``normalise(text_k)``.
- :class:`SemanticRouter` — ``route``: ``s^i(x) = max_k cos(z, P^i_k)`` with ``z`` the normalised θ⁰ image
  feature, top-K tasks per sample (K clamped to the number of tasks). ``logits``: every voter (the K selected
  experts, plus θ⁰ when ``include_zero_shot``) gives ``100·cos(f_img(x; θ_m), W_m)`` with ``W_m`` the
  template-ensembled head of the **test dataset's** classes from voter m's own text tower; voters are averaged
  with ``weighting`` ∈ {uniform, similarity, softmax}, θ⁰ keeping weight 1/(K+1).

Cost (§7): one θ⁰ image pass per batch serves both the routing and θ⁰'s vote. The selected experts are grouped:
each distinct expert is built once per batch as θ⁰ + λ^i M^i⊙u (formed on the model's device, run with
``torch.func.functional_call``: no model copy) and runs one forward over exactly the samples that chose it, whose
logits are scattered back into their rows; an expert whose trigger collapsed (λ = 0) is θ⁰ itself and reuses θ⁰'s
pass and head instead of a build and a forward. Text heads are cached per (voter, class names, templates) until the
merger's next session; ``cache_experts=n`` also keeps the n most recently built experts' weights across batches
(default 0: never more than one expert's weights at a time). :attr:`SemanticRouter.stats` counts the expert builds
and forward passes, so a benchmark can report "K+1 experts run, not all T".

Example::

    from hf_cft.merging import SemanticRouter, compute_prototypes

    protos = compute_prototypes(clip, tokenizer, train_loader, classnames, templates)   # after training task t
    merger.add_task(delta, "dtd", prototypes=protos, classnames=classnames, templates=templates, dataset="dtd")
    router = SemanticRouter(merger, clip, tokenizer, top_k=4)
    logits = router.logits(pixel_values, classnames=test_classnames, templates=test_templates)  # task-agnostic
    logits = router.logits(pixel_values, task="dtd")                                             # task id known
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hf_cft.data.templates import DEFAULT_TEMPLATES, validate_classnames, validate_templates
from hf_cft.errors import ClassNamesError, DeltaError, MergeConfigError, NonFiniteError, TaskError
from hf_cft.merging.condu import DeltaFusionMerger
from hf_cft.merging.deltas import FunctionalExpert, _named_tensors, base_fingerprint
from hf_cft.models.clip import check_clip_like, image_features, logit_scale, model_device
from hf_cft.models.zeroshot import build_zeroshot_classifier, encode_images
from hf_cft.utils import user_stacklevel

__all__ = ["RouterStats", "Routing", "SemanticRouter", "compute_prototypes"]

WEIGHTINGS = ("uniform", "similarity", "softmax")
ZERO_SHOT = "<zero-shot>"


@torch.no_grad()
def compute_prototypes(
    model: nn.Module,
    tokenizer,
    data: tuple[torch.Tensor, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]] | None,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """A task's prototypes ``[C, d]`` (fp32, CPU, unit rows) computed with θ⁰ (condu.md §7).

    ``model`` must be θ⁰ (the pretrained CLIP, not the fine-tuned expert). ``data`` is the task's training data
    seen through the train transform, once: an iterable of batches with ``pixel_values`` and ``labels`` (e.g. a
    ``DataLoader`` with :class:`~hf_cft.data.ImageClassificationCollator`), or precomputed
    ``(image_features [N, d], labels [N])``, or ``None`` for text-only prototypes. Few-shot runs must pass only
    the shots trained on (condu.md §9). Classes without images get ``normalise(text_k)``.
    """
    check_clip_like(model)
    classnames = validate_classnames(classnames)
    templates = validate_templates(templates)
    # text_k: mean over templates of normalised features (one template at a time, so no renormalisation between).
    text = sum(build_zeroshot_classifier(model, tokenizer, classnames, [t], device=device).cpu() for t in templates)
    text = text / len(templates)
    protos = F.normalize(text, dim=-1)
    if data is None:
        return protos.contiguous()
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        feats, labels = data
        feats = F.normalize(feats.detach().to("cpu", torch.float32), dim=-1)
    else:
        feats, labels = encode_images(model, data, device=device, progress=progress, desc="prototype features")
    if labels is None:
        raise ClassNamesError("compute_prototypes needs labels with the image features (batches without 'labels').")
    labels = labels.detach().cpu().long().reshape(-1)
    if labels.numel() != feats.shape[0]:
        raise ClassNamesError(f"{feats.shape[0]} image features but {labels.numel()} labels.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classnames)):
        bad = int(labels.max()) if int(labels.max()) >= len(classnames) else int(labels.min())
        raise ClassNamesError(f"Label {bad} is outside the {len(classnames)} class names.")
    if not bool(torch.isfinite(feats).all()):
        raise NonFiniteError("Image features for the prototypes hold NaN/inf values.")
    sums = torch.zeros(len(classnames), feats.shape[1]).index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=len(classnames)).to(torch.float32)
    image = sums / counts.clamp_min(1).unsqueeze(1)
    has_images = (counts > 0).unsqueeze(1)
    return torch.where(has_images, F.normalize((image + text) / 2, dim=-1), protos).contiguous()


@dataclass
class Routing:
    """Routing of a batch: per sample the top-K task ``indices`` ``[N, K]`` (best first) and their ``scores``
    ``s^i(x) = max_k cos(z, P^i_k)``; ``all_scores`` ``[N, T]`` for every stored task."""

    indices: torch.Tensor
    scores: torch.Tensor
    all_scores: torch.Tensor
    task_names: list[str]

    def names(self, sample: int) -> list[str]:
        return [self.task_names[int(i)] for i in self.indices[sample]]


@dataclass
class RouterStats:
    """Work done by a :class:`SemanticRouter` (reset with :meth:`reset`).

    ``expert_builds``: experts materialised (θ⁰ + λM⊙u parameters; ``cache_experts`` hits are not builds);
    ``expert_image_passes``: image-tower runs of experts (one per selected expert per batch) on ``expert_samples``
    samples in all; ``zero_shot_passes``: θ⁰ image-tower runs (one per batch: routing and the θ⁰ vote share it);
    ``shared_zero_shot``: votes of collapsed experts (λ = 0, i.e. θ⁰) served by that θ⁰ pass, with no build and
    no pass of their own; ``text_heads_built``: text heads computed (cache misses); ``experts_per_batch``:
    distinct experts selected per batch.
    """

    batches: int = 0
    zero_shot_passes: int = 0
    expert_builds: int = 0
    expert_image_passes: int = 0
    expert_samples: int = 0
    shared_zero_shot: int = 0
    text_heads_built: int = 0
    experts_per_batch: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.__init__()


class SemanticRouter:
    """Semantic aggregation over a :class:`DeltaFusionMerger`'s experts (condu.md §7).

    ``base_model`` is θ⁰ (the model the merger's deltas were taken from; with ``lora_merge="factors"``, the
    ``PeftModel`` holding the initial adapter). ``top_k`` experts per sample (paper and released code: 4),
    ``weighting``: ``"uniform"`` (released default), ``"similarity"`` (∝ s^i, negative scores clamped to 0) or
    ``"softmax"`` (softmax(s^i/``temperature``)); with ``include_zero_shot`` θ⁰ votes with weight 1/(K+1) and
    the experts share K/(K+1). ``logit_scale``: 100 as in the spec; ``None`` uses θ⁰'s ``exp(logit_scale)``.
    ``cache_experts``: how many built experts' weights to keep across batches (least recently used dropped
    first; each costs one copy of the delta keys' tensors on the model's device). 0 (default) rebuilds them every
    batch, so memory never holds more than one expert; ``cache_experts=len(merger)`` builds each expert once per
    session, as the released code's "all T experts on the GPU".

    Modes of :meth:`logits`: ``task=name`` — task id known and learned: the single expert θ̃^i with the given
    (default: the task's own) head; ``task=None`` — routing (task-agnostic, or known but not yet learned); no
    task learned yet — θ⁰ alone.
    """

    def __init__(
        self,
        merger: DeltaFusionMerger,
        base_model: nn.Module,
        tokenizer,
        top_k: int = 4,
        weighting: str = "uniform",
        temperature: float = 0.01,
        include_zero_shot: bool = True,
        logit_scale: float | None = 100.0,
        cache_experts: int = 0,
    ):
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise MergeConfigError(f"top_k must be a positive int, got {top_k!r}.")
        if not isinstance(cache_experts, int) or isinstance(cache_experts, bool) or cache_experts < 0:
            raise MergeConfigError(f"cache_experts must be an int >= 0, got {cache_experts!r}.")
        if weighting not in WEIGHTINGS:
            raise MergeConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
        if not temperature > 0:
            raise MergeConfigError(f"temperature must be > 0, got {temperature!r}.")
        check_clip_like(base_model)
        self.merger = merger
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.weighting = weighting
        self.temperature = float(temperature)
        self.include_zero_shot = include_zero_shot
        self.logit_scale = logit_scale
        self.cache_experts = cache_experts
        self._experts: OrderedDict[tuple[str, str], FunctionalExpert] = OrderedDict()
        self.stats = RouterStats()
        self.last_routing: Routing | None = None
        self._fingerprint = base_fingerprint(base_model)
        self._check_base()
        self._heads: dict[tuple[str, str], torch.Tensor] = {}
        self._version = merger.version
        self._protos: tuple[torch.Tensor, list[int]] | None = None
        self._warned: set[tuple[str, object]] = set()

    # --------------------------------------------------------------------------------------------- plumbing

    def _check_base(self) -> None:
        fp = self.merger.base_fingerprint
        if fp is not None and fp != self._fingerprint:
            raise DeltaError(
                f"The router's base model (fingerprint {self._fingerprint}) is not the model the merger's deltas "
                f"were taken from (fingerprint {fp})."
            )

    def _sync(self) -> None:
        """Drop expert heads and prototypes cached before the merger's last session (θ⁰ heads stay valid)."""
        if self.merger.version != self._version:
            self._check_base()
            self._heads = {k: v for k, v in self._heads.items() if k[0] == ZERO_SHOT}
            self._experts.clear()
            self._protos = None
            self._version = self.merger.version

    def _warn_once(self, key: tuple[str, object], msg: str) -> None:
        """Warn once per ``key`` for this router, at the user's line that called into hf_cft."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, UserWarning, stacklevel=user_stacklevel())

    @property
    def _scale(self) -> float:
        return float(self.logit_scale) if self.logit_scale is not None else float(logit_scale(self.base_model))

    def _resolve(self, classnames, templates, task: str | None) -> tuple[list[str], list[str]]:
        if task is not None:
            rec = self.merger.record(task)
            classnames = classnames if classnames is not None else rec.classnames
            templates = templates if templates is not None else rec.templates
        if classnames is None:
            raise ClassNamesError("logits() needs the test dataset's class names (or task= of a stored task).")
        return validate_classnames(classnames), validate_templates(
            templates if templates is not None else DEFAULT_TEMPLATES
        )

    def expert(self, name: str) -> FunctionalExpert:
        """Task ``name``'s expert θ⁰ + λ M⊙u: its weights formed key by key on θ⁰'s device into new tensors (θ⁰
        untouched), or taken from the ``cache_experts`` cache."""
        self.merger.task_index(name)
        self._sync()
        key = (name, str(model_device(self.base_model)))
        expert = self._experts.get(key)
        if expert is not None:
            self._experts.move_to_end(key)
            return expert
        self.stats.expert_builds += 1
        weights = self.merger.iter_expert_weights(name, _named_tensors(self.base_model))
        expert = FunctionalExpert.from_weights(self.base_model, weights)
        if self.cache_experts:
            self._experts[key] = expert
            while len(self._experts) > self.cache_experts:
                self._experts.popitem(last=False)
        return expert

    def _collapsed(self) -> set[str]:
        """Stored tasks whose trigger collapsed (λ = 0): their expert θ⁰ + 0·M⊙u is θ⁰ itself."""
        return {r.name for r in self.merger.tasks if r.lam == 0.0}

    def _head(self, voter: str, expert: FunctionalExpert | None, classnames: list[str], templates: list[str]):
        digest = hashlib.blake2b(repr((classnames, templates)).encode(), digest_size=12).hexdigest()
        key = (voter, digest)
        head = self._heads.get(key)
        if head is None:
            if expert is None:
                head = build_zeroshot_classifier(self.base_model, self.tokenizer, classnames, templates)
            else:
                head = expert.run(build_zeroshot_classifier, self.tokenizer, classnames, templates)
            self._heads[key] = head = head.detach()
            self.stats.text_heads_built += 1
        return head

    def _prototype_matrix(self) -> tuple[torch.Tensor, list[int]]:
        if self._protos is None:
            mats = []
            for rec in self.merger.tasks:
                p = self.merger.prototypes(rec.name)
                if p is None:
                    if rec.classnames is None:
                        raise TaskError(
                            f"Task {rec.name!r} has neither prototypes nor class names; it cannot be routed to."
                        )
                    self._warn_once(
                        ("protos", rec.name),
                        f"Task {rec.name!r} has no prototypes: routing to it with text-only θ⁰ prototypes.",
                    )
                    p = compute_prototypes(
                        self.base_model, self.tokenizer, None, rec.classnames, rec.templates or DEFAULT_TEMPLATES
                    )
                mats.append(p)
            dims = {m.shape[1] for m in mats}
            if len(dims) > 1:
                raise TaskError(f"Prototypes of the stored tasks have different widths {sorted(dims)}.")
            self._protos = (torch.cat(mats).to(model_device(self.base_model)), [m.shape[0] for m in mats])
        return self._protos

    # ---------------------------------------------------------------------------------------------- routing

    def route(self, image_feats: torch.Tensor) -> Routing:
        """Top-K tasks per sample from θ⁰ image features ``[N, d]`` (normalised here; condu.md §7 "Routing").

        Raises :class:`TaskError` when the merger holds no task; warns once when ``top_k`` exceeds the number of
        tasks (K is clamped: "keep the top-K tasks, or all, if fewer").
        """
        self._sync()
        names = self.merger.task_names
        if not names:
            raise TaskError("The router has no task to route to: add a task to the merger first.")
        k = min(self.top_k, len(names))
        if k < self.top_k:
            self._warn_once(
                ("k", len(names)),
                f"top_k={self.top_k} but only {len(names)} task(s) are stored: using K={k}.",
            )
        protos, sizes = self._prototype_matrix()
        with torch.no_grad():
            z = F.normalize(image_feats.to(protos.device, torch.float32), dim=-1)
            sims = z @ protos.t()
            all_scores = torch.stack([s.max(dim=1).values for s in sims.split(sizes, dim=1)], dim=1)
            scores, indices = all_scores.topk(k, dim=1)
        return Routing(indices=indices, scores=scores, all_scores=all_scores, task_names=names)

    def voter_weights(self, routing: Routing) -> tuple[float, torch.Tensor]:
        """(θ⁰ weight, expert weights ``[N, K]``): uniform, ∝ similarity, or softmax(s/τ); θ⁰ keeps 1/(K+1)."""
        k = routing.indices.shape[1]
        w0 = 1.0 / (k + 1) if self.include_zero_shot else 0.0
        s = routing.scores.to(torch.float32)
        if self.weighting == "uniform":
            w = torch.full_like(s, 1.0 / k)
        elif self.weighting == "similarity":
            pos = s.clamp_min(0.0)  # a negative cosine never votes against its expert
            total = pos.sum(dim=1, keepdim=True)
            w = torch.where(total > 0, pos / total.clamp_min(torch.finfo(torch.float32).tiny), 1.0 / k)
        else:
            w = torch.softmax(s / self.temperature, dim=1)
        return w0, w * (1.0 - w0)

    # ---------------------------------------------------------------------------------------------- logits

    @torch.no_grad()
    def logits(
        self,
        pixel_values: torch.Tensor,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        task: str | None = None,
        **image_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Fused logits ``[N, C]`` over the test dataset's classes (fp32, on the model's device).

        ``task``: name of a stored task whose id is known — its single expert with the dataset's head
        (``classnames``/``templates`` default to the task's own). Otherwise routing (top-K experts + θ⁰); with no
        task stored, θ⁰ alone.
        """
        self._sync()
        classnames, templates = self._resolve(classnames, templates, task)
        device = model_device(self.base_model)
        px = pixel_values.to(device)
        extra = {k: v.to(device) for k, v in image_inputs.items() if v is not None}
        scale = self._scale
        self.stats.batches += 1
        if task is not None:
            self.stats.experts_per_batch.append(1)
            if task in self._collapsed():  # λ = 0: the expert is θ⁰
                self.merger.task_index(task)
                self.stats.zero_shot_passes += 1
                self.stats.shared_zero_shot += 1
                feats = image_features(self.base_model, px, **extra).float()
                return scale * feats @ self._head(ZERO_SHOT, None, classnames, templates).t()
            expert = self.expert(task)
            head = self._head(task, expert, classnames, templates)
            feats = expert.run(image_features, px, **extra).float()
            self.stats.expert_image_passes += 1
            self.stats.expert_samples += px.shape[0]
            return scale * feats @ head.t()

        z0 = image_features(self.base_model, px, **extra).float()
        self.stats.zero_shot_passes += 1
        head0 = self._head(ZERO_SHOT, None, classnames, templates)
        if not self.merger.task_names:
            self.stats.experts_per_batch.append(0)
            return scale * z0 @ head0.t()
        routing = self.route(z0)
        self.last_routing = routing
        w0, w = self.voter_weights(routing)
        w = w.to(device)
        out = (w0 * scale) * (z0 @ head0.t()) if w0 > 0 else z0.new_zeros(px.shape[0], len(classnames))
        chosen = routing.indices.to(device)
        used = torch.unique(chosen).tolist()
        collapsed = self._collapsed()
        if self._experts:  # experts still cached first, before building others can evict them
            dev_key = str(model_device(self.base_model))
            used.sort(key=lambda e: (routing.task_names[e], dev_key) not in self._experts)
        for e in used:  # grouped by expert: each distinct expert once, over exactly the samples that chose it
            sel = chosen == e
            rows = sel.any(dim=1)
            weight = (w * sel).sum(dim=1)[rows]
            name = routing.task_names[e]
            if name in collapsed:  # λ = 0: the expert is θ⁰, whose pass and head this batch already has
                feats, head = z0[rows], head0
                self.stats.shared_zero_shot += 1
            else:
                expert = self.expert(name)
                head = self._head(name, expert, classnames, templates)
                feats = expert.run(image_features, px[rows], **{k: v[rows] for k, v in extra.items()}).float()
                self.stats.expert_image_passes += 1
                self.stats.expert_samples += int(rows.sum())
                del expert
            out[rows] += (weight * scale).unsqueeze(1) * (feats @ head.t())  # scattered back into its rows
        self.stats.experts_per_batch.append(len(used))
        return out

    def predict(
        self,
        pixel_values: torch.Tensor,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        task: str | None = None,
        **image_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Arg-max class ids ``[N]`` of :meth:`logits`."""
        return self.logits(pixel_values, classnames, templates, task=task, **image_inputs).argmax(dim=-1)

"""MergeTune's loss terms as pure functions (``docs/methods/mergetune.md`` §3, §4, §6), shared by the trainer,
the plots and the tests. Classifier space: prompts (normalised class text features ``T [C, d]``) and linear
heads (``W [C, d]``, ``b [C]``); weight space: the dense LoRA update ``ΔW = s·B·A`` and its squared norm (the
weight-space families themselves are in :mod:`hf_cft.trainers.mergetune_weightspace`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def alpha_grid(num: int, kind: str = "midpoint", generator: torch.Generator | None = None) -> torch.Tensor:
    """The α points of the path loss.

    - ``midpoint``: α_k = (k − ½)/N, the midpoint rule for E_{α~U[0,1)} (never α = 1, which would duplicate L2(w));
    - ``official``: ``np.arange(0.1, 1.01, 1/N)``, exactly the released code's grid: ⌈0.91·N⌉ points 0.1 + k/N,
      so for N = 5 the midpoints, N = 10 includes α = 1, N = 11, 21, 22 … a point in (1.0, 1.01), N = 1 gives {0.1};
    - ``random``: N draws from U[0, 1) per call.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if kind == "midpoint":
        return (torch.arange(1, num + 1, dtype=torch.float64) - 0.5) / num
    if kind == "official":
        import numpy as np

        return torch.from_numpy(np.arange(0.1, 1.01, 1.0 / num)).to(torch.float64)
    if kind == "random":
        return torch.rand(num, generator=generator, dtype=torch.float64)
    raise ValueError(f"unknown alpha grid {kind!r}")


def prompt_logits(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return scale * image @ text.t()


def interpolate_text(t_from: torch.Tensor, t_to: torch.Tensor, alpha: float) -> torch.Tensor:
    """``normalise(t_from + α·(t_to − t_from))``: a point on the path between two (normalised) class-feature
    matrices, interpolated unnormalised and then renormalised (MergeTune §5, prompts)."""
    return F.normalize(t_from + alpha * (t_to - t_from), dim=-1)


def path_loss_prompts(image, text_w, text_ft, labels, scale, alphas, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1/N)·Σ_k CE(s·f·normalise(T2 + α_k(T(w) − T2))ᵀ, y): one interpolation and one matmul per α, image
    features shared by all α. Pass unit features for the library's path, the raw text-encoder outputs for the
    official one (``path_features="raw"``: interpolate, then normalise). ``label_smoothing`` as the task term's."""
    losses = [
        F.cross_entropy(
            prompt_logits(image, interpolate_text(text_ft, text_w, float(a)), scale),
            labels,
            label_smoothing=label_smoothing,
        )
        for a in alphas
    ]
    return torch.stack(losses).mean()


def path_loss_head(image, w, b, w_ft, b_ft, labels, alphas, label_smoothing: float = 0.0) -> torch.Tensor:
    """The same for a linear head: W_α = W2 + α(W − W2), b_α likewise."""
    losses = []
    for a in alphas:
        wa = w_ft + float(a) * (w - w_ft)
        ba = None if b is None else b_ft + float(a) * (b - b_ft)
        losses.append(F.cross_entropy(F.linear(image, wa, ba), labels, label_smoothing=label_smoothing))
    return torch.stack(losses).mean()


def cosine_anchor(text_w: torch.Tensor, text_zs: torch.Tensor) -> torch.Tensor:
    """1 − mean_c cos(T_c(w), T_c(ŵ1)) = ½·mean_c‖T̂_c(w) − T̂_c(ŵ1)‖² (the official prompt form)."""
    return 1.0 - F.cosine_similarity(text_w, text_zs, dim=-1).mean()


def sq_l2_anchor(params: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor:
    """Σ_j (w_j − ŵ1_j)² (the paper's isotropic surrogate in parameter space)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


def fisher_anchor(
    params: list[torch.Tensor], anchors: list[torch.Tensor], fishers: list[torch.Tensor], normalizer: float = 1.0
) -> torch.Tensor:
    """Σ_j F_j (w_j − ŵ1_j)² / normalizer (diagonal-Fisher surrogate, §3.2)."""
    return sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchors, fishers)) / normalizer


def head_anchor(
    params: list[torch.Tensor],
    anchors: list[torch.Tensor],
    kind: str = "sq_l2",
    fishers: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The linear-head family's anchor D(w, ŵ1) (§3.1 / §3.2), **the** one definition used by
    :class:`~hf_cft.trainers.MergeTuneTrainer` and :func:`~hf_cft.trainers.feature_training.train_head_on_features`:
    ``Σ_j (w_j − ŵ1_j)²`` (``sq_l2``) or ``Σ_j F_j (w_j − ŵ1_j)²`` (``fisher``) over the head's entries as it
    computes logits, i.e. W = s·V for ``logits = x̂·Wᵀ (+ b)`` (ŵ1 = s·T_zs, 0). Scale: with unit-norm rows
    V, V_zs this is 2·C·s² times the prompt family's cosine anchor ``1 − mean cos`` (= ½·mean‖V̂ − V̂_zs‖²), so
    λ_head = λ_prompt / (2·C·s²) gives the same pull (what the base-to-novel benchmark does)."""
    if kind == "sq_l2":
        return sq_l2_anchor(params, anchors)
    if kind == "fisher":
        if fishers is None:
            raise ValueError("the Fisher head anchor needs the Fisher tensors")
        return fisher_anchor(params, anchors, fishers)
    raise ValueError(f"unknown head anchor {kind!r} (sq_l2 or fisher)")


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense LoRA update ``ΔW = s·B·A`` (``A [r, in]``, ``B [out, r]``), in fp32 (§5, LoRA row)."""
    return scaling * (b.float() @ a.float())


def lora_sq_norm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``‖s·B·A‖²_F = s²·Σ(BᵀB ⊙ AAᵀ)`` from r×r Gram matrices: the isotropic LoRA anchor ‖ΔW − 0‖² (§3.1)
    without forming the out×in matrix."""
    a, b = a.float(), b.float()
    return scaling**2 * ((b.t() @ b) * (a @ a.t())).sum()


@torch.no_grad()
def classifier_fisher(
    image: torch.Tensor,
    logits: torch.Tensor,
    scale: float = 1.0,
    labels: str = "sample",
    generator: torch.Generator | None = None,
    with_bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Diagonal Fisher of a linear classifier ``z = scale·f·Wᵀ (+ b)`` at the zero-shot solution, from its
    predictive distribution ``p = softmax(z)`` on (unlabelled) images ``f`` — exact per-example gradients in
    closed form: ``∂ log p_ŷ / ∂W_c = scale·(1[c = ŷ] − p_c)·f``.

    ``labels``: ``sample`` (one ŷ ~ p per image), ``argmax`` (ŷ = argmax p) or ``expected`` (sum over ŷ
    weighted by p, giving ``scale²·E[p_c(1 − p_c)·f_k²]``). Returns ``(F_W [C, d], F_b [C] or None)``, unnormalised.
    """
    p = logits.float().softmax(-1)  # [n, C]
    f2 = image.float() ** 2  # [n, d]
    if labels == "expected":
        g2 = p * (1 - p)  # E_ŷ (1[c=ŷ] − p_c)²
    else:
        if labels == "sample":
            y = torch.multinomial(p, 1, generator=generator).squeeze(1)
        elif labels == "argmax":
            y = p.argmax(-1)
        else:
            raise ValueError(f"unknown Fisher labels {labels!r}")
        g2 = (F.one_hot(y, p.shape[1]).float() - p) ** 2
    fw = scale**2 * (g2.t() @ f2) / image.shape[0]
    fb = g2.mean(0) if with_bias else None
    return fw, fb


def normalize_fisher(fishers: list[torch.Tensor], damping: float) -> list[torch.Tensor]:
    """F ← F / mean(F) + damping (mean over all entries of all tensors), so that F ≡ 1 recovers the isotropic
    form and λ ranges carry over."""
    total = sum(f.sum() for f in fishers)
    count = sum(f.numel() for f in fishers)
    mean = total / count
    if not torch.isfinite(mean) or mean <= 0:
        raise ValueError("the estimated Fisher is zero or not finite (degenerate zero-shot predictions?)")
    return [f / mean + damping for f in fishers]

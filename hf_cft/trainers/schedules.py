"""Learning-rate schedules that the Trainer's ``lr_scheduler_type`` does not offer."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def constant_warmup_cosine_lr(epoch: int, base_lr: float, num_epochs: int, warmup_epochs: int, warmup_lr: float):
    """Learning rate of ``epoch`` under CoOp/Dassl's ``ConstantWarmupScheduler`` around ``CosineAnnealingLR``
    stepped once per epoch: ``warmup_lr`` for the first ``warmup_epochs`` epochs, then
    ``base_lr·½(1 + cos(π·(epoch − warmup_epochs)/num_epochs))`` (the cosine's period is all epochs, not the
    epochs after warm-up, and it starts from ``base_lr`` at the first epoch after warm-up)."""
    if epoch < warmup_epochs:
        return warmup_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / num_epochs))


def get_constant_warmup_cosine_schedule(
    optimizer, steps_per_epoch: int, num_epochs: int, warmup_epochs: int, warmup_lr: float
) -> LambdaLR:
    """A per-optimiser-step ``LambdaLR`` giving :func:`constant_warmup_cosine_lr` of the step's epoch (constant
    within an epoch). Each parameter group keeps its own base learning rate."""
    if steps_per_epoch < 1 or num_epochs < 1:
        raise ValueError(f"steps_per_epoch and num_epochs must be >= 1, got {steps_per_epoch}, {num_epochs}")

    def factor(base_lr: float):
        def f(step: int) -> float:
            lr = constant_warmup_cosine_lr(step // steps_per_epoch, base_lr, num_epochs, warmup_epochs, warmup_lr)
            return lr / base_lr if base_lr else 0.0

        return f

    return LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups])

"""Steering a run: learning-rate schedules, the best evaluation so far and early stopping, and the defaults
that fit a dataset's size (batch size, evaluation cadence) with one-line notes when a plan looks wrong.

Pure functions and small classes: the training worker calls them, tests check them against the formulas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ScheduleConfig, TrainConfig

# The batch-size rule (README "Defaults that fit the data"): at least STEPS_PER_EPOCH updates per epoch,
# a power of two between MIN_BATCH and MAX_BATCH; EVALS_PER_RUN evaluations when eval_every is not set.
# Measured in bench/steer_quality.py: on 100k-200k rows, one epoch, smaller batches win (more updates).
STEPS_PER_EPOCH = 1000
MIN_BATCH, MAX_BATCH = 32, 4096
EVALS_PER_RUN = 10
SHORT_RUN_STEPS = 300  # a one-epoch plan with fewer updates than this gets a note
LARGE_EVAL_ROWS = 1_000_000  # periodic evaluations over more rows than this get a note


def lr_factor(schedule: ScheduleConfig, step: int, total_steps: int) -> float:
    """The multiplier of the base lr for the update that takes the run from `step` to `step + 1`.

    Warmup: (step + 1) / warmup_steps for step < warmup_steps. After it, with progress p = (step - warmup) /
    (total_steps - warmup) in [0, 1]: linear 1 - (1 - m) p; cosine m + (1 - m)(1 + cos(pi p)) / 2, where
    m = min_lr_ratio; step gamma ** ((step - warmup) // step_every); none 1.
    """
    warmup = schedule.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    after = step - warmup
    progress = min(1.0, after / max(1, total_steps - warmup))
    floor = schedule.min_lr_ratio
    if schedule.decay == "linear":
        return 1.0 - (1.0 - floor) * progress
    if schedule.decay == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule.decay == "step":
        return schedule.gamma ** (after // schedule.step_every)
    return 1.0


@dataclass
class BestTracker:
    """The best eval AUC so far and, with `patience`, when to stop: after `patience` evaluations in a row
    that do not beat the best by more than `min_delta`."""

    patience: int | None = None
    min_delta: float = 0.0
    best_auc: float = -math.inf
    best_step: int | None = None
    evals_without_gain: int = 0

    def update(self, step: int, auc: float) -> bool:
        """Record one evaluation; True when it is the new best."""
        if math.isnan(auc):
            return False
        if self.best_step is None or auc > self.best_auc + self.min_delta:
            self.best_auc, self.best_step, self.evals_without_gain = auc, step, 0
            return True
        self.evals_without_gain += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_gain >= self.patience

    def stop_reason(self, step: int) -> str:
        return (f"early stopping at step {step}: eval AUC has not beaten {self.best_auc:.4f} (step {self.best_step}) "
                f"by more than {self.min_delta} for {self.patience} evaluations")


def default_batch_size(train_rows: int, worker_counts: range) -> int:
    """The largest power of two <= train_rows / STEPS_PER_EPOCH, within [MIN_BATCH, MAX_BATCH], rounded down to
    a multiple of every worker count the job may run with."""
    target = max(1, train_rows // STEPS_PER_EPOCH)
    batch = min(MAX_BATCH, max(MIN_BATCH, 2 ** int(math.log2(target))))
    multiple = math.lcm(*worker_counts)
    return max(multiple, batch // multiple * multiple)


def default_eval_every(total_steps: int) -> int:
    return max(1, total_steps // EVALS_PER_RUN)


def fit_to_data(config: TrainConfig, train_rows: int) -> TrainConfig:
    """The config with batch_size and eval_every filled in where the user left them unset."""
    batch_size = config.batch_size or default_batch_size(train_rows, range(config.min_workers, config.max_workers + 1))
    total_steps = config.steps or max(1, train_rows // batch_size)
    eval_every = config.eval_every if config.eval_every is not None else default_eval_every(total_steps)
    return config.model_copy(update={"batch_size": batch_size, "eval_every": eval_every})


def plan_notes(config: TrainConfig, train_rows: int, eval_split_rows: int) -> list[str]:
    """One line per thing in a (fitted) plan that is likely to give a worse model than it could."""
    notes = []
    steps_per_epoch = max(1, train_rows // config.batch_size)
    total_steps = config.steps or steps_per_epoch
    epochs = total_steps / steps_per_epoch
    if epochs <= 1.0 and total_steps < SHORT_RUN_STEPS and config.batch_size > MIN_BATCH:
        smaller = default_batch_size(train_rows, range(config.min_workers, config.max_workers + 1))
        if smaller < config.batch_size:
            notes.append(f"short run: one epoch of {train_rows} rows is only {steps_per_epoch} steps of batch "
                         f"{config.batch_size}; batch_size={smaller} gives {train_rows // smaller} updates per epoch")
    if epochs > 1.5 and not config.eval_every:
        notes.append(f"long run: {epochs:.1f} epochs with no evaluation until the end; CTR models often overfit in "
                     f"their second epoch: set eval_every={default_eval_every(total_steps)} with keep_best=true or "
                     f"early_stopping.patience=2")
    evaluated = min(eval_split_rows, config.eval_rows or eval_split_rows)
    if config.eval_every and evaluated > LARGE_EVAL_ROWS:
        notes.append(f"each evaluation reads {evaluated} eval rows; eval_rows={LARGE_EVAL_ROWS} measures AUC to "
                     f"about +-0.001 at a fraction of the cost")
    return notes

"""Steering a run: learning-rate schedules, the best evaluation so far and early stopping, and the defaults
that fit a dataset (batch size, evaluation cadence, sparse lr) with one-line notes when a plan looks wrong.

Pure functions and small classes: the training worker calls them, tests check them against the formulas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from terarec.models.registry import MODELS

from .config import ScheduleConfig, TrainConfig
from .cost_model import KeyDistribution

# The batch-size rule (README "Defaults that fit the data"): at least STEPS_PER_EPOCH updates per epoch,
# a power of two between MIN_BATCH and MAX_BATCH; EVALS_PER_RUN evaluations when eval_every is not set.
# Measured in bench/steer_quality.py --parts batch (one epoch on 100k and 200k rows, two seeds): DeepFM is best at
# 32-128, DLRM at 128-256; this rule's 64 and 128 are within 0.004 of each model's best on the two seeds' mean.
STEPS_PER_EPOCH = 1000
MIN_BATCH, MAX_BATCH = 32, 4096
EVALS_PER_RUN = 10
SHORT_RUN_STEPS = 300  # a one-epoch plan with fewer updates than this gets a note
LARGE_EVAL_ROWS = 1_000_000  # periodic evaluations over more rows than this get a note
# The sparse-lr rule (README "Defaults that fit the data"), for models whose ModelSpec has sparse_lr_rare: Adagrad
# moves a row seen once by about lr, so the best lr grows with how often a training key recurs. Measured in
# bench/steer_quality.py --parts sparse_lr: DLRM's best is 0.05 on synth data where a key recurs 150 times
# (scale 1e-3) and 0.2 where it recurs 1374 and 2747 times (1e-4); in between 0.1 at 461 (3e-4) and 0.13 at 693
# (1e-3, 1M rows), as the rule gives. At or below RARE_RECURRENCE the model's
# sparse_lr_rare, at or above FREQUENT_RECURRENCE its sparse_lr, in between interpolated in log-log.
RARE_RECURRENCE, FREQUENT_RECURRENCE = 150.0, 1300.0


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


@dataclass(frozen=True)
class KeyRecurrence:
    """How often a training key recurs on average: lookups (train rows x features) per distinct key, pooled
    over features (so the many-ID features, where the rare keys are, weigh most)."""

    lookups: int
    distinct_keys: float
    source: str  # where distinct_keys comes from, for the note

    @property
    def times(self) -> float:
        return self.lookups / max(1.0, self.distinct_keys)


def key_recurrence(meta: dict, train_rows: int) -> KeyRecurrence | None:
    """From the data's meta.json: convert's vocabulary sizes (with --min-count; one out-of-vocabulary key per
    feature added), or synth's cardinalities and Zipf exponent (the distinct keys expected among train_rows
    draws). None where the meta says neither (plain convert output, other tools' data)."""
    if meta.get("vocabulary_sizes"):
        sizes = meta["vocabulary_sizes"]
        return KeyRecurrence(train_rows * len(sizes), float(sum(size + 1 for size in sizes)),
                             f"meta.json's vocabulary sizes (min_count {meta.get('min_count')})")
    if meta.get("cardinalities") and meta.get("zipf_exponent"):
        cardinalities = tuple(meta["cardinalities"].values())
        expected = KeyDistribution(cardinalities, meta["zipf_exponent"]).expected_unique(train_rows)
        return KeyRecurrence(train_rows * len(cardinalities), expected,
                             "expected from meta.json's cardinalities and Zipf exponent")
    return None


def sparse_lr_for(rare_lr: float, frequent_lr: float, recurrence: float) -> float:
    """The sparse lr for keys recurring `recurrence` times: rare_lr at or below RARE_RECURRENCE, frequent_lr at
    or above FREQUENT_RECURRENCE, interpolated in log-log between (2 significant digits)."""
    span = math.log(FREQUENT_RECURRENCE / RARE_RECURRENCE)
    position = min(1.0, max(0.0, math.log(max(recurrence, 1e-9) / RARE_RECURRENCE) / span))
    return float(f"{rare_lr * (frequent_lr / rare_lr) ** position:.2g}")


@dataclass(frozen=True)
class SparseLrChoice:
    lr: float
    recurrence: KeyRecurrence

    def note(self, model: str) -> str:
        spec = MODELS[model]
        return (f"sparse lr {self.lr:g} for {model}: a training key recurs {self.recurrence.times:.0f} times on average "
                f"({self.recurrence.lookups} lookups / {self.recurrence.distinct_keys:.0f} distinct keys, "
                f"{self.recurrence.source}); {spec.sparse_lr_rare:g} at <= {RARE_RECURRENCE:.0f}, {spec.sparse_lr:g} at "
                f">= {FREQUENT_RECURRENCE:.0f}; set embedding.lr to override")


def choose_sparse_lr(config: TrainConfig, train_rows: int, meta: dict) -> SparseLrChoice | None:
    """The rule's sparse lr where it applies: the user left embedding.lr unset, the sparse optimizer is Adagrad
    (the rule's measurements), the model opts in (ModelSpec.sparse_lr_rare) and meta.json tells how often keys
    recur. None otherwise (the model's sparse_lr)."""
    spec = MODELS[config.model]
    if config.embedding.lr is not None or config.embedding.optimizer != "adagrad" or spec.sparse_lr_rare is None:
        return None
    recurrence = key_recurrence(meta, train_rows)
    if recurrence is None:
        return None
    return SparseLrChoice(sparse_lr_for(spec.sparse_lr_rare, spec.sparse_lr, recurrence.times), recurrence)


def fit_to_data(config: TrainConfig, train_rows: int, meta: dict | None = None) -> TrainConfig:
    """The config with batch_size, eval_every and (from the data's meta.json, see choose_sparse_lr) embedding.lr
    filled in where the user left them unset."""
    batch_size = config.batch_size or default_batch_size(train_rows, range(config.min_workers, config.max_workers + 1))
    total_steps = config.steps or max(1, train_rows // batch_size)
    eval_every = config.eval_every if config.eval_every is not None else default_eval_every(total_steps)
    fitted = config.model_copy(update={"batch_size": batch_size, "eval_every": eval_every})
    choice = choose_sparse_lr(config, train_rows, meta or {})
    if choice is not None:
        fitted = fitted.model_copy(update={"embedding": config.embedding.model_copy(update={"lr": choice.lr})})
    return fitted


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

"""The job config: one pydantic schema shared by the CLI, the REST API and the workers.

A config comes from a YAML file, then `--set key=value` overrides (dotted keys,
YAML values), then the named flags; `load_config` validates the result and
raises `ConfigError` with one line per bad field.
"""
from __future__ import annotations

import os
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator,
                      model_validator)

from terarec.models.registry import MODELS

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the field and what is allowed."""


def _printable_path(path: str) -> str:
    """A path or URI fit to hand to the OS: no NUL, no control character, no lone surrogate."""
    if any(ord(char) < 32 or ord(char) == 127 or 0xD800 <= ord(char) <= 0xDFFF for char in path):
        raise ValueError("a path must not hold NUL, control characters or lone surrogates")
    return path


PathText = Annotated[str, AfterValidator(_printable_path)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleConfig(Strict):
    """A learning-rate schedule: linear warmup, then a decay (formulas in core/steering.py::lr_factor)."""

    warmup_steps: int = Field(default=0, ge=0, description="steps of linear warmup from lr/warmup_steps to lr")
    decay: Literal["none", "linear", "cosine", "step"] = "none"
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="linear/cosine: the final lr as a fraction of lr")
    step_every: int | None = Field(default=None, gt=0, description="step decay: multiply the lr by gamma every this many steps")
    gamma: float = Field(default=0.5, gt=0, le=1, description="step decay factor")

    @model_validator(mode="after")
    def _step_needs_interval(self) -> "ScheduleConfig":
        if self.decay == "step" and self.step_every is None:
            raise ValueError("decay 'step' needs step_every (steps between lr drops)")
        return self


class EarlyStoppingConfig(Strict):
    patience: int = Field(gt=0, description="evaluations in a row without a gain before the run stops")
    min_delta: float = Field(default=0.0, ge=0, description="an eval AUC must beat the best by more than this")


class EmbeddingConfig(Strict):
    dim: int = Field(default=16, gt=0, le=4096, description="embedding width D")
    optimizer: Literal["sgd", "adagrad", "adam"] = "adagrad"
    lr: float | None = Field(default=None, gt=0, description="sparse learning rate; default: the model's own")
    init_scale: float = Field(default=0.05, gt=0, description="initial rows are uniform in [-init_scale, init_scale)")
    num_buckets: int = Field(default=4096, gt=0, description="keys -> buckets -> workers; resharding moves buckets")
    comm_dtype: Literal["fp32", "bf16", "fp16", "int8"] = Field(default="fp32", description="rows on the wire")
    grad_comm_dtype: Literal["fp32", "bf16", "fp16", "int8"] = Field(default="fp32", description="gradients on the wire")
    schedule: ScheduleConfig = Field(default=ScheduleConfig(), description="decay (and warmup) of the sparse lr")


class DenseOptimizerConfig(Strict):
    name: Literal["sgd", "adagrad", "adam"] = "adam"
    lr: float = Field(default=3e-3, gt=0)
    schedule: ScheduleConfig = ScheduleConfig()


class StoreConfig(Strict):
    kind: Literal["device", "cached_host", "cached_ssd"] = "device"
    policy: Literal["lru", "lfu"] = Field(default="lru", description="cache eviction: lru is CLOCK, lfu GCLOCK")
    cache_bytes: float | None = Field(default=None, gt=0, description="fast-tier size in bytes, or a fraction of free memory if < 1")
    host_bytes: float | None = Field(default=None, gt=0, description="host-tier size in bytes, or a fraction if < 1")
    path: PathText | None = Field(default=None, description="directory of the SSD table (cached_ssd)")

    @model_validator(mode="after")
    def _ssd_needs_path(self) -> "StoreConfig":
        if self.kind == "cached_ssd" and not self.path:
            raise ValueError("store.kind cached_ssd needs store.path (a directory for the SSD table)")
        return self


class ServingConfig(Strict):
    """How online-inference replicas batch, cache, what each asks of the cluster, and how long a deploy waits for
    that (POST /v1/models `serving`, `terarec deploy`)."""

    max_batch_rows: int = Field(default=8192, ge=4096, le=1_000_000, description="rows merged into one forward "
                                "(@serve.batch counts rows, not requests); at least TERAREC_MAX_PREDICT_ROWS; "
                                "larger on a GPU")
    batch_wait_timeout_s: float = Field(default=0.0, ge=0, le=1, description="how long a forward waits for more "
                                        "requests once one is there; 0 suffices under load, where requests queue "
                                        "while the previous forward runs")
    recent_rows: int = Field(default=65536, ge=0, description="rows a replica keeps from its embedding servers' "
                             "answers (0: ask the servers every time)")
    recent_max_age_s: float = Field(default=30.0, gt=0, description="the oldest a replica's cached row may be: "
                                    "how late it sees a row that changed on the servers")
    direct_ingress: bool = Field(default=True, description="each replica also answers POST /v1/models/NAME/predict on "
                                 "a port of its own (the control plane's token and limits; GET /v1/models/NAME lists "
                                 "them as `endpoints`): a request skips the control plane's hop")
    drain_s: float = Field(default=1.0, ge=0, le=25, description="how long a stopping replica (a rollout, a delete) "
                           "still answers on its own port after it left `endpoints`")
    gpus: float = Field(default=0, ge=0, le=8, description="GPUs per replica (the dense model runs on it)")
    cpus: float = Field(default=1, gt=0, le=256, description="CPUs per replica")
    deploy_timeout_s: float = Field(default=120, gt=0, description="how long a deploy waits for its replicas' and "
                                    "embedding servers' resources before it gives up (the previous version, if "
                                    "any, keeps serving)")


def _models_section() -> type[BaseModel]:
    """One config section per zoo model, named after it (`dlrm:`, `deepfm:` ...)."""
    fields: dict[str, Any] = {name: (spec.config, spec.config()) for name, spec in MODELS.items()}
    return create_model("ModelSections", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


ModelSections = _models_section()


class TrainConfig(Strict):
    """Everything a training job needs; `terarec train`, POST /v1/jobs and the workers all read this."""

    model: str = "dlrm"
    data: PathText = Field(description="directory with train/ and eval/ parquet (terarec data synth|convert)")
    run_dir: PathText = "runs/latest"
    steps: int | None = Field(default=None, gt=0, description="optimizer steps; default one epoch of train/")
    batch_size: int | None = Field(default=None, gt=0, description="global batch size, split across workers; "
                                   "default: at least 1000 steps per epoch, a power of two in [32, 4096]")
    eval_batch_size: int = Field(default=16384, gt=0)
    eval_rows: int | None = Field(default=None, gt=0, description="evaluate on at most this many eval rows")
    eval_every: int | None = Field(default=None, ge=0, description="steps between evaluations, and one at "
                                   "each epoch's end (0: only at the end); default: 10 evaluations per run")
    keep_best: bool = Field(default=False, description="keep the checkpoint of the best eval AUC in RUN_DIR/best")
    early_stopping: EarlyStoppingConfig | None = Field(default=None, description="stop when eval AUC stops improving")
    seed: int = 0
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        default="fp32", description="the dense part's math: fp32; tf32 matmuls; or bf16 autocast with fp32 "
                                    "weights and fp32 embedding rows (see kernels/precision.py)")
    cuda_graphs: bool = Field(default=True, description="on CUDA, replay the dense part of a training step "
                              "(after the embedding lookup) as CUDA graphs, for models that have one (DLRM)")
    workers: int | tuple[int, int] = Field(default=1, description="N, or [min, max] for an elastic job")
    max_failures: int = Field(default=0, ge=-1, description="restarts from the latest checkpoint after a failure (-1: forever)")
    launch: Literal["auto", "workers", "in_process"] = Field(
        default="auto", description="where the training loop runs: 'workers' are Ray Train worker actors (one per "
        "shard, restartable); 'in_process' is Ray Train's local mode, the loop in the driver itself (one worker, no "
        "restarts; 15-20 s sooner to the first step, with no controller and worker processes to start); 'auto' "
        "takes in_process for one worker with max_failures 0 on a Ray the job starts itself, else workers")
    use_gpu: bool | None = Field(default=None, description="default: use GPUs when the cluster has them")
    cpus_per_worker: float | None = Field(default=None, gt=0, description="default: the local CPUs split over max workers")
    checkpoint_every: int = Field(default=0, ge=0, description="steps between checkpoints (0: only at the end)")
    log_every: int = Field(default=50, gt=0)
    resume_from: PathText | None = Field(default=None, description="a checkpoint directory, or 'latest' in run_dir")
    ray_address: str | None = Field(default=None, description="Ray cluster; default RAY_ADDRESS or a local Ray")
    resource_timeout_s: float = Field(default=300, gt=0, description="give up after waiting this long for workers' resources")
    embedding: EmbeddingConfig = EmbeddingConfig()
    dense_optimizer: DenseOptimizerConfig = DenseOptimizerConfig()
    store: StoreConfig = StoreConfig()
    models: ModelSections = ModelSections()  # type: ignore[valid-type]

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
        return name

    @field_validator("run_dir")
    @classmethod
    def _local_run_dir(cls, run_dir: str) -> str:
        if "://" in run_dir:  # Ray Train, metrics.json and curve.jsonl write to a filesystem path
            raise ValueError(f"run_dir must be a local or mounted directory, not a URI ({run_dir}); mount the bucket "
                             f"(e.g. s3fs, gcsfuse) and give its path")
        return run_dir

    @field_validator("workers")
    @classmethod
    def _worker_range(cls, workers: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (workers, workers) if isinstance(workers, int) else workers
        if not 1 <= low <= high:
            raise ValueError(f"workers must be N >= 1 or [min, max] with 1 <= min <= max, got {workers}")
        return workers

    @model_validator(mode="after")
    def _steering_needs_evaluations(self) -> "TrainConfig":
        if self.eval_every == 0 and (self.keep_best or self.early_stopping):
            raise ValueError("eval_every is 0, but keep_best and early_stopping need periodic evaluations: set "
                             "eval_every > 0 (or leave it unset for 10 per run)")
        for name, schedule in (("dense_optimizer", self.dense_optimizer.schedule), ("embedding", self.embedding.schedule)):
            if self.steps and schedule.warmup_steps >= self.steps:
                raise ValueError(f"{name}.schedule.warmup_steps ({schedule.warmup_steps}) must be below steps ({self.steps})")
        return self

    @model_validator(mode="after")
    def _in_process_is_one_worker(self) -> "TrainConfig":
        if self.launch == "in_process" and (self.workers != 1 or self.max_failures != 0):
            raise ValueError(f"launch=in_process runs one worker in the driver with no restarts, but workers="
                             f"{self.workers} and max_failures={self.max_failures}: set workers=1 and max_failures=0, "
                             f"or launch=workers")
        return self

    @model_validator(mode="after")
    def _batch_splits(self) -> "TrainConfig":
        for count in range(self.min_workers, self.max_workers + 1):
            if self.batch_size and self.batch_size % count:
                raise ValueError(f"batch_size {self.batch_size} must be divisible by every worker count the job "
                                 f"may run with ({self.min_workers}..{self.max_workers}); {count} does not divide it")
        return self

    @property
    def min_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[0]

    @property
    def max_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[1]

    def model_section(self) -> BaseModel:
        return getattr(self.models, self.model)

    @property
    def sparse_lr(self) -> float:
        """embedding.lr, or the model's default (what its embeddings train well with under Adagrad)."""
        return self.embedding.lr or MODELS[self.model].sparse_lr


def set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    """tree['a']['b'] = value for 'a.b'; a model's own section may be written `dlrm.top_mlp`."""
    parts = dotted_key.split(".")
    if parts[0] in MODELS and len(parts) > 1:
        parts = ["models", *parts]
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {dotted_key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict:
    """['a.b=3', 'workers=[1,2]'] -> {'a': {'b': 3}, 'workers': [1, 2]} (values parsed as YAML)."""
    tree: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({error.problem})") from None
        set_dotted(tree, key.strip(), value)
    return tree


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as stream:
            tree = yaml.safe_load(stream) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(tree).__name__}")
    return tree


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"config field '{field}': {message}")
    return "; ".join(lines)


def validate_config(tree: dict) -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def load_config(path: str | None = None, overrides: list[str] | None = None, flags: dict | None = None,
                tree: dict | None = None) -> TrainConfig:
    """File, then a config tree (e.g. JSON from the API), then --set overrides, then explicit flags (None ignored)."""
    tree = merge(read_yaml(path) if path else {}, tree or {})
    tree = merge(tree, parse_overrides(overrides or []))
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    return validate_config(tree)

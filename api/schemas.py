"""Request and response bodies of the REST API (the OpenAPI page at /docs is generated from these)."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

from terarec.core.config import PathText, ServingConfig, StoreConfig
from terarec.core.data.schema import NUM_DENSE, NUM_SPARSE

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- jobs ------------------------------------------------------------------------------------------------
MAX_CONFIG_DEPTH = 16


def _shallow(tree: dict[str, Any]) -> dict[str, Any]:
    """A config tree nested at most MAX_CONFIG_DEPTH levels (counted without recursion: a deep one is an attack)."""
    level, depth = [tree], 0
    while level:
        depth += 1
        if depth > MAX_CONFIG_DEPTH:
            raise ValueError(f"nested deeper than {MAX_CONFIG_DEPTH} levels; a config is a few levels deep")
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
    return tree


ConfigTree = Annotated[dict[str, Any], AfterValidator(_shallow)]


class JobRequest(Body):
    """A training job: the `terarec train` config (the TrainConfig fields), validated before it is submitted."""

    config: ConfigTree | None = Field(
        default=None, description="TrainConfig fields as an object (the control plane reads no config file a "
                                  "request names); default: TERAREC_DEFAULT_CONFIG, if the operator set one")
    overrides: ConfigTree = Field(default_factory=dict, description="dotted keys over the config, like "
                                  "`terarec train --set`, e.g. {\"steps\": 200, \"embedding.dim\": 32}")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"config": {"data": "/data/criteo", "steps": 1000, "batch_size": 4096, "embedding": {"dim": 16}}},
        {"config": {"data": "/data/criteo"}, "overrides": {"steps": 200}}]})


class JobView(BaseModel):
    id: str
    status: str = Field(description="PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED (Ray's), LOST when Ray no longer "
                                    "knows the job, UNREADABLE when its record cannot be read (see the server log)")
    message: str | None = None
    run_dir: str | None = None
    config: dict[str, Any] | None = None
    created_at: float | None = None
    updated_at: float | None = None
    ray_reachable: bool = Field(default=False, description="false when Ray could not be asked: status is the last "
                                                           "one recorded")
    dashboard_url: str | None = None
    progress: dict[str, Any] | None = Field(default=None, description="the latest line of RUN_DIR/curve.jsonl")
    result: dict[str, Any] | None = Field(default=None, description="RUN_DIR/metrics.json once the job is done")
    checkpoint: str | None = Field(default=None, description="the final checkpoint: deploy it with POST /v1/models")
    evaluation: dict[str, Any] | None = Field(default=None, description="the latest periodic evaluation (eval_every): "
                                              "step, AUC, log loss, mean predicted vs observed CTR per task")
    best: dict[str, Any] | None = Field(default=None, description="the best evaluation so far: step and AUC "
                                        "(deploy its checkpoint with checkpoint `best` when the job keeps it)")


class JobList(BaseModel):
    jobs: list[JobView]


class JobLogs(BaseModel):
    id: str
    logs: str


# ---- models ----------------------------------------------------------------------------------------------
class ModelRequest(Body):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
                      description="lowercase letters, digits and dashes; deploying an existing name rolls it out")
    checkpoint: PathText = Field(min_length=1, description="a checkpoint directory (meta.json, dense.pt, shard-*.pt), "
                                                          "or `best` / `latest` of the training job `job`")
    job: str | None = Field(default=None, description="the training job whose `best` (keep_best) or `latest` "
                                                      "checkpoint to serve")
    replicas: int = Field(default=1, ge=1, le=256, description="Serve replicas of the dense model")
    servers: int | None = Field(default=None, ge=1, le=1024,
                                description="embedding server actors; default: the checkpoint's world size")
    store: StoreConfig | None = Field(default=None, description="the servers' store, as in training: cached_host or "
                                      "cached_ssd with a cache_bytes budget when the table outgrows a server's memory; "
                                      "default: every row in memory")
    server_gpus: float = Field(default=0, ge=0, le=8, description="GPUs per embedding server (its store on the GPU)")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="replica batching, row cache, GPUs")


class ModelView(BaseModel):
    name: str
    status: str = Field(description="Ray Serve's application status: DEPLOYING, RUNNING, DEPLOY_FAILED, ...")
    message: str | None = None
    replicas: int = Field(description="replicas running now")
    checkpoint: str | None = Field(default=None, description="what a replica serves (during a rollout, either one)")
    step: int | None = None
    model: str | None = None
    tasks: list[str] | None = Field(default=None, description="the label columns, in the order of `scores`")
    servers: int | None = Field(default=None, description="embedding server actors holding the rows")
    device: str | None = Field(default=None, description="where a replica runs the dense model (cpu or cuda)")
    recent_hit_rate: float | None = Field(default=None, description="share of rows a replica found in its own cache")
    recent_rows: int | None = Field(default=None, description="rows a replica holds in its cache (it starts with every "
                                    "row of the servers whose rows fit)")
    forwards: int | None = Field(default=None, description="forwards a replica ran since it started (@serve.batch "
                                 "merges the requests queued meanwhile into one)")
    forward_rows: int | None = Field(default=None, description="rows those forwards scored")
    endpoints: list[str] | None = Field(default=None, description="the replicas' own addresses: POST "
                                        "ENDPOINT/v1/models/NAME/predict with the same token skips the control plane "
                                        "(serving.direct_ingress)")


class ModelList(BaseModel):
    models: list[ModelView]


DenseValue = Annotated[float, Field(allow_inf_nan=False)]
RawId = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]


class PredictRow(Body):
    dense: list[DenseValue] = Field(min_length=NUM_DENSE, max_length=NUM_DENSE,
                                    description="I1..I13: raw counts as in Criteo (negative values count as 0), "
                                                "or log(1 + x) values when `transformed` is true")
    sparse: list[RawId] = Field(min_length=NUM_SPARSE, max_length=NUM_SPARSE,
                                description="C1..C26: raw categorical IDs as signed 64-bit integers")


class PredictRequest(Body):
    rows: list[PredictRow] = Field(min_length=1)
    transformed: bool = Field(default=False, description="dense values are already log(1 + max(x, 0)), as stored "
                                                         "in terarec's parquet data")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"rows": [
        {"dense": [1, 2, 0, 5, 1382, 4, 15, 2, 181, 1, 2, 0, 2],
         "sparse": list(range(1, NUM_SPARSE + 1))}]}]})


class PredictResponse(BaseModel):
    model: str
    scores: list[list[float]] = Field(description="per row, one click probability per task of the model")

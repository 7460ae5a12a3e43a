"""Worker metrics exported through ray.util.metrics: they appear in the Ray dashboard and its Prometheus endpoint."""
from __future__ import annotations

from ray.util.metrics import Gauge


class WorkerMetrics:
    def __init__(self, rank: int):
        tags = ("rank",)
        self.rank = {"rank": str(rank)}
        self.samples_per_s = Gauge("terarec_samples_per_s", "training samples/s (global)", tag_keys=tags)
        self.loss = Gauge("terarec_loss", "training loss over the last log window", tag_keys=tags)
        self.rows = Gauge("terarec_shard_rows", "embedding rows held by this worker's shard", tag_keys=tags)
        self.exchange_mb = Gauge("terarec_exchange_mb", "MB this worker sent in all-to-alls in the window", tag_keys=tags)
        self.exchange_s = Gauge("terarec_exchange_seconds", "seconds in all-to-alls in the window", tag_keys=tags)
        self.store = Gauge("terarec_store", "store metric (hit rates, evictions, bytes) by name", tag_keys=("rank", "name"))
        self.eval = Gauge("terarec_eval", "latest evaluation (auc, logloss, mean_pred, mean_label per task) by name",
                          tag_keys=("rank", "name"))

    def record(self, log, store) -> None:
        self.samples_per_s.set(log.samples_per_s, self.rank)
        self.loss.set(log.loss, self.rank)
        self.rows.set(len(store), self.rank)
        self.exchange_mb.set(log.exchange_mb, self.rank)
        self.exchange_s.set(log.exchange_s, self.rank)
        for name, value in store.metrics().items():
            self.store.set(value, {"rank": self.rank["rank"], "name": name})

    def record_eval(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.eval.set(value, {"rank": self.rank["rank"], "name": name})

"""What terarec adds to Ray Train's controller: a job waiting for its workers' resources says `pending` and
why, once, and gives up after `resource_timeout_s` with one line, instead of waiting forever in silence.

`PendingWatch` goes into `RunConfig(callbacks=...)`; Ray Train runs it inside the controller actor and calls
it on every controller state update: at least once per RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S while a
placement group waits (a fixed-size job), every loop while an elastic job has room for too few workers.
"""
from __future__ import annotations

import time

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback

from terarec.core.config import TrainConfig
from terarec.core.resources import NOTICE_AFTER_S, ResourceError, pending_reason

# controller states in which no worker group runs
WAITING = {"InitializingState", "SchedulingState", "ReschedulingState", "RestartingState"}


class PendingWatch(ControllerCallback):
    def __init__(self, config: TrainConfig, per_worker: dict[str, float]):
        self.config, self.per_worker = config, per_worker
        self.waiting_since: float | None = None
        self.said = False

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if type(current_state).__name__ not in WAITING:
            self.waiting_since, self.said = None, False
            return
        now = time.monotonic()
        self.waiting_since = self.waiting_since or now
        waited = now - self.waiting_since
        if waited < NOTICE_AFTER_S or (self.said and waited < self.config.resource_timeout_s):
            return
        reason = pending_reason(self.config, self.per_worker, ray.available_resources(), ray.cluster_resources())
        if not self.said:  # also when the first update after NOTICE_AFTER_S is already past the deadline (a busy host)
            print(f"[terarec] pending: {reason}; giving up after resource_timeout_s={self.config.resource_timeout_s:g}",
                  flush=True)
            self.said = True
        if waited >= self.config.resource_timeout_s:
            raise ResourceError(f"gave up after {waited:.0f} s pending ({reason}): free resources, lower workers, "
                                f"or raise resource_timeout_s={self.config.resource_timeout_s:g}")

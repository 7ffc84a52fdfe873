"""Prometheus metrics for /metrics, read from the database at scrape time.

Each app gets its own CollectorRegistry (never prometheus_client's global one), so two apps
in one process (tests, or a daemon restarted in-process) never register the same names
twice. Counters come from the append-only events and the batches table, so they only grow
even when a retry puts failed renders back into the queue.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.store import queries
from daemon.store.models import (
    ENDED_RENDER_STATES,
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_REJECTED,
    JOB_RUNNING,
    RENDER_QUEUED,
    RENDER_RUNNING,
    Store,
)

RENDER_STATES = (RENDER_QUEUED, RENDER_RUNNING, *ENDED_RENDER_STATES)
JOB_STATES = (JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_FAILED, JOB_REJECTED)


class FarmCollector(Collector):
    def __init__(self, store: Callable[[], Store]) -> None:
        self._store = store

    def describe(self) -> list[Metric]:
        # Nothing to describe up front: registering must not touch the database.
        return []

    def collect(self) -> Iterator[Metric]:
        with self._store().session() as session:
            renders, jobs = queries.state_counts(session)
            snapshot = queries.queue_snapshot(session, Path("."), limit=0, recent=0)
            events = queries.event_counts(
                session, ("render_done", "render_failed", "job_cancelled", "job_retried"))
            loads, lora_loads, busy, calls = queries.batch_totals(session)

        by_state = GaugeMetricFamily("lorafarm_queue_renders",
                                     "Renders in the history by state (queue depth: queued, "
                                     "running)", labels=["state"])
        for state in RENDER_STATES:
            by_state.add_metric([state], renders.get(state, 0))
        yield by_state
        job_states = GaugeMetricFamily("lorafarm_jobs", "Jobs by state", labels=["state"])
        for state in JOB_STATES:
            job_states.add_metric([state], jobs.get(state, 0))
        yield job_states
        yield GaugeMetricFamily("lorafarm_renders_done_last_hour",
                                "Renders finished done in the last hour (renders per hour)",
                                value=snapshot["done_last_hour"])
        yield CounterMetricFamily("lorafarm_renders_done", "Renders recorded done, ever",
                                  value=events.get("render_done", 0))
        yield CounterMetricFamily("lorafarm_render_failures", "Renders recorded failed, ever "
                                  "(a retried render that fails again counts again)",
                                  value=events.get("render_failed", 0))
        yield CounterMetricFamily("lorafarm_jobs_cancelled", "Jobs cancelled by the user",
                                  value=events.get("job_cancelled", 0))
        yield CounterMetricFamily("lorafarm_jobs_retried", "Job retries asked for",
                                  value=events.get("job_retried", 0))
        yield CounterMetricFamily("lorafarm_pipeline_loads",
                                  "Pipelines loaded from disk (sum over the batches table)",
                                  value=int(loads))
        yield CounterMetricFamily("lorafarm_lora_loads", "LoRA files loaded (batches table)",
                                  value=int(lora_loads))
        yield CounterMetricFamily("lorafarm_pipeline_calls", "Batches rendered (batches table)",
                                  value=int(calls))
        yield CounterMetricFamily("lorafarm_busy_seconds",
                                  "Wall seconds spent rendering batches (batches table)",
                                  value=float(busy))
        yield GaugeMetricFamily("lorafarm_paused", "1 while new renders are paused",
                                value=1 if snapshot["paused"] else 0)
        if snapshot["seconds_per_step"] is not None:
            yield GaugeMetricFamily("lorafarm_seconds_per_render_step",
                                    "Measured median seconds per render-step",
                                    value=snapshot["seconds_per_step"])
        if snapshot["eta_seconds"] is not None:
            yield GaugeMetricFamily("lorafarm_queue_eta_seconds",
                                    "Estimated seconds until the queue is empty",
                                    value=snapshot["eta_seconds"])
        yield from _gpu_memory()


def _gpu_memory() -> Iterator[Metric]:
    """CUDA memory of this process (the web app runs inside the daemon, so this is the
    worker's), and device-wide use once CUDA is initialised. torch is not imported here if
    the process has not imported it: a metrics scrape must not load torch."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    allocated = GaugeMetricFamily("lorafarm_gpu_memory_allocated_bytes",
                                  "CUDA memory held by tensors of this process",
                                  labels=["device"])
    reserved = GaugeMetricFamily("lorafarm_gpu_memory_reserved_bytes",
                                 "CUDA memory reserved by this process's caching allocator",
                                 labels=["device"])
    used = GaugeMetricFamily("lorafarm_gpu_memory_used_bytes",
                             "CUDA memory in use on the device (all processes)",
                             labels=["device"])
    total = GaugeMetricFamily("lorafarm_gpu_memory_total_bytes", "CUDA memory on the device",
                              labels=["device"])
    initialised = torch.cuda.is_initialized()
    device_wide = False
    for index in range(torch.cuda.device_count()):
        name = f"cuda:{index}"
        allocated.add_metric([name], torch.cuda.memory_allocated(index))
        reserved.add_metric([name], torch.cuda.memory_reserved(index))
        # mem_get_info would create a CUDA context (hundreds of MB) on a device this process
        # has not used yet: ask only devices that already hold our memory.
        if initialised and torch.cuda.memory_reserved(index) > 0:
            free, capacity = torch.cuda.mem_get_info(index)
            used.add_metric([name], capacity - free)
            total.add_metric([name], capacity)
            device_wide = True
    yield allocated
    yield reserved
    if device_wide:
        yield used
        yield total


def build_registry(store: Callable[[], Store]) -> CollectorRegistry:
    """A private registry with the farm's collector; `store` is called at each scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(store))
    return registry

"""A Temporal client for csbs: the pydantic data converter (workflow inputs are pydantic
models), tracing when it is on, and the Prometheus endpoint when asked."""

from __future__ import annotations

from temporalio.client import Client, Interceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from csbs.config import Settings
from csbs.telemetry import tracing_enabled

__all__ = ["connect", "metrics_runtime"]

_runtime: Runtime | None = None


def metrics_runtime(bind: str) -> Runtime:
    """The process's Temporal runtime serving Prometheus metrics on ``bind`` (host:port):
    the SDK's own metrics and csbs's counters (activities/metrics.py). One per process."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=bind)))
    return _runtime


async def connect(settings: Settings, serve_metrics: bool = False) -> Client:
    """A Temporal client with the pydantic converter that csbs workflows expect; traced
    when tracing is on (csbs.telemetry), and serving metrics when asked (worker, API)."""
    interceptors: list[Interceptor] = []
    if tracing_enabled():
        from temporalio.contrib.opentelemetry import TracingInterceptor

        interceptors.append(TracingInterceptor())
    runtime = (
        metrics_runtime(settings.metrics_bind) if serve_metrics and settings.metrics_bind else None
    )
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.namespace,
        data_converter=pydantic_data_converter,
        interceptors=interceptors,
        runtime=runtime,
    )

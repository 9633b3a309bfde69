"""OpenTelemetry tracing for csbs processes (worker, CLI, API), set up from the standard
``OTEL_*`` environment variables, and the spans csbs adds around its own steps.

- ``OTEL_TRACES_EXPORTER``: ``none`` (the default), ``console`` (spans as JSON on stderr)
  or ``otlp`` (OTLP over HTTP/protobuf; ``OTEL_EXPORTER_OTLP_ENDPOINT``,
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` and ``OTEL_EXPORTER_OTLP_HEADERS`` as usual).
- ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name the process.
- ``OTEL_SDK_DISABLED=true`` turns everything off.

Temporal's own spans (StartWorkflow, RunWorkflow, RunActivity, ...) come from
``temporalio.contrib.opentelemetry.TracingInterceptor``, which the client and worker add
when tracing is on; the spans here nest inside them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace

log = logging.getLogger(__name__)
_provider: Any = None
EXPORTERS = ("none", "console", "otlp")


class TelemetryConfigError(ValueError):
    """An ``OTEL_*`` variable has a value csbs cannot use."""


def traces_exporter() -> str:
    """The exporter the environment asks for (``none`` when tracing is off)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    value = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
    if value not in EXPORTERS:
        raise TelemetryConfigError(
            f"OTEL_TRACES_EXPORTER must be one of {', '.join(EXPORTERS)} (got {value!r})"
        )
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if value == "otlp" and protocol not in ("", "http/protobuf"):
        raise TelemetryConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL must be http/protobuf for csbs (got {protocol!r})"
        )
    return value


def tracing_enabled() -> bool:
    return _provider is not None


def setup_tracing(service_name: str) -> bool:
    """Install the global tracer provider the environment asks for; True when tracing is
    on. Safe to call more than once (the first call wins)."""
    global _provider
    if _provider is not None:
        return True
    exporter_name = traces_exporter()
    if exporter_name == "none":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    name = os.environ.get("OTEL_SERVICE_NAME", "").strip() or service_name
    resource = Resource.create({"service.name": name})
    provider = TracerProvider(resource=resource)
    if exporter_name == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing on: %s exporter, service %s", exporter_name, service_name)
    return True


def shutdown_tracing() -> None:
    """Flush spans still buffered (call before a process leaves with ``os._exit``)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=5000)
        _provider.shutdown()


@contextmanager
def step_span(name: str, **attributes: Any) -> Iterator[trace.Span]:
    """A span around one csbs step; attributes whose value is None are left out. A failure
    is recorded on the span and raised on."""
    tracer = trace.get_tracer("csbs")
    attrs = {f"csbs.{k}": v for k, v in attributes.items() if v is not None}
    with tracer.start_as_current_span(name, attributes=attrs) as span:
        yield span


def set_attributes(span: trace.Span, **attributes: Any) -> None:
    span.set_attributes({f"csbs.{k}": v for k, v in attributes.items() if v is not None})

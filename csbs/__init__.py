"""csbs core library: domain model, catalog, chunk store and compute drivers (no Temporal)."""

__version__ = "0.1.0"

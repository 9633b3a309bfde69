"""The Temporal side that the worker and the entry points (CLI, REST API) share: connecting
a client, and the schedules that start csbs's workflows. Below ``starter/`` and beside
``worker.py``, above ``workflows/`` (it names their search attributes), so that neither
the worker nor an entry point reaches up for it."""

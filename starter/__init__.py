"""Entry points: the ``csbs`` CLI, a Python client for other services, the dev stack."""

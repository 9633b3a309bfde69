"""Secrets (issue 7): no credential or key in workflow inputs, results or histories, in the
worker's logs (at DEBUG, with spans printed), in CLI output or in errors. A full run with
an encrypted repository, then every byte of it is searched for the secrets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError

from tests.conftest import ROOT, make_settings, running_stack, settings_env

pytestmark = pytest.mark.slow
MIB = 1024 * 1024


def decoded_payloads(history_json: str) -> list[str]:
    """Payload data in a history is base64 of the JSON the converter wrote: decode it."""
    out = []
    for blob in re.findall(r'"data":\s*"([A-Za-z0-9+/=]+)"', history_json):
        try:
            out.append(base64.b64decode(blob).decode("utf-8", "replace"))
        except ValueError:
            continue
    return out


async def test_no_secret_in_histories_logs_output_or_errors(
    tmp_path: Path, s3: Any, temporal: Any
) -> None:
    key = os.urandom(32)
    key_file = tmp_path / "csbs.key"
    key_file.write_text(key.hex())
    queue = f"csbs-secrets-{uuid.uuid4().hex[:6]}"
    settings = make_settings(tmp_path, s3, encryption_key_file=key_file, task_queue=queue)
    secrets = {
        "S3 secret key": os.environ["AWS_SECRET_ACCESS_KEY"],
        "encryption key (hex)": key.hex(),
        "encryption key (base64)": base64.b64encode(key).decode(),
    }
    address = temporal.client.service_client.config.target_host
    env = {
        **settings_env(settings, address),
        "CSBS_LOG_LEVEL": "DEBUG",
        "OTEL_TRACES_EXPORTER": "console",
    }
    log_path = tmp_path / "worker.log"
    corpus: list[tuple[str, str]] = []

    # The stack's own worker is only for the test's direct reads; the worker under test is
    # a real process whose whole output is kept.
    async with running_stack(
        temporal, settings.model_copy(update={"task_queue": queue + "-x"})
    ) as stack:
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, str(ROOT / "worker.py")],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:

                async def csbs(*args: str, ok: bool = True) -> str:
                    out = await stack.cli(*args, check=ok, env=env)
                    corpus.append((f"csbs {' '.join(args)}", out.stdout + out.stderr))
                    return out.stdout

                server = stack.compute.create_server("web-1", [8 * MIB, 8 * MIB])
                stack.compute.write(server.id, server.disks[0].id, 0, os.urandom(2 * MIB))
                await csbs("server", "list", "--json")
                bk = await csbs("backup", "create", server.id, "--wait", "--json")
                bk_id = re.search(r'"id": "(bk-[0-9a-f]+)"', bk).group(1)  # type: ignore[union-attr]
                await csbs("backup", "show", bk_id)
                await csbs("backup", "verify", bk_id, "--wait", "--json")
                await csbs("backup", "restore", bk_id, "--yes", "--wait", "--json")
                await csbs("task", "list", "--json")
                await csbs("doctor", "--json", ok=False)
                await csbs("db", "status", "--json")
                pol = await csbs(
                    "policy",
                    "create",
                    "--time",
                    "01:00",
                    "--every-days",
                    "1",
                    "--keep-count",
                    "1",
                    "--json",
                )
                pol_id = re.search(r'"id": "(pol-[0-9a-f]+)"', pol).group(1)  # type: ignore[union-attr]
                await csbs("policy", "bind", pol_id, server.id)
                await csbs("policy", "run", pol_id, "--wait", "--json")
                # Failures, whose messages are where secrets like to hide.
                await csbs("backup", "create", "srv-missing", "--wait", ok=False)
                # The CLI refuses that before starting anything; another service's start
                # is refused by the workflow, with a failure in its history.
                refused = await stack.client.start_workflow(
                    "BackupServer", {"server_id": "srv-missing"}, id=f"refused-{queue}",
                    task_queue=queue,
                )  # fmt: skip
                with contextlib.suppress(WorkflowFailureError):
                    await refused.result()
                wrong = tmp_path / "wrong.key"
                wrong.write_text(os.urandom(32).hex())
                out = await stack.cli(
                    "doctor", check=False, env={**env, "CSBS_ENCRYPTION_KEY_FILE": str(wrong)}
                )
                corpus.append(("csbs doctor (wrong key)", out.stdout + out.stderr))
                assert "encryption key does not match" in out.stdout
                out = await stack.cli(
                    "server",
                    "list",
                    check=False,
                    env={**env, "CSBS_ENCRYPTION_KEY": "not-a-key", "CSBS_ENCRYPTION_KEY_FILE": ""},
                )
                corpus.append(("csbs with a bad key", out.stdout + out.stderr))
                await csbs("backup", "delete", bk_id, "--yes", "--wait", "--json")
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(30)
        corpus.append(("worker log", log_path.read_text(errors="replace")))

        # Every workflow the run started on the worker's queue, with its whole history.
        histories = 0
        for _ in range(50):
            runs = [w async for w in stack.client.list_workflows(f"TaskQueue = '{queue}'")]
            if len(runs) >= 7:
                break
            await asyncio.sleep(0.2)
        for run in runs:
            history = await stack.client.get_workflow_handle(
                run.id, run_id=run.run_id
            ).fetch_history()
            text = history.to_json()
            corpus.append((f"history of {run.id}", text + "\n".join(decoded_payloads(text))))
            histories += 1
    assert histories >= 7, "the run should have started backup, verify, restore, policy, ..."
    # The search reads inside payloads (inputs and results are base64 in a history).
    assert any(f'"server_id":"{server.id}"' in t for n, t in corpus if n.startswith("history"))
    assert any("DEBUG" in text for name, text in corpus if name == "worker log")
    assert any('"name": "csbs.transfer"' in text for name, text in corpus if name == "worker log")

    found = [
        f"{what} in {where}"
        for where, text in corpus
        for what, secret in secrets.items()
        if secret in text
    ]
    assert found == []
    print(f"searched {len(corpus)} outputs ({histories} histories) for {len(secrets)} secrets")

"""The tenant console in a real browser (issue 16, part 4): Playwright drives Debian's
chromium against ``csbs api serve`` as a real process over the real stack (Temporal,
SeaweedFS, the worker, the catalog).

A tenant signs in with a token, creates a policy, binds a server, backs it up now,
watches the progress reach "available", restores it with a disk mapping, and deletes a
failed task; a viewer never sees a restore button (and the API refuses it too); one
project's session never shows another project's backups. Every page is saved as a
screenshot at 1280 and 390 px wide in ``var/screenshots``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from csbs.catalog import BackupFilter
from starter.stack import free_port
from tests.conftest import ROOT, Stack

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = pytest.mark.slow
MIB = 1024 * 1024
CHROMIUM = os.environ.get("CSBS_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / "var" / "screenshots"
WIDTHS = {"wide": (1280, 900), "phone": (390, 844)}


@dataclass
class Console:
    url: str
    proc: subprocess.Popen[bytes]

    async def token(self, stack: Stack, role: str, project: str = "default") -> str:
        out = await stack.cli(
            "token", "create", "--role", role, "--project", project, "--name",
            f"console-{role}-{project}", "--json",
        )  # fmt: skip
        return str(out.json()["token"])


@pytest_asyncio.fixture(loop_scope="session")
async def console(stack: Stack, tmp_path: Path) -> AsyncIterator[Console]:
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "starter.cli", "api", "serve", "--port", str(port)],
        cwd=ROOT,
        env={**stack.env, "CSBS_TEMPORAL_UI_URL": "http://127.0.0.1:8233"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(150):
                try:
                    if (await http.get("/v1/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, (tmp_path / "api.log").read_text()
                await asyncio.sleep(0.1)
        yield Console(url, proc)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest_asyncio.fixture(loop_scope="session")
async def browser() -> AsyncIterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):  # CI installs it: a missing browser is a broken CI
            pytest.fail(f"no chromium at {CHROMIUM}: .ci/run installs it with apt")
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    async with playwright_api.async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


async def new_page(browser: Any, console: Console, lang: str = "en-US") -> Any:
    context = await browser.new_context(
        base_url=console.url, locale=lang, viewport={"width": 1280, "height": 900}
    )
    page = await context.new_page()
    page.set_default_timeout(30_000)
    return page


async def sign_in(page: Any, token: str) -> None:
    await page.goto("/login")
    await page.get_by_label(re.compile("API token|API 令牌")).fill(token)
    await page.keyboard.press("Enter")  # the keyboard alone signs in
    await page.wait_for_url(re.compile(r"/backups"))


async def shoot(page: Any, name: str) -> None:
    """Save the page at both widths (and leave it at 1280 px)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for label, (width, height) in WIDTHS.items():
        await page.set_viewport_size({"width": width, "height": height})
        await page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)
    await page.set_viewport_size({"width": 1280, "height": 900})


async def assert_labelled(page: Any) -> None:
    """Every control a person can use has a name a screen reader reads out."""
    unnamed = await page.evaluate(
        """() => Array.from(document.querySelectorAll(
              'input:not([type=hidden]), select, textarea, button, a[href]'))
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !(el.textContent || '').trim())
            .map(el => el.outerHTML.slice(0, 120))"""
    )
    assert unnamed == [], unnamed


def disk_sha(stack: Stack, server_id: str, disk_id: str) -> str:
    return hashlib.sha256(stack.driver._disk_path(server_id, disk_id).read_bytes()).hexdigest()


async def task_ended(stack: Stack, kind: str, timeout: float = 60) -> None:
    """Wait until the newest task of ``kind`` has ended, and check that it succeeded."""
    for _ in range(int(timeout / 0.2)):
        tasks = stack.catalog.list_tasks(kind=kind)
        if tasks and tasks[0].status != "running":
            break
        await asyncio.sleep(0.2)
    assert tasks and tasks[0].status == "succeeded", tasks[0].reason if tasks else "no task"


async def wait_status(page: Any, backup_id: str, label: str, timeout: float = 90) -> None:
    """Wait on the backups page until the row shows ``label`` (the page's own script
    follows the progress and shows the page again when it settles)."""
    row = page.locator(f"#row-{backup_id} [data-role=status]")
    await playwright_api.expect(row).to_have_text(label, timeout=timeout * 1000)


async def test_a_tenant_backs_up_and_restores_from_the_browser(
    stack: Stack, console: Console, browser: Any
) -> None:
    """Issue 16 part 4, as a new user: sign in, create a policy, bind a server, back up
    now, watch it become available, restore with a disk mapping, delete a failed task."""
    drv = stack.driver
    web = drv.create_server("web-1", [4 * MIB, 4 * MIB, 4 * MIB])
    system, data1, data2 = (d.id for d in web.disks)
    drv.write(web.id, system, 0, os.urandom(2 * MIB))
    drv.write(web.id, data1, MIB, os.urandom(2 * MIB))
    drv.write(web.id, data2, 0, os.urandom(MIB))
    broken = drv.create_server("db-1", [4 * MIB, 4 * MIB])
    admin = await console.token(stack, "admin")
    page = await new_page(browser, console)
    await page.goto("/backups")
    await page.wait_for_url(re.compile(r"/login\?next=/backups"))  # no session: sign in first
    await shoot(page, "login")
    await sign_in(page, admin)
    cookies = {c["name"]: c for c in await page.context.cookies()}
    session = cookies["csbs_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert admin not in str(cookies)  # the token itself is never kept in the browser

    # Guide 3.2.1: create a policy; its defaults are the guide's.
    await page.get_by_role("link", name="Policies").click()
    await page.get_by_role("link", name="Create backup policy").click()
    assert await page.get_by_label("Name *").input_value() == "backup_policy"
    assert await page.get_by_label("Every how many days (1-30)").input_value() == "3"
    await assert_labelled(page)
    await shoot(page, "policy-form")
    await page.get_by_label("Name *").fill("nightly")
    await page.get_by_label("Backup time *").fill("02:00, 02:30")  # under an hour apart
    await page.get_by_role("button", name="OK").click()
    await playwright_api.expect(page.get_by_role("alert")).to_contain_text("1 hour")
    await page.get_by_label("Backup time *").fill("02:00")
    await page.get_by_label("Time zone").fill("Asia/Shanghai")
    await page.get_by_role("button", name="OK").click()
    await playwright_api.expect(page.get_by_role("status")).to_contain_text("nightly")
    policy_row = page.locator("tr", has_text="nightly")
    await playwright_api.expect(policy_row).to_contain_text("0 / 64")
    # Next run times come from its Temporal Schedule, shown in the policy's time zone
    # (02:00 in Shanghai is 18:00 UTC).
    next_runs = policy_row.locator("td").nth(6)
    await playwright_api.expect(next_runs).to_contain_text(re.compile(r"\d{4}-\d\d-\d\d 02:00"))
    await playwright_api.expect(next_runs).to_contain_text("Asia/Shanghai")

    # Guide 3.2.7: bind the server; the page counts against the 64-server limit.
    await policy_row.get_by_role("link", name="Bind servers").click()
    await page.get_by_label(re.compile("web-1")).check()
    await playwright_api.expect(page.locator("#bind-count")).to_have_text(
        "1 of 64 servers selected"
    )
    await assert_labelled(page)
    await shoot(page, "bind")
    await page.get_by_role("button", name="OK").click()
    await playwright_api.expect(page.locator("tr", has_text="nightly")).to_contain_text("1 / 64")
    await shoot(page, "policies")

    # 立即备份: the policy backs its server up now; the page follows it to "available".
    await page.locator("tr", has_text="nightly").get_by_role("button", name="Back up now").click()
    await playwright_api.expect(page.get_by_role("status")).to_contain_text("backing up")
    for _ in range(100):
        made = stack.catalog.list_backups()
        if made:
            break
        await asyncio.sleep(0.2)
    (backup,) = made
    await page.get_by_role("link", name="Backups").click()
    await wait_status(page, backup.id, "Available")
    before = {d: disk_sha(stack, web.id, d) for d in (system, data1, data2)}
    row = page.locator(f"#row-{backup.id}")
    await row.locator("summary").focus()
    await page.keyboard.press("Enter")  # a row opens from the keyboard to its disks and tasks
    await playwright_api.expect(row.locator(".detail")).to_be_visible()
    await playwright_api.expect(row.locator(".detail")).to_contain_text(data2)
    await assert_labelled(page)
    await shoot(page, "backups")

    # Restore with a mapping (guide 3.1.2, R4, R7): the system disk and data disk 1, the
    # latter onto data disk 2. The data disks can never go onto the system disk.
    drv.write(web.id, system, 0, os.urandom(MIB))
    drv.write(web.id, data1, 0, os.urandom(MIB))
    data1_now = disk_sha(stack, web.id, data1)
    await row.get_by_role("link", name="Restore").click()
    dialog = page.get_by_role("dialog")
    await playwright_api.expect(dialog).to_contain_text("cannot be undone")
    await playwright_api.expect(dialog).to_contain_text("shut down")
    target1 = page.get_by_label(f"Restore onto disk ({data1})")
    options = await target1.locator("option").evaluate_all("els => els.map(e => e.value)")
    assert system not in options and set(options) == {data1, data2}
    assert await page.get_by_label("Start the server after restore").is_checked()
    await assert_labelled(page)
    await shoot(page, "restore")
    await page.get_by_label(f"Restore this disk ({data2})").uncheck()
    await target1.select_option(data2)
    await page.get_by_label("Start the server after restore").uncheck()
    await page.get_by_role("button", name="Restore").click()
    await playwright_api.expect(page.get_by_role("status")).to_contain_text("Restore of")
    await task_ended(stack, "restore")
    assert disk_sha(stack, web.id, system) == before[system]
    assert disk_sha(stack, web.id, data2) == before[data1]  # data disk 1's backup, mapped
    assert disk_sha(stack, web.id, data1) == data1_now  # not chosen: it keeps its data
    assert drv.get_server(web.id).state.value == "stopped"  # "start after" was unchecked
    await wait_status(page, backup.id, "Available")

    # A backup that fails leaves a failed task with its reason; an admin deletes it.
    gone = stack.driver._disk_path(broken.id, broken.disks[1].id)
    gone.rename(gone.with_suffix(".gone"))
    await page.get_by_role("link", name="Servers").click()
    await shoot(page, "servers")
    await page.get_by_role("button", name="Back up now: db-1").click()
    await playwright_api.expect(page.get_by_role("status")).to_contain_text("being created")
    for _ in range(300):
        failed = stack.catalog.list_tasks(kind="backup", status="failed")
        if failed:
            break
        await asyncio.sleep(0.2)
    (task,) = failed
    await page.get_by_role("link", name="Task status").click()
    task_row = page.locator(f"#task-{task.id}")
    await playwright_api.expect(task_row).to_contain_text("Failed")
    await playwright_api.expect(task_row).to_contain_text(broken.disks[1].id)  # the reason
    run_link = task_row.get_by_role("link", name="Run in Temporal")
    assert (await run_link.get_attribute("href")).startswith("http://127.0.0.1:8233/namespaces/")
    await assert_labelled(page)
    await shoot(page, "tasks")
    # A form posted from elsewhere (without the session's CSRF value) changes nothing.
    forged = await page.evaluate(
        """async (id) => { const r = await fetch('/tasks/' + id + '/delete', {method: 'POST',
              body: new URLSearchParams({csrf: 'forged'})}); return [r.status, await r.text()]; }""",
        task.id,
    )
    assert forged[0] == 403 and "came from another site" in forged[1]
    assert stack.catalog.list_tasks(status="failed") != []
    await task_row.get_by_role("button", name="Delete").click()
    await playwright_api.expect(page.get_by_role("status")).to_contain_text("1 failed task")
    await playwright_api.expect(page.locator(f"#task-{task.id}")).to_have_count(0)
    assert stack.catalog.list_tasks(status="failed") == []

    # Verify from the console; delete the error backup, after its confirmation.
    await page.get_by_role("link", name="Backups").click()
    await page.locator(f"#row-{backup.id}").get_by_role("button", name="Verify").click()
    await playwright_api.expect(page.get_by_role("status")).to_contain_text("Verification of")
    await task_ended(stack, "verify")
    (errored,) = stack.catalog.list_backups(BackupFilter(status="error"))
    await page.locator(f"#row-{errored.id}").get_by_role("link", name="Delete").click()
    dialog = page.get_by_role("dialog")
    await playwright_api.expect(dialog).to_contain_text(errored.name)
    await shoot(page, "delete")
    await dialog.get_by_role("button", name="Delete").click()
    await playwright_api.expect(page.get_by_role("status")).to_contain_text("Deleting")
    await playwright_api.expect(page.locator(f"#row-{errored.id}")).to_have_count(0, timeout=60_000)
    assert stack.catalog.find_backup(errored.id) is None

    # The same pages in Simplified Chinese, with the guide's terms.
    await page.get_by_role("link", name="简体中文").click()
    await page.get_by_role("link", name="备份", exact=True).click()
    await playwright_api.expect(page.locator(f"#row-{backup.id} [data-role=status]")).to_have_text(
        "可用"
    )
    status_filter = page.get_by_label("备份状态")
    for term in ("所有状态", "可用", "创建中", "恢复中", "删除中", "错误", "删除失败"):
        await playwright_api.expect(status_filter).to_contain_text(term)
    await shoot(page, "backups-zh")
    await page.get_by_role("link", name="策略").click()
    await playwright_api.expect(
        page.get_by_role("button", name=re.compile("立即备份"))
    ).to_be_visible()
    # Every change made here is in the operation log, by the console's token.
    log = (await stack.cli("audit", "list", "--json")).json()
    actions = {e["action"] for e in log if e["actor"].startswith("console, token console-admin")}
    assert {
        "policy.create",
        "policy.bind",
        "policy.run",
        "backup.restore",
        "task.delete",
    } <= actions
    await page.context.close()


async def test_roles_and_projects_hold_in_the_console(
    stack: Stack, console: Console, browser: Any
) -> None:
    """A viewer sees no restore button and the API refuses the restore too; project B's
    session never shows project A's backups; forms without the session's CSRF value, a
    signed-out session and a revoked token change nothing."""
    drv = stack.driver
    server = drv.create_server("app-1", [2 * MIB])
    drv.write(server.id, server.disks[0].id, 0, os.urandom(MIB))
    made = (await stack.cli("backup", "create", server.id, "--wait", "--json")).json()
    backup_id = made["id"] if isinstance(made, dict) else made[0]["id"]
    viewer = await console.token(stack, "viewer")
    stranger = await console.token(stack, "admin", "other")

    page = await new_page(browser, console)
    await sign_in(page, viewer)
    row = page.locator(f"#row-{backup_id}")
    await playwright_api.expect(row).to_contain_text("Available")
    assert await row.locator("[data-action=restore]").count() == 0
    assert await page.locator("[data-action]").count() == 0  # a viewer has no actions at all
    await page.goto(f"/backups/{backup_id}/restore")
    await playwright_api.expect(page.get_by_role("alert")).to_contain_text("needs operator")
    async with httpx.AsyncClient(
        base_url=console.url, headers={"Authorization": f"Bearer {viewer}"}
    ) as api:
        refused = await api.post(f"/v1/backups/{backup_id}/restore", json={})
        assert refused.status_code == 403
    # Nor may a viewer delete, whatever the form says.
    status = await page.evaluate(
        """async (id) => (await fetch('/backups/' + id + '/delete', {method: 'POST',
              body: new URLSearchParams({csrf: 'forged'})})).status""",
        backup_id,
    )
    assert status == 403
    assert stack.catalog.get_backup(backup_id).status == "available"

    other = await new_page(browser, console)
    await sign_in(other, stranger)
    await playwright_api.expect(other.locator("body")).to_contain_text("project other")
    assert backup_id not in await other.content()
    await other.goto(f"/backups?field=id&q={backup_id}")
    assert await other.locator("article.backup").count() == 0
    await other.goto(f"/backups/{backup_id}/restore")
    assert backup_id not in (await other.locator("main").inner_text()).replace(
        f"backup {backup_id} does not exist", ""
    )
    progress = await other.evaluate(
        "async (id) => (await fetch('/console/progress?ids=' + id)).json()", backup_id
    )
    assert progress == {}

    # Signing out ends the session; revoking the token ends the others.
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url(re.compile("/login"))
    await page.goto("/backups")
    await page.wait_for_url(re.compile("/login"))
    token_id = stranger.split("_")[1]
    await stack.cli("token", "revoke", token_id)
    await other.goto("/backups")
    await other.wait_for_url(re.compile("/login"))
    await page.context.close()
    await other.context.close()


async def test_scripts_up_then_back_up_and_restore_the_demo_in_the_browser(
    tmp_path: Path, browser: Any
) -> None:
    """Issue 16, "done when": a new user runs ``scripts/up``, opens the printed URL, signs
    in with the printed token, and backs up and restores the demo server from the browser
    (on ports of its own, beside the test session's servers)."""
    api_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CSBS_", "AWS_"))},
        "CSBS_VAR_DIR": str(tmp_path / "var"),
        "CSBS_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "CSBS_TEMPORAL_UI_URL": f"http://127.0.0.1:{free_port()}",
        "CSBS_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "COLUMNS": "200",
    }

    async def run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 240)
        assert proc.returncode == 0, out.decode()
        return out.decode()

    csbs = [sys.executable, "-m", "starter.cli"]
    try:
        printed = await run(str(ROOT / "scripts" / "up"), "--api-port", str(api_port))
        url = re.search(r"console\s+(http://\S+/)", printed)
        token = re.search(r"^\s+(csbs_tok-\S+)$", printed, re.MULTILINE)
        demo = re.search(r"demo\s+server (srv-\S+) \((disk-[\w-]+)", printed)
        assert url and token and demo, printed
        before = await run(*csbs, "dev", "server", "checksum", demo.group(1))

        page = await browser.new_page(base_url=url.group(1))
        page.set_default_timeout(60_000)
        await page.goto(url.group(1))
        await page.get_by_label("API token").fill(token.group(1))
        await page.get_by_role("button", name="Sign in").click()
        await page.get_by_role("link", name="Servers").click()
        await page.get_by_role("button", name="Back up now: demo").click()
        status = page.locator("article.backup").first.locator("[data-role=status]")
        await playwright_api.expect(status).to_have_text("Available", timeout=120_000)

        await run(*csbs, "dev", "server", "write", demo.group(1), "--disk", demo.group(2),
                  "--offset", "0", "--length", "4MiB")  # fmt: skip
        assert await run(*csbs, "dev", "server", "checksum", demo.group(1)) != before
        await page.locator("article.backup").first.get_by_role("link", name="Restore").click()
        await page.get_by_role("button", name="Restore").click()
        await playwright_api.expect(page.get_by_role("status")).to_contain_text("Restore of")
        await page.get_by_role("link", name="Task status").click()
        for _ in range(120):
            await page.reload()
            restore = page.locator("tr", has_text="Restore").first
            if "Succeeded" in await restore.inner_text():
                break
            assert "Failed" not in await restore.inner_text()
            await asyncio.sleep(0.5)
        assert await run(*csbs, "dev", "server", "checksum", demo.group(1)) == before
        await page.close()
    finally:
        await run(*csbs, "dev", "down")

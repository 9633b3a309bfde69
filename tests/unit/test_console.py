"""The console's pieces that need no browser (issue 16): both languages hold the same
texts and every text a page asks for, the language a request gets, where a sign-in may
send the browser, and the CLI's readable summaries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from starter import summaries
from starter.console import i18n
from starter.console.web import _when, safe_next

CONSOLE = Path(i18n.__file__).resolve().parent


def test_both_languages_hold_every_text_the_pages_use() -> None:
    en, zh = i18n.catalog("en"), i18n.catalog("zh-CN")
    assert set(en) == set(zh)
    used: set[str] = set()
    prefixes: set[str] = set()
    for page in (CONSOLE / "templates").glob("*.html"):
        text = page.read_text()
        used |= set(re.findall(r"""\bt\(\s*["']([\w.]+)["']""", text))
        prefixes |= set(re.findall(r"""\bt\(\s*["']([\w.]+\.)["']\s*~""", text))
    source = "".join((CONSOLE / f).read_text() for f in ("pages.py", "__init__.py", "web.py"))
    used |= set(re.findall(r"""\bt\(\s*["']([\w.]+)["']""", source))
    missing = sorted(k for k in used if k not in en and not k.endswith("."))
    assert missing == []
    # Keys built from a prefix and a value: every value of its enum has its text.
    from csbs.model import BackupKind, BackupStatus, ServerState, TaskKind, TaskStatus

    values = {
        "status.": BackupStatus,
        "kind.": BackupKind,
        "tasks.kind.": TaskKind,
        "tasks.tab.": TaskKind,
        "tasks.status.": TaskStatus,
        "state.": ServerState,
    }
    for prefix, enum in values.items():
        for member in enum:
            assert f"{prefix}{member.value}" in en, (prefix, member)
    assert {p for p in prefixes} <= {*values, "role.", "backups.role.", "backups.field.",
                                     "wd.", "policies.field."}  # fmt: skip


def test_the_guide_terms_are_the_chinese_texts() -> None:
    zh = i18n.catalog("zh-CN")
    for key, term in {
        "app.title": "云主机备份",
        "policies.title": "备份策略",
        "policies.run": "立即备份",
        "status.available": "可用",
        "status.error": "错误",
        "status.delete_failed": "删除失败",
        "status.creating": "创建中",
        "status.restoring": "恢复中",
        "restore.power_on": "恢复后立即启动云主机",
        "tasks.delete_failed": "删除失败任务",
        "policies.bind": "绑定服务器",
    }.items():
        assert zh[key] == term, key
    assert all(isinstance(v, str) and v for v in json.loads(
        (CONSOLE / "locales" / "zh-CN.json").read_text()).values())  # fmt: skip


@pytest.mark.parametrize(
    ("cookie", "header", "lang"),
    [
        (None, None, "en"),
        (None, "zh-CN,zh;q=0.9,en;q=0.8", "zh-CN"),
        (None, "en-US,en;q=0.9,zh-CN;q=0.8", "en"),
        (None, "fr-FR, zh;q=0.5", "zh-CN"),
        (None, "zh-TW,zh-Hant;q=0.9", "en"),
        (None, "de;q=1, en;q=0.2, zh;q=0.7", "zh-CN"),
        ("en", "zh-CN", "en"),
        ("zh-CN", "en", "zh-CN"),
        ("xx", "zh-CN", "zh-CN"),
    ],
)
def test_the_language_is_the_switch_else_the_browser(
    cookie: str | None, header: str | None, lang: str
) -> None:
    assert i18n.choose(cookie, header) == lang


def test_a_sign_in_only_returns_to_this_site() -> None:
    assert safe_next("/policies?x=1") == "/policies?x=1"
    for bad in (None, "", "https://evil.example/", "//evil.example", "/\\evil", "javascript:x"):
        assert safe_next(bad) == "/backups"
    assert _when("2026-11-28T17:05:11.123+00:00") == "2026-11-28 17:05 UTC"
    assert _when(None) == "-"


def test_readable_summaries_of_commands() -> None:
    assert summaries.deleted(
        {"workflow_id": "delete-1", "backup_ids": ["bk-1", "bk-2"], "status": "deleting"}
    ) == [
        "deleting 2 backup(s): bk-1, bk-2",
        "workflow delete-1; follow it with csbs backup list --status deleting",
    ]
    done = summaries.deleted(
        {"deleted": ["bk-1"], "reclaimed": {"bytes_freed": 3 * 1024 * 1024, "chunks_deleted": 3}}
    )
    assert done == ["deleted 1 backup(s): bk-1",
                    "reclaimed 3.0 MiB (3 chunks no backup uses any more)"]  # fmt: skip
    later = summaries.deleted(
        {"deleted": ["bk-1"], "reclaimed": {"deferred": "backups run", "handed_to": "gc-1"}}
    )
    assert later[1] == "storage is reclaimed later by gc-1: backups run"
    run = summaries.policy_run(
        {
            "policy_id": "pol-1",
            "trigger": "manual",
            "backups": {"srv-b": {"backup_id": "bk-2", "outcome": "available"}},
            "skipped": {"srv-a": "skipped: server srv-a had backup x (bk-1) running"},
            "retention": {"expired": []},
        }
    )
    assert run == [
        "policy pol-1 (manual): 1 server(s) backed up",
        "  srv-b: backup bk-2 available",
        "  srv-a: skipped: server srv-a had backup x (bk-1) running",
        "retention: 0 expired backup(s) deleted: none",
    ]
    assert summaries.reconciled({"created": [], "removed": []}) == [
        "every schedule matches its policy: nothing to repair"
    ]
    assert summaries.started("verifying backup bk-1", {"workflow_id": "w", "task_id": "t"},
                             "csbs task show {task}") == [
        "verifying backup bk-1: workflow w, task t", "follow it with csbs task show t"]  # fmt: skip

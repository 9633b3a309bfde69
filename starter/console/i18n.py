"""The console's two languages (issue 16): English and Simplified Chinese, with the guide's
own terms (云主机备份, 备份策略, 立即备份, 可用, 错误, 删除失败, ...).

Every text of a page is a key of ``locales/<lang>.json``; both files hold the same keys (a
test keeps them in step). The language is the ``csbs_lang`` cookie that the switch sets,
else the browser's ``Accept-Language``, else English.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

LANGUAGES = {"en": "English", "zh-CN": "简体中文"}
DEFAULT = "en"
COOKIE = "csbs_lang"
_DIR = Path(__file__).resolve().parent / "locales"


@functools.cache
def catalog(lang: str) -> dict[str, str]:
    """The texts of one language."""
    data: dict[str, str] = json.loads((_DIR / f"{lang}.json").read_text(encoding="utf-8"))
    return data


def choose(cookie: str | None, accept_language: str | None) -> str:
    """The language of a request: the switch's cookie, else the first language of the
    browser's list that the console speaks (any ``zh`` but Traditional is zh-CN)."""
    if cookie in LANGUAGES:
        return cookie
    ranked: list[tuple[float, int, str]] = []
    for i, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        ranked.append((-quality, i, tag.strip().lower()))
    for _, _, tag in sorted(ranked):
        if tag.startswith("zh") and not any(x in tag for x in ("hant", "-tw", "-hk", "-mo")):
            return "zh-CN"
        if tag.startswith("en"):
            return "en"
    return DEFAULT


class Translator:
    """``t(key, **values)`` in one language; a missing key shows as itself (a test makes
    sure none is missing)."""

    def __init__(self, lang: str) -> None:
        self.lang = lang if lang in LANGUAGES else DEFAULT
        self.texts = catalog(self.lang)

    def __call__(self, key: str, **values: object) -> str:
        text = self.texts.get(key) or catalog(DEFAULT).get(key) or key
        return text.format(**values) if values else text

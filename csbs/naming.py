"""Backup names (B7): defaults, user names, descriptions, and numbering of batch requests."""

from __future__ import annotations

import random
import re
import string

#: 1-255 characters: CJK ideographs, ASCII letters, digits, '_' and '-'.
NAME_RE = re.compile(r"^[\u4e00-\u9fff\u3400-\u4dbfA-Za-z0-9_-]{1,255}$")
#: Default name prefix by backup kind (manual, scheduled, policy run by hand).
_PREFIX = {"manual": "manualbk", "scheduled": "autobk", "policy_manual": "backup"}
_ALPHABET = string.ascii_lowercase + string.digits


def default_name(kind: str, rng: random.Random | None = None) -> str:
    """``manualbk_xxxx`` / ``autobk_xxxx`` / ``backup_xxxx`` with four random characters."""
    rng = rng or random.Random()
    return f"{_PREFIX[str(kind)]}_{''.join(rng.choice(_ALPHABET) for _ in range(4))}"


def check_name(name: str, field: str = "name") -> str:
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"{field} must be 1-255 characters of Chinese characters, letters, digits, "
            f"'_' or '-' (got {name!r})"
        )
    return name


def check_description(description: str) -> str:
    if len(description) > 255:
        raise ValueError(f"description must be at most 255 characters (got {len(description)})")
    return description


#: The longest name (B7).
MAX_NAME = 255


def numbered(name: str, index: int, count: int) -> str:
    """Name of the ``index``-th (0-based) backup of a request covering ``count`` servers:
    ``name-0001``, ``name-0002``, ... (B7). A name so long that the suffix would pass 255
    characters is cut to make room for it, never refused."""
    if count <= 1:
        return name
    suffix = f"-{index + 1:04d}"
    return f"{name[: MAX_NAME - len(suffix)]}{suffix}"

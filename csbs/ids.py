"""Ids as people type them (issue 16): the shortest prefix that names one id, the way git
and restic show commit and snapshot ids, and the id a typed prefix names."""

from __future__ import annotations

from collections.abc import Iterable

from csbs.errors import InvalidInput, NotFound

#: Tables never show fewer characters of an id than this.
MIN_PREFIX = 8


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def short_ids(ids: Iterable[str], minimum: int = MIN_PREFIX) -> dict[str, str]:
    """Each id's shortest prefix (at least ``minimum`` characters) that no other id of
    ``ids`` begins with; an id that is a prefix of another stays whole."""
    ordered = sorted(set(ids))
    out: dict[str, str] = {}
    for i, current in enumerate(ordered):
        need = 0
        if i > 0:
            need = max(need, _common(current, ordered[i - 1]) + 1)
        if i + 1 < len(ordered):
            need = max(need, _common(current, ordered[i + 1]) + 1)
        out[current] = current[: max(minimum, need)]
    return out


def resolve(kind: str, given: str, candidates: Iterable[str]) -> str:
    """The one id of ``candidates`` that is ``given`` or begins with it; NotFound when
    none does, InvalidInput naming a few when several do."""
    ids = sorted(set(candidates))
    if given in ids:
        return given
    matches = [i for i in ids if i.startswith(given)] if given else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFound(f"{kind} {given} does not exist")
    shown = ", ".join(matches[:3]) + (", ..." if len(matches) > 3 else "")
    raise InvalidInput(
        f"{kind} id {given} is ambiguous: {len(matches)} ids begin with it ({shown}); "
        f"give more of it"
    )

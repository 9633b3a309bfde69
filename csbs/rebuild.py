"""Rebuild the catalog from storage alone (issue 17): every backup of a project from its
descriptor and manifests, every policy and its servers from its copy in the bucket.

The repository is the truth about what exists; the catalog indexes it. ``rebuild``
reads one project's repository (the primary's, or the replica's) and compares it with
the catalog: a backup or policy the catalog lacks is added (with ``apply``), one it
holds differently is reported, never changed (the live catalog knows things storage does
not: a restore under way, a verification), and one it holds that storage lacks is
reported too. Running it twice adds nothing the second time.
"""

from __future__ import annotations

from pydantic import BaseModel

from csbs.catalog import BackupRow, Catalog, DiskBackupRow
from csbs.catalog.policies import PolicyCatalog
from csbs.catalog.rows import BindingRow, PolicyRow, utcnow
from csbs.chunkstore import ChunkStore
from csbs.errors import CsbsError
from csbs.format import BackupDescriptor, PolicyCopy, chunk_count
from csbs.locks import as_utc
from csbs.model import BackupStatus
from csbs.policy import PolicySpec


class Difference(BaseModel):
    """One way the catalog and the repository disagree."""

    kind: str  # backup | policy | binding
    id: str
    #: missing (storage has it, the catalog not), differs, or not_in_storage
    problem: str
    detail: str


class RebuildReport(BaseModel):
    """What a rebuild of one project found, and what it added."""

    project: str
    source: str
    applied: bool
    backups_found: int = 0
    backups_added: int = 0
    disks_added: int = 0
    policies_found: int = 0
    policies_added: int = 0
    bindings_added: int = 0
    unreadable: list[str] = []
    differences: list[Difference] = []


def backup_rows(
    descriptor: BackupDescriptor, store: ChunkStore, on_replica: bool
) -> tuple[BackupRow, list[DiskBackupRow]]:
    """The catalog rows a committed backup's descriptor and manifests describe. A disk
    whose manifest cannot be read makes the backup ``error`` with the reason (it could
    not be restored)."""
    problems: list[str] = []
    disks: list[DiskBackupRow] = []
    for disk in descriptor.disks:
        chunks = chunk_count(disk.size_bytes, descriptor.chunk_size)
        try:
            manifest = store.get_manifest(descriptor.backup_id, disk.disk_id)
            if manifest.size_bytes != disk.size_bytes:
                problems.append(
                    f"manifest of disk {disk.disk_id} says {manifest.size_bytes} bytes, the "
                    f"descriptor {disk.size_bytes}"
                )
        except CsbsError as exc:
            problems.append(f"manifest of disk {disk.disk_id} cannot be read ({exc})")
        disks.append(
            DiskBackupRow(
                backup_id=descriptor.backup_id,
                disk_id=disk.disk_id,
                disk_name=disk.name,
                role=disk.role,
                size_bytes=disk.size_bytes,
                data_bytes=disk.data_bytes,
                stored_bytes=disk.stored_bytes or 0,
                chunks_total=chunks,
                progress=100,
                done=True,
                read_note="rebuilt from storage",
            )
        )
    created = as_utc(descriptor.created_at)
    row = BackupRow(
        id=descriptor.backup_id,
        project=descriptor.project,
        name=descriptor.name,
        description=descriptor.description,
        server_id=descriptor.server.id,
        server_name=descriptor.server.name,
        server_type=descriptor.server.type,
        status=(BackupStatus.ERROR if problems else BackupStatus.AVAILABLE).value,
        kind=descriptor.kind,
        policy_id=descriptor.policy_id,
        parent_id=descriptor.parent_id,
        created_at=created,
        snapshot_at=as_utc(descriptor.snapshot_at) if descriptor.snapshot_at else None,
        finished_at=as_utc(descriptor.finished_at) if descriptor.finished_at else created,
        progress=100,
        size_bytes=sum(d.size_bytes for d in disks),
        data_bytes=sum(d.data_bytes for d in disks),
        stored_bytes=sum(d.stored_bytes for d in disks),
        error=("rebuilt from storage: " + "; ".join(problems)) if problems else None,
        locked_until=as_utc(descriptor.locked_until) if descriptor.locked_until else None,
        replica_status="replicated" if on_replica else "",
        replicated_at=utcnow() if on_replica else None,
    )
    return row, disks


#: Fields of a backup compared with the catalog's (what storage knows for sure).
_COMPARED = ("name", "server_id", "parent_id", "policy_id", "kind", "size_bytes")


def _differs(stored: BackupRow, live: BackupRow) -> list[str]:
    out = [
        f"{f}: catalog {getattr(live, f)!r}, storage {getattr(stored, f)!r}"
        for f in _COMPARED
        if getattr(live, f) != getattr(stored, f)
    ]
    if as_utc(live.created_at) != as_utc(stored.created_at):
        out.append(f"created_at: catalog {live.created_at}, storage {stored.created_at}")
    return out


def rebuild(
    catalog: Catalog, store: ChunkStore, apply: bool = False, on_replica: bool = False
) -> RebuildReport:
    """Compare one project's catalog with its repository; with ``apply``, add what the
    catalog lacks (backups with their disks, policies with their servers)."""
    report = RebuildReport(
        project=catalog.project, source="replica" if on_replica else "primary", applied=apply
    )
    found: dict[str, tuple[BackupRow, list[DiskBackupRow]]] = {}
    for backup_id in store.backup_ids():
        try:
            descriptor = store.get_descriptor(backup_id)
        except CsbsError as exc:
            report.unreadable.append(f"backup {backup_id}: {exc}")
            continue
        if descriptor.project != catalog.project:
            report.unreadable.append(
                f"backup {backup_id}: its descriptor names project {descriptor.project}"
            )
            continue
        found[backup_id] = backup_rows(descriptor, store, on_replica)
    report.backups_found = len(found)
    live = {b.id: b for b in catalog.list_backups()}
    add: list[tuple[BackupRow, list[DiskBackupRow]]] = []
    # Parents first, so that every added backup's parent is there before it.
    for row, disks in sorted(found.values(), key=lambda rd: as_utc(rd[0].created_at)):
        current = live.get(row.id)
        if current is None:
            report.differences.append(
                Difference(
                    kind="backup",
                    id=row.id,
                    problem="missing",
                    detail=f"{row.name} of server {row.server_id}, {row.created_at:%Y-%m-%d %H:%M} "
                    f"UTC, {len(disks)} disk(s)" + (f": {row.error}" if row.error else ""),
                )
            )
            add.append((row, disks))
            continue
        changed = _differs(row, current)
        if changed:
            report.differences.append(
                Difference(kind="backup", id=row.id, problem="differs", detail="; ".join(changed))
            )
    for backup_id, current in live.items():
        if backup_id not in found and current.status in (
            BackupStatus.AVAILABLE.value,
            BackupStatus.RESTORING.value,
        ):
            report.differences.append(
                Difference(
                    kind="backup",
                    id=backup_id,
                    problem="not_in_storage",
                    detail=f"the catalog has {current.name} ({current.status}), the "
                    f"{report.source} repository has no descriptor for it",
                )
            )
    policies, bindings = _policies(catalog, store, report)
    if apply:
        with catalog.unit_of_work():
            for row, disks in add:
                catalog.add_backup(row)
                for disk in disks:
                    catalog.upsert_disk_backup(disk)
                report.backups_added += 1
                report.disks_added += len(disks)
            book = PolicyCatalog(catalog)
            for policy in policies:
                book.add(policy)
                report.policies_added += 1
            for binding in bindings:
                book.bind(binding.policy_id, [binding.server_id])
                report.bindings_added += 1
    return report


def _policies(
    catalog: Catalog, store: ChunkStore, report: RebuildReport
) -> tuple[list[PolicyRow], list[BindingRow]]:
    """The policies (and bindings) in storage that the catalog lacks."""
    book = PolicyCatalog(catalog)
    live = {p.id: p for p in book.all()}
    bound = {b.server_id: b.policy_id for b in book.bindings()}
    new_policies: list[PolicyRow] = []
    new_bindings: list[BindingRow] = []
    ids = store.policy_ids()
    report.policies_found = len(ids)
    for policy_id in ids:
        try:
            copy = store.get_policy(policy_id)
            spec = PolicySpec.model_validate({**copy.spec, "name": copy.name})
        except (CsbsError, ValueError) as exc:
            report.unreadable.append(f"policy {policy_id}: {exc}")
            continue
        if policy_id in live:
            if live[policy_id].name != copy.name or live[policy_id].enabled != copy.enabled:
                report.differences.append(
                    Difference(
                        kind="policy",
                        id=policy_id,
                        problem="differs",
                        detail=f"catalog {live[policy_id].name!r} (enabled "
                        f"{live[policy_id].enabled}), storage {copy.name!r} (enabled "
                        f"{copy.enabled})",
                    )
                )
        else:
            report.differences.append(
                Difference(
                    kind="policy",
                    id=policy_id,
                    problem="missing",
                    detail=f"{copy.name}, {len(copy.server_ids)} server(s) bound",
                )
            )
            new_policies.append(_policy_row(copy, spec))
        for server_id in copy.server_ids:
            if server_id in bound:
                if bound[server_id] != policy_id:
                    report.differences.append(
                        Difference(
                            kind="binding",
                            id=server_id,
                            problem="differs",
                            detail=f"bound to {bound[server_id]} in the catalog, to "
                            f"{policy_id} in storage",
                        )
                    )
                continue
            bound[server_id] = policy_id
            new_bindings.append(
                BindingRow(
                    server_id=server_id,
                    policy_id=policy_id,
                    project=copy.project,
                    bound_at=utcnow(),
                )
            )
    return new_policies, new_bindings


def _policy_row(copy: PolicyCopy, spec: PolicySpec) -> PolicyRow:
    return PolicyRow(
        id=copy.id,
        project=copy.project,
        name=copy.name,
        enabled=copy.enabled,
        spec=spec.model_dump_json(),
        created_at=as_utc(copy.created_at),
        updated_at=as_utc(copy.updated_at),
    )


def projects_in(store: ChunkStore) -> list[str]:
    """The projects with a repository (a ``config.json``) under the store's prefix."""
    return [p for p in store.sibling_projects() if store.has_config(p)]

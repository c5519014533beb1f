"""Garbage collection: blobs no commit references (left by deleted repos, abandoned uploads) and
snapshot folders of commits that no longer exist.

Safe while the store is being written, by a server or a local push. ``find_garbage`` lists the
candidates without any lock: unreferenced blobs last written (or claimed by a writer) before
``started - min_age_s``. ``delete_garbage`` then takes the store's lease exclusively, so it waits
for every write in flight to record or abandon its commit and keeps new ones from staging, and
deletes a candidate only if it is still unreferenced and still that old. So it never deletes a
blob written or claimed after the collection started, nor one a commit in flight references; the
age margin also spares LFS objects uploaded shortly before the commit that will reference them.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from quiver.fs import fsync_dir
from quiver.store.engine import RepoStore

DEFAULT_MIN_AGE_S = 3600.0


@dataclass
class Garbage:
    """What a collection found (and, after ``delete_garbage``, removed)."""

    started: float
    cutoff: float
    blobs: dict[Path, int] = field(default_factory=dict)  # path -> size in bytes
    snapshots: list[Path] = field(default_factory=list)
    deleted: bool = False

    @property
    def blob_bytes(self) -> int:
        return sum(self.blobs.values())


def find_garbage(store: RepoStore, *, min_age_s: float = DEFAULT_MIN_AGE_S) -> Garbage:
    """The unreferenced blobs older than ``min_age_s`` and the orphaned snapshot folders."""
    started = time.time()
    garbage = Garbage(started, started - min_age_s)
    referenced = store.referenced_blobs()
    for blob in sorted(store.blobs.root.glob("??/*")):
        if blob.name not in referenced and _older_than(blob, garbage.cutoff):
            garbage.blobs[blob] = blob.stat().st_size
    commits = store.commit_shas()
    garbage.snapshots = [d for d in sorted(store.snapshots.iterdir()) if d.name not in commits]
    return garbage


def delete_garbage(store: RepoStore, garbage: Garbage) -> Garbage:
    """Delete what ``find_garbage`` found, once no write is in flight; return what went."""
    with store.blobs.lease(exclusive=True):
        referenced = store.referenced_blobs()
        blobs = {
            blob: size
            for blob, size in garbage.blobs.items()
            if blob.name not in referenced and _older_than(blob, garbage.cutoff)
        }
        for blob in blobs:
            blob.unlink()
        for folder in {blob.parent for blob in blobs}:
            fsync_dir(folder)
        commits = store.commit_shas()
        snapshots = [d for d in garbage.snapshots if d.name not in commits]
        for snapshot in snapshots:
            shutil.rmtree(snapshot, ignore_errors=True)
        store.blobs.sweep_tmp_locked()
    return Garbage(garbage.started, garbage.cutoff, blobs, snapshots, deleted=True)


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False

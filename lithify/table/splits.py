"""Split and merge of tablets as pure metadata transformations, using fences.

Neither rewrites data: after a split both children refer to the parent's files, each fenced to its
own rows; a merge gives the joined tablet every file of its parts, fenced to the part it came from
(adjacent fences of one file are joined again). The caller flushes the tablets and cancels their
compactions first, so no log or running compaction has to be carried over.
"""

from __future__ import annotations

from collections.abc import Sequence

from lithify.data.ranges import Extent, FileRef, RowRange
from lithify.metadata.store import TabletMeta


def fence_to(f: FileRef, rng: RowRange) -> FileRef | None:
    """`f` fenced to `rng`, or None when nothing of it can be inside."""
    fence = f.fence.intersect(rng)
    if fence.is_empty():
        return None
    return FileRef(f.path, f.size, f.entries, fence)


def split_tablet(meta: TabletMeta, points: Sequence[bytes]) -> list[TabletMeta]:
    """Children of `meta` split at the given rows (those strictly inside its extent)."""
    ext = meta.extent
    inner = sorted({p for p in points if ext.contains(p) and p != ext.end_row})
    bounds = [ext.prev_end_row, *inner, ext.end_row]
    children = []
    for prev, end in zip(bounds, bounds[1:], strict=False):
        child = Extent(ext.table_id, prev, end)
        files = tuple(x for f in meta.files if (x := fence_to(f, child.range)) is not None)
        children.append(
            meta.replace(extent=child, files=files, logs=(), compactions={}, selection=None)
        )
    return children


def merge_tablets(metas: Sequence[TabletMeta]) -> TabletMeta:
    """One tablet covering the adjacent tablets `metas` (in row order)."""
    first, last = metas[0], metas[-1]
    for a, b in zip(metas, metas[1:], strict=False):
        if a.extent.end_row != b.extent.prev_end_row:
            raise ValueError(f"tablets {a.extent} and {b.extent} are not adjacent")
    files: list[FileRef] = []
    for m in metas:
        files += [x for f in m.files if (x := fence_to(f, m.extent.range)) is not None]
    extent = Extent(first.extent.table_id, first.extent.prev_end_row, last.extent.end_row)
    return first.replace(
        extent=extent,
        files=tuple(coalesce_fences(files)),
        logs=(),
        compactions={},
        selection=None,
        flushed_seq=max(m.flushed_seq for m in metas),
        time=max(m.time for m in metas),
    )


def coalesce_fences(files: Sequence[FileRef]) -> list[FileRef]:
    """Join references to one file whose fences touch, so a merge undoes a split."""
    out: list[FileRef] = []
    ordered = sorted(files, key=lambda f: (f.path, f.fence.start is not None, f.fence.start or b""))
    for f in ordered:
        prev = out[-1] if out else None
        if (
            prev is not None
            and prev.path == f.path
            and prev.fence.end is not None
            and prev.fence.end == f.fence.start
            and prev.fence.end_inclusive != f.fence.start_inclusive
        ):
            out[-1] = FileRef(
                f.path,
                f.size,
                f.entries,
                RowRange(
                    prev.fence.start, f.fence.end, prev.fence.start_inclusive, f.fence.end_inclusive
                ),
            )
        else:
            out.append(f)
    return out

"""Job priorities and the order of a compaction queue.

A priority is a 16-bit signed number; higher runs first. The number space is cut into bands so
that a whole class of work always outranks another, whatever the tablet sizes:

* `[18768, 20767]`: system compactions of tablets over `table.file.max` (scans are suffering and
  writes will soon be held back, so these come first);
* `[1, 18767]`: user compactions (someone is waiting for them);
* `[-32768, 0]`: routine system compactions.

Within a band, a tablet with more files, and a job that removes more files, ranks higher.
Values above 20767 are left for the store's own internal tables, should it ever have any.

Fix 2 (against Accumulo 2.1 and 4.0): the over-size band applies only when the tablet really has
more files than `table.file.max`. Accumulo passes 0 as the limit on its normal path and so puts
every routine system compaction in that band, which starves user compactions.
"""

from __future__ import annotations

from lithify.compaction.spi import CompactionJob, CompactionKind

PRIORITY_MIN = -32768
PRIORITY_MAX = 32767

SYSTEM_MIN = -32768
SYSTEM_MAX = 0
USER_MIN = 1
USER_MAX = 18767
OVERSIZE_MIN = 18768
OVERSIZE_MAX = 20767


def _clamp(value: int, low: int, high: int) -> int:
    return low if value < low else high if value > high else value


def user_priority(total_files: int, job_files: int) -> int:
    """A user compaction's priority: `min(18767, 1 + |all| + |job|)`."""
    return _clamp(USER_MIN + total_files + job_files, USER_MIN, USER_MAX)


def system_priority(total_files: int, job_files: int, table_file_max: int) -> int:
    """A system compaction's priority; `table_file_max` must already have its `<= 0` rule applied.

    Over the limit: `min(20767, 18768 + |job| + (|all| - table.file.max))`; otherwise
    `min(0, -32768 + |all| + |job|)`.
    """
    if total_files > table_file_max:
        value = OVERSIZE_MIN + job_files + (total_files - table_file_max)
        return _clamp(value, OVERSIZE_MIN, OVERSIZE_MAX)
    return _clamp(SYSTEM_MIN + total_files + job_files, SYSTEM_MIN, SYSTEM_MAX)


def job_priority(
    kind: CompactionKind, total_files: int, job_files: int, table_file_max: int
) -> int:
    """The priority of a job of `kind` merging `job_files` of a tablet's `total_files` files."""
    if kind == CompactionKind.USER:
        return user_priority(total_files, job_files)
    return system_priority(total_files, job_files, table_file_max)


def queue_order_key(priority: int, num_files: int, created: float) -> tuple[int, int, float]:
    """Sort key of queued jobs: priority descending, then more files first, then oldest first.

    `created` is any increasing stamp of when the job was queued (a clock or a counter).
    """
    return (-priority, -num_files, created)


def job_order_key(job: CompactionJob, created: float) -> tuple[int, int, float]:
    """`queue_order_key` of a job queued at `created`."""
    return (-job.priority, -len(job.files), created)

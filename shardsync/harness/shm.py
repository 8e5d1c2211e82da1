"""Which colocated shared-memory segments processes map, read from /proc.

The colocated method's CPU buffers are tmpfs files unlinked at creation, so they never
show in /dev/shm; a leak shows as a segment still mapped by some process after its
producer is gone, or as a count that grows. Each segment is one (device, inode) pair.
"""

from __future__ import annotations

from pathlib import Path

from shardsync.runtime.wire.shared import SHM_DIR, SHM_PREFIX


def mapped_segments(pid: int | str = "self") -> set[tuple[str, int]]:
    """The colocated segments process `pid` maps now (empty if it is gone)."""
    segments = set()
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return segments
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(f"{SHM_DIR}/{SHM_PREFIX}"):
            segments.add((fields[3], int(fields[4])))
    return segments


def named_segments() -> list[str]:
    """Colocated segment files still in /dev/shm by name (there should be none)."""
    directory = Path(SHM_DIR)
    return sorted(p.name for p in directory.glob(f"{SHM_PREFIX}*")) if directory.is_dir() else []

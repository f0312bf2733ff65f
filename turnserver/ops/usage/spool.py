"""The on-disk spool usage records wait in until every sink has them.

A directory of segment files (`000000000001.jsonl`, ...), one JSON record a line,
appended with one write() per batch (what reached the kernel survives the process's
death). Each sink keeps a cursor (segment, offset) in `cursor-<sink>`, replaced
atomically after each delivery: a record is delivered at least once, and again only
when the process died between delivering and moving the cursor (records carry ids;
receivers deduplicate). A segment every sink has passed is deleted. The spool's size is
known without listing the directory (it is counted as it changes).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

SEGMENT_BYTES = 4 * 2**20  # a new segment past this size
SUFFIX = ".jsonl"


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """Where a sink has read up to: a segment and a byte offset in it."""

    segment: int
    offset: int


@dataclass(slots=True)
class Batch:
    """Whole lines read from the spool, and the cursor past them."""

    lines: list[bytes]
    end: Cursor


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Spool:
    """One process's spool directory (see the module docstring)."""

    def __init__(self, directory: str, sinks: tuple[str, ...]) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.sinks = sinks
        segments = self.segments()
        self.current = segments[-1] if segments else 1
        self.size = sum(self._segment_size(n) for n in segments)
        self._fd = -1
        self._fd_size = 0
        self.cursors = {name: self._load_cursor(name, segments) for name in sinks}
        # every sink had everything and the next segment was never made: write there
        self.current = max(self.current, *(c.segment for c in self.cursors.values()))

    # ---- layout --------------------------------------------------------------------

    def path(self, segment: int) -> str:
        return os.path.join(self.directory, f"{segment:012d}{SUFFIX}")

    def segments(self) -> list[int]:
        out = []
        for name in os.listdir(self.directory):
            stem = name.removesuffix(SUFFIX)
            if name.endswith(SUFFIX) and stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def _segment_size(self, segment: int) -> int:
        try:
            return os.path.getsize(self.path(segment))
        except OSError:
            return 0

    def _load_cursor(self, sink: str, segments: list[int]) -> Cursor:
        first = Cursor(segments[0] if segments else self.current, 0)
        try:
            with open(os.path.join(self.directory, f"cursor-{sink}"), encoding="ascii") as fh:
                segment, offset = (int(x) for x in fh.read().split())
        except (OSError, ValueError):
            return first  # a new sink starts at the oldest record kept
        return max(Cursor(segment, offset), first)

    # ---- writing -------------------------------------------------------------------

    def append(self, data: bytes) -> None:
        """Append whole lines (one write: all of it reaches the kernel, or raises)."""
        if self._fd < 0 or self._fd_size >= SEGMENT_BYTES:
            self._open_next()
        written = os.write(self._fd, data)
        while written < len(data):  # a short write to a regular file: disk full, say
            more = os.write(self._fd, data[written:])
            if more <= 0:
                break
            written += more
        self._fd_size += written
        self.size += written

    def _open_next(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self.current += 1
        path = self.path(self.current)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._fd_size = os.fstat(self._fd).st_size
        if self._fd_size >= SEGMENT_BYTES:  # a full segment of an earlier run
            os.close(self._fd)
            self._fd = -1
            self.current += 1
            self._open_next()

    def _start_over(self) -> None:
        os.close(self._fd)
        self._fd = -1
        done, self.current = self.current, self.current + 1
        for name in self.cursors:
            self.cursors[name] = Cursor(self.current, 0)
            _write_atomic(os.path.join(self.directory, f"cursor-{name}"), b"%d 0\n" % self.current)
        for segment in self.segments():
            if segment <= done:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path(segment))
        self.size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ---- reading -------------------------------------------------------------------

    def read(self, sink: str, max_lines: int, max_bytes: int = 2**20) -> Batch:
        """Whole lines after the sink's cursor (none when it has read everything)."""
        cursor = self.cursors[sink]
        lines: list[bytes] = []
        size = 0
        segment, offset = cursor.segment, cursor.offset
        while len(lines) < max_lines and size < max_bytes:
            budget = max_bytes - size
            try:
                with open(self.path(segment), "rb") as fh:
                    fh.seek(offset)
                    data = fh.read(budget)
            except FileNotFoundError:
                data = b""
            end = data.rfind(b"\n") + 1  # whole lines only
            full = False
            for line in data[:end].splitlines(keepends=True):
                if len(lines) >= max_lines:
                    full = True
                    break
                if line.strip():
                    lines.append(line.rstrip(b"\n"))
                offset += len(line)
                size += len(line)
            if full or end < len(data) or len(data) == budget or segment >= self.current:
                break  # a full batch, or a line still being written, or the newest
            segment, offset = segment + 1, 0  # the writer has moved past this one
        return Batch(lines, Cursor(segment, offset))

    def pending(self, sink: str) -> int:
        """Bytes the sink has not read yet."""
        cursor = self.cursors[sink]
        total = 0
        for segment in range(cursor.segment, self.current + 1):
            total += self._segment_size(segment)
        return max(0, total - cursor.offset)

    def advance(self, sink: str, cursor: Cursor) -> None:
        """The sink has the records before `cursor`: remember it, drop what all have."""
        self.cursors[sink] = cursor
        _write_atomic(
            os.path.join(self.directory, f"cursor-{sink}"),
            f"{cursor.segment} {cursor.offset}\n".encode(),
        )
        if self._fd >= 0 and all(
            c == Cursor(self.current, self._fd_size) for c in self.cursors.values()
        ):  # every sink has everything: start a new segment, drop this one
            self._start_over()
            return
        oldest = min(c.segment for c in self.cursors.values())
        for segment in self.segments():
            if segment >= oldest or segment >= self.current:
                break
            self.size -= self._segment_size(segment)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(segment))
        self.size = max(0, self.size)

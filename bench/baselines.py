"""Plain-Python baselines that the engine is compared against in the same run.

They do the least a framed log must do: a struct header per record and a buffered write,
then the reverse. No checksums, no index, no recovery: a floor for overhead, not a peer.
"""

from __future__ import annotations

import os
import struct

FRAME = struct.Struct("<QI")  # offset, length


class FramedWriter:
    def __init__(self, path: str) -> None:
        self.file = open(path, "wb", buffering=1 << 20)  # noqa: SIM115
        self.offset = 0

    def append_batch(self, records: list[bytes]) -> int:
        first = self.offset
        write = self.file.write
        for record in records:
            write(FRAME.pack(self.offset, len(record)))
            write(record)
            self.offset += 1
        return first

    def close(self) -> None:
        self.file.close()


def framed_read(data: bytes, pos: int, count: int) -> tuple[int, list[memoryview]]:
    """Decode count records from pos; return the next position and the payloads."""
    view = memoryview(data)
    out = []
    unpack = FRAME.unpack_from
    for _ in range(count):
        _, length = unpack(data, pos)
        pos += FRAME.size
        out.append(view[pos : pos + length])
        pos += length
    return pos, out


def raw_durable_write(fd: int, chunk: bytes) -> None:
    """One write and one fdatasync: the floor for a durable append of chunk."""
    os.write(fd, chunk)
    os.fdatasync(fd)

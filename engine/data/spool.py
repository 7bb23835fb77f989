"""Tokenized rows written to disk as they come and read back memory-mapped.

A prepared dataset is the biggest thing the pipeline builds (4 bytes a token id, 1 a mask flag,
the conversation's text). Built in memory, it grows with the rows; written batch by batch to an
Arrow file and mapped back, it costs page cache the system can take back, not the process's
own memory. The file is unlinked as soon as it is mapped (the mapping stays valid, and an open
descriptor lets the cache copy it in the kernel without reading it in), so nothing is left
behind whatever happens to the run.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

__all__ = ["Spool", "write_rows"]


class Spool:
    """Appends Arrow record batches of one schema to a temporary file; :meth:`read` maps them back."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.sink: Any = None
        self.writer: Any = None
        self.fd: int | None = None  # the file, kept open once unlinked: what :meth:`copy_to` reads
        self._left: Any = None

    def write(self, columns: dict[str, Any]) -> None:
        import pyarrow as pa

        self.write_batch(pa.RecordBatch.from_pydict(columns))

    def write_batch(self, batch: Any) -> None:
        import pyarrow as pa

        if self.writer is None:
            # The system's temporary folder ($TMPDIR): the data cache may be read-only or off.
            fd, self.path = tempfile.mkstemp(prefix="sft-rows-", suffix=".arrow")
            os.close(fd)
            # Deleted with the spool or at exit if never read back (a bad row stopped the pipeline midway).
            self._left = weakref.finalize(self, _unlink, self.path)
            self.sink = pa.OSFile(self.path, "wb")
            # The stream format: what `datasets` maps (datasets.table.MemoryMappedTable), so the cache
            # entry is this file as it is.
            self.writer = pa.ipc.new_stream(self.sink, batch.schema)
        self.writer.write_batch(batch)

    def read(self) -> Any:
        """The batches written, as one memory-mapped ``pyarrow.Table`` (None when nothing was written)."""
        import pyarrow as pa

        if self.writer is None:
            return None
        self.writer.close()
        self.sink.close()
        assert self.path is not None
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            return pa.ipc.open_stream(pa.memory_map(self.path)).read_all()
        finally:
            self._left()  # mapped: the data stays readable until the table is gone

    def copy_to(self, dest: Path) -> None:
        """The file :meth:`read` mapped, copied to ``dest`` by the kernel (nothing of it read into this process)."""
        assert self.fd is not None, "read() first"
        size = os.fstat(self.fd).st_size
        with open(dest, "wb") as out:
            done = 0
            while done < size:
                sent = os.sendfile(out.fileno(), self.fd, done, size - done)
                if not sent:
                    raise OSError(f"copying the prepared rows to {dest} stopped at byte {done} of {size}")
                done += sent

    def __del__(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # gone already, or a system that cannot unlink an open file: it stays in the temporary folder


def write_rows(dest: Path, table: Any) -> None:
    """``table`` as an Arrow stream file at ``dest`` (the format :class:`Spool` writes)."""
    import pyarrow as pa

    with pa.OSFile(str(dest), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)

"""Tokenized rows written to disk as they come and read back memory-mapped.

A prepared dataset is the biggest thing the pipeline builds (4 bytes a token id, 1 a mask flag,
the conversation's text). Built in memory, it grows with the rows; written batch by batch to an
Arrow file and mapped back, it costs page cache the system can take back, not the process's
own memory. The file is unlinked as soon as it is mapped (the mapping stays valid), so nothing
is left behind whatever happens to the run; the cache stores its own copy.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

__all__ = ["Spool"]


class Spool:
    """Appends Arrow record batches of one schema to a temporary file; :meth:`read` maps them back."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.sink: Any = None
        self.writer: Any = None

    def write(self, columns: dict[str, Any]) -> None:
        import pyarrow as pa

        self.write_batch(pa.RecordBatch.from_pydict(columns))

    def write_batch(self, batch: Any) -> None:
        import pyarrow as pa

        if self.writer is None:
            # The system's temporary folder ($TMPDIR): the data cache may be read-only or off.
            fd, self.path = tempfile.mkstemp(prefix="sft-rows-", suffix=".arrow")
            os.close(fd)
            self.sink = pa.OSFile(self.path, "wb")
            self.writer = pa.ipc.new_file(self.sink, batch.schema)
        self.writer.write_batch(batch)

    def read(self) -> Any:
        """The batches written, as one memory-mapped ``pyarrow.Table`` (None when nothing was written)."""
        import pyarrow as pa

        if self.writer is None:
            return None
        self.writer.close()
        self.sink.close()
        try:
            return pa.ipc.open_file(pa.memory_map(self.path)).read_all()
        finally:
            try:
                os.unlink(self.path)  # mapped: the data stays readable until the table is gone
            except OSError:
                pass  # a system that cannot unlink an open file leaves it in the temporary folder

"""Errors raised while reading and encoding training data.

`DataError` is what users see: one line naming the file, the line (JSONL) or record index (JSON
list) and the reason, e.g. ``gsm8k.jsonl:17: field 'answer' is missing``. Code that only knows about
one record (validation, templating, `encode_record`) raises `RecordError` with the reason alone; the
reader that knows where the record came from re-raises it with `RecordError.at(...)`. Records read from
Parquet/Arrow files are located by their 0-based row in the file (``train-00000.parquet[17]: ...``).
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad training data. `str(err)` is ``"<path>:<line>: <reason>"`` (JSONL),
    ``"<path>[<index>]: <reason>"`` (JSON list, 0-based index), or ``"<path>: <reason>"`` (whole file)."""

    def __init__(self, reason: str, path: str | None = None, line: int | None = None,
                 index: int | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.line = line
        self.index = index
        super().__init__(self._format())

    def _format(self) -> str:
        if self.path is None:
            return self.reason
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
        elif self.index is not None:
            where += f"[{self.index}]"
        return f"{where}: {self.reason}"

    def __reduce__(self):  # keep the structured fields when pickled (e.g. by multiprocessing)
        return (type(self), (self.reason, self.path, self.line, self.index))


class RecordError(DataError):
    """One record is bad; carries only the reason until the reader adds where it came from."""

    def at(self, path: str, line: int | None = None, index: int | None = None) -> "RecordError":
        return RecordError(self.reason, path=path, line=line, index=index)

    def within(self, part: str | None) -> "RecordError":
        """The same error located inside a record (``part`` e.g. ``instances[2]``, the element of a list
        exploded by the field mapping); unchanged when there is no part or the reason names it already."""
        if not part or part in self.reason:
            return self
        return RecordError(f"{part}: {self.reason}", path=self.path, line=self.line, index=self.index)

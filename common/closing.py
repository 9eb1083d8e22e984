"""`with thing:` for what holds a resource until its `close()`: a store, a connection, a process."""

from __future__ import annotations

from typing import Self


class Closeable:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

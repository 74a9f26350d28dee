"""Objects that hold memory, fds or threads and give them back in ``close()``: a ``with``
block closes them too."""
from __future__ import annotations


class Closing:
    """``with obj: ...`` calls ``obj.close()`` at the end, whatever happened."""

    def close(self) -> None:                 # pragma: no cover - every user defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

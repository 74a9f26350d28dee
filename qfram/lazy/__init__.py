"""Guest RAM that fills itself: lazy restore (the fault server fed from a snapshot) and
dirty-only reset back to the snapshot."""
from qfram.lazy.reset import Resettable
from qfram.lazy.restore import LazyRestore

__all__ = ["LazyRestore", "Resettable"]

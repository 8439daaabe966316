"""The native engine's old import path; the engine lives in `instance/backends/native.py`."""

from instance.backends.native import Engine

__all__ = ["Engine"]

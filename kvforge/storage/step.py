"""Placeholder, replaced below."""
from typing import NamedTuple
class StepBatch(NamedTuple):
    pass

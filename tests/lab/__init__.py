"""The network-namespace lab (see lab.py): `python -m tests.lab up|down|status --workdir DIR`."""

from .lab import Lab, LabError, LabHost

__all__ = ["Lab", "LabError", "LabHost"]

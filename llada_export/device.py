"""Device names from the command line, checked before any work: ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations


class DeviceError(ValueError):
    """A device that does not exist here."""


def parse_device(name: str):
    """``name`` -> ``torch.device``, or :class:`DeviceError` naming what is wrong (unknown type,
    no CUDA GPU visible, GPU index out of range)."""
    import torch

    text = str(name).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise DeviceError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: no CUDA GPU is visible on this machine (use --device cpu)")
        n = torch.cuda.device_count()
        if index and int(index) >= n:
            raise DeviceError(f"device {name!r}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    return torch.device(text)

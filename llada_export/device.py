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


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e``, or an exception it was raised from, is an allocation failure: torch's (CPU or CUDA,
    also as the text of a wrapper's message, e.g. Inductor's "Failed to run autotuning code block: CUDA
    out of memory") or Python's."""
    import torch

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text \
                or "can't allocate memory" in text:
            return True
        e = e.__cause__ or e.__context__
    return False

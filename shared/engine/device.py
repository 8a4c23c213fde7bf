"""Device helpers: the device always comes from configuration, never from code.

`torch_npu` is imported lazily and only when an `npu` device is asked for.
"""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype: unknown dtype {name!r}") from None


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda[:N]`, `npu[:N]` -> torch.device; raises ValueError if it is not usable here."""
    kind = name.partition(":")[0]
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401  (registers the npu backend)
        except ImportError as exc:
            raise ValueError("device: npu needs the optional torch_npu package") from exc
    elif kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for but CUDA is not available")
    elif kind not in ("cpu", "cuda"):
        raise ValueError(f"device: unknown device {name!r}")
    return torch.device(name)


def set_num_threads(n: int | None) -> None:
    """Set torch intra-op threads (None: leave torch's default)."""
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on `device` (no-op on cpu); use before reading timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]

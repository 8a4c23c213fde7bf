"""Tensors on the wire: raw bytes plus dtype name and shape.

Bytes are the tensor's elements in C order, little-endian (every supported device is), so a
blob is valid on any worker. torch is imported inside the functions only: the protocol itself
imports without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from shared.protocol.codec import Message, register
from shared.protocol.errors import MalformedMessageError

if TYPE_CHECKING:
    import torch

DType = Literal["float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool"]
ITEMSIZE: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1,
}


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class TensorBlob(Message):
    """A dense tensor: `data` holds prod(shape) elements of `dtype`, C order, little-endian.

    Construction raises ValueError if the byte length does not match dtype and shape
    (decode turns that into MalformedMessageError). `data` may be any bytes-like object
    when sending; it is `bytes` after decode.
    """

    TYPE: ClassVar[str] = "tensor"
    dtype: DType
    shape: list[int]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in self.shape):
            raise ValueError(f"shape must be non-negative ints, got {self.shape!r:.80}")
        got = memoryview(self.data).nbytes
        if got != self.nbytes:
            raise ValueError(f"{self.dtype}{list(self.shape)} needs {self.nbytes} bytes, got {got}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
        "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool,
    }


def to_blob(tensor: torch.Tensor) -> TensorBlob:
    """Copy a tensor (any device, any strides) into a blob. Raises ValueError for other dtypes."""
    import torch

    names = {dt: name for name, dt in _torch_dtypes().items()}
    name = names.get(tensor.dtype)
    if name is None:
        raise ValueError(f"dtype {tensor.dtype} cannot travel on the wire (supported: {list(ITEMSIZE)})")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return TensorBlob(dtype=name, shape=list(tensor.shape), data=flat.numpy().tobytes())


def from_blob(blob: TensorBlob, device: str | torch.device | None = None) -> torch.Tensor:
    """A new tensor (owning its memory) equal bit for bit to the one that made `blob`.

    Raises MalformedMessageError for a bool blob holding bytes other than 0 and 1.
    """
    import torch

    dtype = _torch_dtypes()[blob.dtype]
    if blob.numel == 0:
        out = torch.empty(blob.shape, dtype=dtype)
    else:
        raw = bytearray(blob.data)
        if blob.dtype == "bool" and raw.translate(None, b"\x00\x01"):
            raise MalformedMessageError("bool tensor blob holds bytes other than 0 and 1")
        out = torch.frombuffer(raw, dtype=dtype).reshape(blob.shape)
    return out if device is None else out.to(device)

"""Weight-only int8 quantization of the decoder's linear layers (`EngineConfig.weight_quant`).

Symmetric, per output channel: `w[n, :] ~= q[n, :] * scale[n]`, `q` int8 in [-127, 127].
Decode at batch 1 reads every weight once per step, so int8 halves the bytes of bf16 and
quarters those of fp32. Two paths, picked per call by the number of rows M:

    M <= small_m   `aten._weight_int8pack_mm(x_bf16 [M, K], q [N, K], scale [N])`: reads int8
    M >  small_m   dense bf16 `x @ w_deq.T` on the dequantized weight (the int8 kernel does not
                   use the bf16 tile units; bf16 GEMM wins from about M = 16 on AVX-512 BF16)

Matmul activations are bfloat16 on both paths (the int8 kernel is slow with float32 inputs);
the result is cast back to the model dtype. Numerics differ from the unquantized model, so
exactness tests do not apply: tests compare logits with a tolerance and greedy agreement.
Where the int8 op is missing (some accelerators), every call takes the dense bf16 path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.engine.config import WEIGHT_QUANTS

DEFAULT_SMALL_M = 8


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w `[N, K]` -> (q `[N, K]` int8, scale `[N]` float32) with w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [N]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8_op_works(device: torch.device) -> bool:
    try:
        x = torch.ones(1, 32, dtype=torch.bfloat16, device=device)
        q = torch.ones(8, 32, dtype=torch.int8, device=device)
        torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, dtype=torch.bfloat16, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """Drop-in for `nn.Linear` at inference: int8 weight + per-channel scale, bf16 matmuls."""

    def __init__(self, linear: nn.Linear, small_m: int, use_int8_op: bool):
        super().__init__()
        q, scale = quantize_int8(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.small_m = small_m if use_int8_op else 0
        self.register_buffer("qweight", q)                                    # [N, K] int8
        self.register_buffer("scale", scale.to(torch.bfloat16))               # [N]
        self.register_buffer("dense", (q.float() * scale[:, None]).to(torch.bfloat16))  # [N, K]
        self.bias = linear.bias  # [N] model dtype, or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[M, K]` (any float dtype) -> `[M, N]` in x's dtype."""
        xb = x.to(torch.bfloat16)
        if x.shape[0] <= self.small_m:
            out = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self.scale)
        else:
            out = F.linear(xb, self.dense)
        out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias


def quantize_model(model: nn.Module, mode: str, small_m: int = DEFAULT_SMALL_M) -> nn.Module:
    """Replace the decoder's projections and the LM head by quantized versions, in place.

    `mode` "none" is a no-op. Embeddings and norms stay in the model dtype (the LM head gets
    its own int8 copy when tied). Idempotent: already-quantized layers are left as they are."""
    if mode not in WEIGHT_QUANTS:
        raise ValueError(f"weight_quant: must be one of {WEIGHT_QUANTS}, got {mode!r}")
    if mode == "none":
        return model
    device = next(model.parameters()).device
    use_op = _int8_op_works(device)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for owner, name in ((attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")):
            lin = getattr(owner, name)
            if isinstance(lin, nn.Linear):
                setattr(owner, name, Int8Linear(lin, small_m, use_op))
    if isinstance(model.lm_head, nn.Linear):
        model.lm_head = Int8Linear(model.lm_head, small_m, use_op)
    return model

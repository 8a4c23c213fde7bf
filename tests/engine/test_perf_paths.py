"""Fast paths picked by shape / dtype must compute the same thing as the plain path:
the bf16 GEMV path of `Linear` and the float32-upcast decode attention for small batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.engine.attention import F32_DECODE_MAX_ROWS, AttentionMetadata, _decode
from shared.engine.models.llama import Linear


@torch.no_grad()
@pytest.mark.parametrize("bias", [False, True])
def test_linear_gemv_path(bias):
    torch.manual_seed(0)
    lin = Linear(96, 40, bias=bias)
    x = torch.randn(1, 96)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # float32: same kernel
    lin16 = lin.to(torch.bfloat16)
    out = lin16(x.bfloat16())  # GEMV path
    assert out.shape == (1, 40) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x, lin.weight.float(), None if lin.bias is None
                                                     else lin.bias.float()), atol=0.05, rtol=0.02)


def _ref_decode(q, k, v, lens, scale):
    """q [B, n_h, hd], k/v [B, n_kv, ctx, hd]; row b attends to its first lens[b] keys."""
    out = []
    for b, n in enumerate(lens):
        o = F.scaled_dot_product_attention(q[b, :, None].float(), k[b, :, :n].float(), v[b, :, :n].float(),
                                           scale=scale, enable_gqa=True)
        out.append(o[:, 0])
    return torch.stack(out)  # [B, n_h, hd]


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, F32_DECODE_MAX_ROWS + 3])
def test_decode_attention_paths(dtype, b):
    torch.manual_seed(1)
    n_kv, n_h, hd, bs, nb = 2, 4, 16, 4, 3
    ctx = nb * bs
    k_tiles = torch.randn(b * n_kv * nb, bs, hd, dtype=dtype)  # each row owns its own tiles
    v_tiles = torch.randn_like(k_tiles)
    q = torch.randn(b, n_h, hd, dtype=dtype)
    lens = [1 + (7 * i) % ctx for i in range(b)]
    bias = torch.zeros(b, ctx, dtype=dtype)
    bias.masked_fill_(torch.arange(ctx)[None, :] >= torch.tensor(lens)[:, None], float("-inf"))
    meta = AttentionMetadata(write_rows=torch.empty(0, dtype=torch.long), num_decodes=b,
                             decode_tiles=torch.arange(b * n_kv * nb), decode_bias=bias.view(b, 1, 1, ctx))
    out = _decode(q, k_tiles, v_tiles, meta, hd ** -0.5, n_kv)
    assert out.shape == (b, n_h, hd) and out.dtype == dtype
    k = k_tiles.view(b, n_kv, ctx, hd)
    v = v_tiles.view(b, n_kv, ctx, hd)
    ref = _ref_decode(q, k, v, lens, hd ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)

"""The decode-attention kernel (serve/decode_attention.py) against SDPA, and the runner with it against
the runner without it."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.serve import decode_attention
from lorakit.serve.forward import Chunk, runner_for

pytestmark = pytest.mark.skipif(decode_attention.kernel() is None, reason="numba is not installed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_kernel_appends_and_attends_as_sdpa(heads, kv_heads, dtype):
    g = torch.Generator().manual_seed(heads)
    layers, d, n = 3, 16, 6
    positions, starts = [0, 5, 17, 30, 9], [0, 0, 10, 28, 0]       # a first token, windows, capacity edges
    caches = [torch.randn(layers, 2, kv_heads, cap, d, generator=g).to(dtype) for cap in (1, 8, 32, 31, 16)]
    rows = [4, 0, 2, 5, 1]                                         # rows of q/k/v, in no order
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (heads, kv_heads, kv_heads))
    k, v = k.to(dtype), v.to(dtype)                                # the cache's dtype; q and out fp32
    before = [c.clone() for c in caches]
    out = torch.full((n, heads, d), 7.0)
    arrays = [np.array(x, np.int64) for x in (rows, [c.data_ptr() for c in caches], [c.shape[3] for c in caches],
                                               positions, starts)]
    layer, scale = 1, 1 / math.sqrt(d)
    decode_attention.kernel()(q.numpy(), decode_attention.raw(k), decode_attention.raw(v), *arrays, layer, np.float32(scale), out.numpy())
    for c, old, r, p, s in zip(caches, before, rows, positions, starts):
        old[layer, 0, :, p], old[layer, 1, :, p] = k[r], v[r]
        assert torch.equal(c, old)                                 # the new key and value, nothing else
        keys, values = old[layer, :, None, :, s:p + 1].float()      # bf16 values are exact in fp32
        want = F.scaled_dot_product_attention(q[r][None, :, None], keys, values, scale=scale, enable_gqa=True)
        torch.testing.assert_close(out[r], want[0, :, 0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[3], torch.full((heads, d), 7.0))       # a row no decode owns is untouched


def test_check_refuses_what_the_kernel_would_write_past():
    kv = torch.zeros(2, 2, 1, 4, 8)
    decode_attention.check(kv, 3, 2)
    decode_attention.check(kv.bfloat16(), 0, 2)
    for bad, position, layers in [(kv, 4, 2), (kv, 0, 3), (kv.half(), 0, 2), (kv.transpose(3, 4), 0, 2)]:
        with pytest.raises(ValueError, match="decode attention: cache"):
            decode_attention.check(bad, position, layers)


@pytest.mark.parametrize("family, dtype, tol", [("llama", torch.float32, 1e-5), ("qwen2", torch.float32, 1e-5),
                                                ("llama", torch.bfloat16, 8e-3)])
def test_runner_with_the_kernel_equals_the_runner_without(family, dtype, tol):
    model = lk.tiny_model(family).to(dtype)
    runs = []
    for fast in (True, False):
        runner = runner_for(model)
        assert runner.fast_decode                                  # fp32 on the CPU: the kernel's case
        runner.fast_decode = fast
        g = torch.Generator().manual_seed(0)
        caches = [runner.new_cache() for _ in range(3)]
        got = [runner.forward([Chunk(c, torch.randint(1, 200, (n,), generator=g)) for c, n in zip(caches, (5, 1, 9))])]
        for _ in range(20):                                        # decodes across cache doublings, and a prompt
            chunks = [Chunk(c, torch.randint(1, 200, (1,), generator=g)) for c in caches]
            got.append(runner.forward(chunks + [Chunk(runner.new_cache(), torch.randint(1, 200, (4,), generator=g))]))
        runs.append(torch.cat(got))
    torch.testing.assert_close(runs[0], runs[1], atol=tol, rtol=0)

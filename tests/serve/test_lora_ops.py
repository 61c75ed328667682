"""The batched op: the reference against a plain per-row loop of the semantics, the fast op against both."""
import pytest
import torch

from lorakit.serve.lora_ops import SlotWeights, dora_factor, lora_grouped, lora_reference, plan_rows


def random_slots(S, r_max, d_in, d_out, ranks, dora, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(S, r_max, d_in)
    Bt = torch.zeros(S, r_max, d_out)
    for k, r in enumerate(ranks):
        A[k, :r] = torch.randn(r, d_in, generator=g) * 0.5
        Bt[k, :r] = torch.randn(d_out, r, generator=g).T * 0.5
    scale = torch.rand(S, generator=g) + 0.5
    gfac = torch.where(torch.tensor(dora)[:, None], torch.rand(S, d_out, generator=g) + 0.5, torch.ones(S, d_out))
    return SlotWeights(A, Bt, scale, gfac, torch.tensor(dora), list(ranks),
                       frozenset(k for k, d in enumerate(dora) if d))


def loop_semantics(y, x, idx, s, bias):
    """The docstring's semantics, one row at a time."""
    out = y.clone()
    b = torch.zeros(y.shape[1]) if bias is None else bias
    for i, k in enumerate(idx.tolist()):
        if k < 0:
            continue
        B = s.Bt[k].T                                                # (d_out, r_max)
        d = s.scale[k] * (x[i] @ s.A[k].T) @ B.T
        out[i] = s.g[k] * (y[i] - b + d) + b if s.dora[k] else y[i] + d
    return out


S = 6
RANKS = [4, 0, 8, 2, 8, 1]          # slot 1 empty on this layer
DORA = [False, False, True, False, True, False]
IDX = {
    "all base": [-1] * 7,
    "one adapter": [3] * 7,
    "one row each, sorted": [0, 1, 2, 3, 4, 5],                    # "view": grouped, equal lengths
    "equal groups, sorted": [0, 0, 2, 2, 3, 3],                      # slots 0, 2, 3: span 4 <= 2 x 3
    "shuffled with base rows": [2, -1, 0, 4, 2, -1, 5, 0, 3, 4, 4],
    "sparse slots": [0, 5, 5, 0, -1],                                 # span 6 > 2 x 2: gathered
    "one long, many short": [2] * 300 + [0, 3, 4, 5],                # padding would waste: segments
    "dora only": [4, 2, 2, 4],
}


@pytest.mark.parametrize("case", list(IDX))
@pytest.mark.parametrize("d_in,d_out,bias", [(16, 24, True), (40, 8, False)])
def test_fast_and_reference_match_the_semantics(case, d_in, d_out, bias):
    idx = torch.tensor(IDX[case])
    n = idx.numel()
    g = torch.Generator().manual_seed(n)
    slots = random_slots(S, 8, d_in, d_out, RANKS, DORA)
    x = torch.randn(n, d_in, generator=g)
    b = torch.randn(d_out, generator=g) if bias else None
    y = x @ torch.randn(d_in, d_out, generator=g) + (0 if b is None else b)
    expected = loop_semantics(y, x, idx, slots, b)
    y_before = y.clone()
    ref = lora_reference(y, x, idx, slots, b)
    fast = lora_grouped(y, x, plan_rows(idx), slots, b)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    y_own = y.clone()
    inplace = lora_grouped(y_own, x, plan_rows(idx), slots, b, inplace=True)
    assert inplace is y_own and torch.equal(y, y_before)             # in place, or not at all
    torch.testing.assert_close(y_own, expected, atol=1e-5, rtol=1e-5)
    changed = (idx >= 0) & torch.tensor([RANKS[k] > 0 if k >= 0 else False for k in idx.tolist()])
    assert torch.equal(fast[~changed], y[~changed])                 # base rows and empty slots: untouched
    if changed.any():
        assert (fast[changed] - y[changed]).abs().max() > 1e-2      # and the others really moved


def test_plan_modes():
    assert plan_rows(torch.tensor(IDX["all base"])) is None
    modes = {case: plan_rows(torch.tensor(v)).mode for case, v in IDX.items() if case != "all base"}
    assert modes["one row each, sorted"] == "view" and modes["one adapter"] == "view"
    assert modes["shuffled with base rows"] == "padded" and modes["equal groups, sorted"] == "padded"
    assert modes["one long, many short"] == "segments"
    sparse = plan_rows(torch.tensor(IDX["sparse slots"]))
    assert sparse.groups.tolist() == [0, 5] and sparse.G == 2 and sparse.slots == [0, 5] and sparse.counts == [2, 2]


def test_half_precision_rows_with_fp32_slots():
    idx = torch.tensor([1, 0, -1, 1])
    slots = random_slots(2, 4, 8, 8, [4, 3], [False, True])
    x = torch.randn(4, 8)
    y = torch.randn(4, 8)
    expected = loop_semantics(y, x, idx, slots, None)
    out = lora_grouped(y.bfloat16(), x.bfloat16(), plan_rows(idx), slots)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_dora_factor_is_the_merged_row_scale():
    g = torch.Generator().manual_seed(0)
    w0, A, B = torch.randn(6, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    m = torch.rand(6, generator=g) + 0.5
    merged = m[:, None] * (w0 + 0.7 * B @ A) / torch.linalg.norm(w0 + 0.7 * B @ A, dim=1, keepdim=True)
    gf = dora_factor(w0, A, B, 0.7, m)
    torch.testing.assert_close(gf[:, None] * (w0 + 0.7 * B @ A), merged)
    torch.testing.assert_close(torch.linalg.norm(merged, dim=1), m)

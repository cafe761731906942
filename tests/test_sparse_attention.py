"""Sparse attention: the blocked sliding window and DSA-style top-k selection.

References we did not write: torch.nn.functional.scaled_dot_product_attention with an explicit
band / causal mask, and a brute-force top-k over the index scores written with Python loops.
Tolerance: float32 at unit scale, the same sums in a different order; atol 1e-5 (project default).
"""

import pytest
import torch
import torch.nn.functional as F

from llm_scratch.attention.sdpa import scaled_dot_product_attention
from llm_scratch.attention.sparse import (
    Indexer,
    TopKSparseAttention,
    selection_to_mask,
    sliding_window_attention,
    sliding_window_pattern,
    topk_select,
    topk_sparse_attention,
)

ATOL = 1e-5


def band_mask(tq, tk, window):
    """Key j visible from query i (absolute position i + tk - tq) when pos - window < j <= pos."""
    pos = torch.arange(tk - tq, tk)[:, None]
    j = torch.arange(tk)[None, :]
    return (j <= pos) & (j > pos - window)


# --- sliding window -----------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 7, 13, 50])
@pytest.mark.parametrize("window", [1, 3, 8, 64])
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_sliding_window_matches_torch_band_mask(T, window, block_size):
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 4, T, 8), torch.randn(2, 4, T, 6)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(T, T, window))
    out = sliding_window_attention(q, k, v, window, block_size=block_size)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # and the package's dense window path agrees as well
    torch.testing.assert_close(out, scaled_dot_product_attention(q, k, v, window=window), atol=ATOL, rtol=0)


def test_sliding_window_gqa_and_cached_keys():
    # 6 new queries after 11 cached keys (lower-right alignment), 2 kv heads for 4 query heads.
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 17, 8), torch.randn(2, 2, 17, 8)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(6, 17, 5), enable_gqa=True)
    out = sliding_window_attention(q, k, v, 5, block_size=4)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_sliding_window_window_ge_T_is_causal():
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(sliding_window_attention(q, k, v, 9, block_size=4), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(sliding_window_attention(q, k, v, 100, block_size=4), ref, atol=ATOL, rtol=0)


def test_sliding_window_is_local():
    # Changing a key far outside every query's band (and after the queries) changes nothing there.
    q, k, v = (torch.randn(1, 1, 20, 4) for _ in range(3))
    out = sliding_window_attention(q, k, v, 3, block_size=4)
    k2, v2 = k.clone(), v.clone()
    k2[..., 0, :] += 10.0
    v2[..., 0, :] += 10.0
    out2 = sliding_window_attention(q, k2, v2, 3, block_size=4)
    assert torch.equal(out[..., 3:, :], out2[..., 3:, :])  # query 3 on no longer sees key 0
    assert not torch.allclose(out[..., :3, :], out2[..., :3, :])


def test_sliding_window_pattern():
    assert torch.equal(sliding_window_pattern(6, window=2), band_mask(6, 6, 2))
    p = sliding_window_pattern(10, window=3, block_size=4)
    assert torch.equal(p == 2, band_mask(10, 10, 3))
    # block [4, 8) gathers keys 2..7: query 4 sees keys 2..4 and never touches key 1; query 6
    # sees 4..6, so keys 2, 3 are computed for it and masked
    assert p[4, 1] == 0 and p[4, 2] == 2 and p[6, 2] == 1 and p[6, 3] == 1 and p[6, 4] == 2
    # everything computed is at most block_size + window - 1 keys per query
    assert ((p > 0).sum(-1) <= 4 + 3 - 1).all()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_sliding_window_bad_window(bad):
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, q, q, bad)
    with pytest.raises(ValueError, match="block_size"):
        sliding_window_attention(q, q, q, 2, block_size=0)


# --- top-k sparse attention (DSA) ---------------------------------------------------------------


def dense_reference(attn, x):
    """Dense causal attention with the module's own projections, via PyTorch's kernel."""
    B, T, _ = x.shape
    q, k, v = attn.project(x)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=attn.n_kv_heads != attn.n_heads)
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("naive", [True, False])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("T,top_k", [(1, 1), (9, 9), (9, 20)])
def test_topk_with_k_ge_T_is_dense_causal(naive, n_kv_heads, T, top_k):
    attn = TopKSparseAttention(32, 4, top_k=top_k, n_kv_heads=n_kv_heads)
    x = torch.randn(2, T, 32)
    torch.testing.assert_close(attn(x, naive=naive), dense_reference(attn, x), atol=ATOL, rtol=0)


def brute_force_topk(scores, top_k):
    """Per (b, t): the top_k values among the past scores scores[b, t, :t+1], Python-sorted."""
    B, T, _ = scores.shape
    return [[sorted(scores[b, t, : t + 1].tolist(), reverse=True)[:top_k] for t in range(T)] for b in range(B)]


@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_topk_selection_counts_causality_and_brute_force(top_k):
    attn = TopKSparseAttention(32, 4, top_k=top_k, n_kv_heads=2)
    x = torch.randn(2, 15, 32)
    indices, valid = attn.select(x)
    scores = attn.indexer(x)
    assert indices.shape == (2, 15, min(top_k, 15))
    t = torch.arange(15)
    assert torch.equal(valid.sum(-1), torch.minimum(t + 1, torch.tensor(top_k)).expand(2, 15))
    assert (indices[valid] <= t[None, :, None].expand_as(indices)[valid]).all()  # never a future key
    pattern = attn.selection_pattern(x)
    assert not (pattern & ~torch.ones(15, 15, dtype=torch.bool).tril()).any()
    assert torch.equal(pattern.sum(-1), valid.sum(-1))
    expected = brute_force_topk(scores, top_k)
    for b in range(2):
        for i in range(15):
            chosen = indices[b, i][valid[b, i]]
            got = sorted(scores[b, i, chosen].tolist(), reverse=True)
            assert got == expected[b][i]  # the same values (robust to ties among equal scores)
            past = scores[b, i, : i + 1]
            ranked = past.sort(descending=True).values
            if i + 1 <= top_k or ranked[top_k - 1] > ranked[top_k]:  # no tie at the cut: same indices
                by_score = sorted(range(i + 1), key=lambda j: -past[j].item())  # Python's sort, not torch's
                assert set(chosen.tolist()) == set(by_score[:top_k])


def test_topk_sparse_matches_explicit_masked_attention():
    # Small k: the gather path, the dense-mask path and F.sdpa with the selection as its mask agree.
    attn = TopKSparseAttention(32, 4, top_k=4, n_kv_heads=2)
    x = torch.randn(2, 13, 32)
    mask = attn.selection_pattern(x)[:, None]  # (B, 1, T, T)
    B, T, _ = x.shape
    q, k, v = attn.project(x)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = attn.o_proj(ref.transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(attn(x, naive=True), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(attn(x, naive=False), ref, atol=ATOL, rtol=0)
    # and it really is sparse: it differs from dense causal attention
    assert not torch.allclose(attn(x), dense_reference(attn, x), atol=1e-3)


def test_indexer_scores_match_equation():
    idx = Indexer(16, n_heads=3, head_dim=5)
    x = torch.randn(1, 6, 16)
    scores = idx(x)
    qI = idx.q_proj(x).view(1, 6, 3, 5)
    kI, w = idx.k_proj(x), idx.w_proj(x)
    for t in range(6):
        for s in range(6):
            ref = sum(w[0, t, j] * torch.relu(qI[0, t, j] @ kI[0, s]) for j in range(3))
            if s <= t:
                torch.testing.assert_close(scores[0, t, s], ref, atol=ATOL, rtol=0)
            else:
                assert scores[0, t, s] == float("-inf")


def test_topk_sparse_attention_function_with_given_selection():
    # A hand-picked selection: query t reads keys {0, t} only.
    T = 5
    q, k, v = torch.randn(1, 2, T, 4), torch.randn(1, 2, T, 4), torch.randn(1, 2, T, 4)
    indices = torch.stack([torch.zeros(T, dtype=torch.long), torch.arange(T)], -1)[None]  # (1, T, 2)
    valid = torch.ones_like(indices, dtype=torch.bool)
    valid[0, 0, 1] = False  # query 0 would pick key 0 twice; keep it once
    mask = selection_to_mask(indices, valid, T)
    assert mask.sum().item() == 1 + 2 * (T - 1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    torch.testing.assert_close(topk_sparse_attention(q, k, v, indices, valid), ref, atol=ATOL, rtol=0)


def test_topk_gradients_reach_attention_projections():
    attn = TopKSparseAttention(32, 4, top_k=3, n_kv_heads=2)
    attn(torch.randn(2, 10, 32)).pow(2).sum().backward()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        g = getattr(attn, name).weight.grad
        assert g is not None and g.abs().sum() > 0, name
    # the top-k choice is discrete: no gradient reaches the indexer through the output
    assert all(p.grad is None for p in attn.indexer.parameters())


def test_topk_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        TopKSparseAttention(32, 4, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        topk_select(torch.zeros(1, 3, 3), -2)
    with pytest.raises(ValueError, match="n_kv_heads"):
        TopKSparseAttention(32, 4, top_k=2, n_kv_heads=3)
    with pytest.raises(ValueError, match="x must have shape"):
        TopKSparseAttention(32, 4, top_k=2)(torch.randn(2, 5, 16))


# --- the indexer's KL training loss -------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_loss_is_kl_to_head_summed_attention(sparse):
    attn = TopKSparseAttention(32, 4, top_k=4, n_kv_heads=2)
    x = torch.randn(2, 11, 32)
    keep = attn.selection_pattern(x) if sparse else torch.ones(11, 11, dtype=torch.bool).tril().expand(2, 11, 11)
    q, k, _ = attn.project(x)
    k = torch.cat([k[:, :1], k[:, :1], k[:, 1:], k[:, 1:]], dim=1)  # heads 0, 1 read kv 0; heads 2, 3 kv 1
    s = (q @ k.transpose(-2, -1)) / 8 ** 0.5
    p = torch.softmax(s.masked_fill(~keep[:, None], float("-inf")), -1).sum(1)
    p = p / p.sum(-1, keepdim=True)
    log_q = torch.log_softmax(attn.indexer(x).masked_fill(~keep, float("-inf")), -1)
    ref = F.kl_div(log_q[keep], p[keep], reduction="sum") / (2 * 11)
    torch.testing.assert_close(attn.indexer_loss(x, sparse=sparse), ref, atol=ATOL, rtol=1e-5)


def test_indexer_loss_trains_only_the_indexer():
    attn = TopKSparseAttention(32, 4, top_k=3)
    x = torch.randn(2, 12, 32)
    loss = attn.indexer_loss(x)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.indexer.parameters())
    assert all(getattr(attn, n).weight.grad is None for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    # a few steps on the indexer alone bring its scores closer to the attention it should predict
    opt = torch.optim.Adam(attn.indexer.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        attn.indexer_loss(x).backward()
        opt.step()
    assert attn.indexer_loss(x).item() < 0.5 * loss.item()

"""Sparse attention: each query attends to a few keys instead of all of them.

Two ways to choose the few keys:

1. A fixed band (sliding-window attention; Child et al. 2019 "strided/local" patterns, Beltagy et
   al. 2020 Longformer section 3.1, Mistral 7B's SWA). Query i sees keys i - window < j <= i. The
   scores in the band are all that is ever computed: `sliding_window_attention` walks over blocks of
   queries and gathers only the keys inside each block's band, so memory grows as
   T · (block_size + window) instead of T². It computes the same thing as
   `scaled_dot_product_attention(..., window=window)`, which builds the full (T, T) mask.

2. A learned, content-dependent choice (DeepSeek Sparse Attention, DSA; DeepSeek-AI 2025,
   "DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with DeepSeek Sparse Attention", section 1).
   A small "lightning indexer" scores every past token s for query t,

       I_{t,s} = Σ_j  w^I_{t,j} · ReLU(q^I_{t,j} · k^I_s)                     (DSA eq. 1)

   with a few indexer heads j, and each query keeps only its top-k tokens by I_{t,s}; the main
   attention then runs over those k keys and values alone (DSA eq. 2). The selection is shared by
   all attention heads of a query. The indexer is still quadratic, but with one key head of small
   width and ReLU instead of softmax it is much cheaper than the attention it prunes.

Shapes use the package letters: B batch, T time, C channels, H query heads, K key/value heads,
D head dim; here also S = the number of keys a query keeps (S = min(top_k, T)) and J indexer heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llm_scratch.attention.gqa import GroupedQueryAttention
from llm_scratch.attention.sdpa import causal_mask, sliding_window_mask

__all__ = [
    "sliding_window_attention",
    "sliding_window_pattern",
    "Indexer",
    "topk_select",
    "topk_sparse_attention",
    "selection_to_mask",
    "TopKSparseAttention",
]


# ---------------------------------------------------------------------------------------------
# 1. Banded (sliding-window) attention, computed block by block
# ---------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int ({what}), got {value!r}")


def _band_slice(q_start: int, q_end: int, offset: int, window: int) -> tuple[int, int]:
    """Keys needed by queries q_start..q_end-1 (absolute positions shifted by `offset`): [lo, hi)."""
    lo = max(0, q_start + offset - window + 1)  # the first query's oldest visible key
    hi = q_end + offset  # one past the last query's own position
    return lo, hi


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    scale: float | None = None,
    block_size: int = 64,
) -> torch.Tensor:
    """Causal attention where each query sees only its last `window` keys, itself included.

    Shapes: q (B, H, Tq, D), k (B, K, Tk, D), v (B, K, Tk, Dv) -> (B, H, Tq, Dv), with K dividing H
    (query head h reads kv head h // (H / K), as in grouped-query attention) and Tq <= Tk. The
    diagonal is lower-right aligned as in `sdpa.py`: query i sits at absolute position
    i + Tk - Tq, so a chunk of new queries after cached keys works too.

    The (Tq, Tk) score matrix is never built. Queries go in blocks of `block_size`; a block of
    queries [s, e) needs only keys [s' - window + 1, e') (primes: absolute positions), a slice of
    at most block_size + window - 1 keys, and inside that slice a small band mask hides the rest.
    """
    _check_positive_int("window", window, "keys each query sees, itself included")
    _check_positive_int("block_size", block_size, "queries computed together")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, heads, T, head_dim), got {tuple(t.shape)}")
    B, H, Tq, D = q.shape
    K, Tk = k.shape[1], k.shape[2]
    if H % K:
        raise ValueError(f"the kv heads of k ({K}) must divide the query heads of q ({H})")
    if Tq > Tk:
        raise ValueError(f"q has {Tq} positions but k only {Tk}; every query needs its own key (Tq <= Tk)")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    G = H // K
    offset = Tk - Tq
    qg = q.reshape(B, K, G, Tq, D)  # query head h = g·G + i reads kv head g
    outs = []
    for s in range(0, Tq, block_size):
        e = min(s + block_size, Tq)
        lo, hi = _band_slice(s, e, offset, window)
        kb, vb = k[:, :, None, lo:hi], v[:, :, None, lo:hi]  # (B, K, 1, Tb, D): only the band's keys
        scores = (qg[:, :, :, s:e] @ kb.transpose(-2, -1)) * scale  # (B, K, G, e - s, Tb)
        # Band mask inside the slice: absolute query position p sees key j when p - window < j <= p.
        q_pos = torch.arange(s + offset, e + offset, device=q.device)[:, None]
        k_pos = torch.arange(lo, hi, device=q.device)[None, :]
        band = (k_pos <= q_pos) & (k_pos > q_pos - window)
        weights = torch.softmax(scores.masked_fill(~band, float("-inf")), dim=-1)
        outs.append(weights @ vb)  # (B, K, G, e - s, Dv)
    return torch.cat(outs, dim=3).reshape(B, H, Tq, v.shape[-1])


def sliding_window_pattern(
    q_len: int, k_len: int | None = None, window: int = 1, block_size: int | None = None
) -> torch.Tensor:
    """What the banded computation touches, as a (Tq, Tk) tensor for drawing.

    Without `block_size`: the boolean band, True where query i sees key j (as `sliding_window_mask`).
    With `block_size`: an int tensor, 2 = attended, 1 = inside a block's gathered key slice but
    masked (work the blocked computation does and throws away), 0 = never computed.
    """
    k_len = q_len if k_len is None else k_len
    band = sliding_window_mask(q_len, k_len, window)  # validates the lengths and the window
    if block_size is None:
        return band
    _check_positive_int("block_size", block_size, "queries computed together")
    pattern = torch.zeros(q_len, k_len, dtype=torch.long)
    for s in range(0, q_len, block_size):
        e = min(s + block_size, q_len)
        lo, hi = _band_slice(s, e, k_len - q_len, window)
        pattern[s:e, lo:hi] = 1
    return pattern + band.long()


# ---------------------------------------------------------------------------------------------
# 2. Top-k selected sparse attention (DeepSeek Sparse Attention)
# ---------------------------------------------------------------------------------------------


class Indexer(nn.Module):
    """The lightning indexer of DSA: index scores I_{t,s} = Σ_j w_{t,j} · ReLU(q^I_{t,j} · k^I_s).

    J heads of width d_index for the indexer queries, one shared key head (the indexer keys, like
    MQA), and a per-token, per-head weight w_{t,j}, all linear in the hidden state. DeepSeek's code
    also multiplies by constant scales (d_index^-1/2, J^-1/2); a positive constant does not change
    which tokens are in the top k, so we leave it out of the equation. (DeepSeek also applies RoPE
    to part of q^I, k^I and runs the indexer in FP8; omitted here.)
    """

    def __init__(self, d_model: int, n_heads: int = 4, head_dim: int = 16):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("head_dim", head_dim)):
            _check_positive_int(name, value, "a size")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)  # q^I_{t,j}
        self.k_proj = nn.Linear(d_model, head_dim, bias=False)  # k^I_s, one head shared by all j
        self.w_proj = nn.Linear(d_model, n_heads, bias=False)  # w^I_{t,j}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> index scores (B, T, T); future keys (s > t) are -inf."""
        B, T, _ = x.shape
        J, Di = self.n_heads, self.head_dim
        q = self.q_proj(x).view(B, T, J, Di)  # (B, T, J, Di)
        k = self.k_proj(x)  # (B, T, Di)
        w = self.w_proj(x)  # (B, T, J)
        logits = torch.einsum("btjd,bsd->btjs", q, k)  # q^I_{t,j} · k^I_s: (B, T, J, T)
        scores = torch.einsum("btj,btjs->bts", w, F.relu(logits))  # DSA eq. 1: (B, T, T)
        return scores.masked_fill(~causal_mask(T, device=x.device), float("-inf"))


def topk_select(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's top_k keys by index score: (B, T, T) -> indices (B, T, S), valid (B, T, S).

    S = min(top_k, T). A query t with only t + 1 past tokens keeps all of them; its remaining
    S - (t + 1) slots point at future keys (scored -inf, so picked last) and are marked invalid.
    """
    _check_positive_int("top_k", top_k, "keys each query keeps")
    T = scores.shape[-1]
    S = min(top_k, T)
    indices = scores.topk(S, dim=-1).indices  # (B, T, S)
    t = torch.arange(scores.shape[-2], device=scores.device)[:, None]
    valid = indices <= t  # causal: only past tokens (and the query's own) count
    return indices, valid


def selection_to_mask(indices: torch.Tensor, valid: torch.Tensor, k_len: int) -> torch.Tensor:
    """indices, valid (B, T, S) -> boolean (B, T, k_len), True where query t attends to key s."""
    # Count the valid slots that name each key (a sum, so an invalid slot that repeats a valid
    # index cannot overwrite it), then keep the keys named at least once.
    counts = torch.zeros(*indices.shape[:-1], k_len, dtype=torch.long, device=indices.device)
    return counts.scatter_add(-1, indices, valid.long()) > 0


def topk_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    *,
    scale: float | None = None,
    naive: bool = True,
) -> torch.Tensor:
    """Attention of each query over its selected keys only (DSA eq. 2).

    Shapes: q (B, H, T, D), k (B, K, T, D), v (B, K, T, Dv), indices/valid (B, T, S) -> (B, H, T, Dv).
    The selection is shared by all heads; K divides H (query head h reads kv head h // (H / K)).

    naive=True gathers each query's S keys and values and computes softmax over those S scores:
    O(T · S) work, the point of sparse attention. naive=False scatters the selection into a dense
    (T, T) boolean mask and hands it to PyTorch's fused kernel: the same numbers, O(T²) work.
    """
    B, H, T, D = q.shape
    K = k.shape[1]
    if H % K:
        raise ValueError(f"the kv heads of k ({K}) must divide the query heads of q ({H})")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if not naive:
        mask = selection_to_mask(indices, valid, T)[:, None]  # (B, 1, T, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=K != H)
    G = H // K
    b = torch.arange(B, device=q.device)[:, None, None]
    k_sel = k.transpose(1, 2)[b, indices]  # (B, T, S, K, D): the keys query t selected
    v_sel = v.transpose(1, 2)[b, indices]  # (B, T, S, K, Dv)
    qg = q.reshape(B, K, G, T, D)
    scores = torch.einsum("bkgtd,btskd->bkgts", qg, k_sel) * scale  # (B, K, G, T, S)
    scores = scores.masked_fill(~valid[:, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # slot 0 (the best-scored key) is always valid: no NaN
    out = torch.einsum("bkgts,btskd->bkgtd", weights, v_sel)  # (B, K, G, T, Dv)
    return out.reshape(B, H, T, v.shape[-1])


class TopKSparseAttention(GroupedQueryAttention):
    """Causal self-attention in which each query attends only to the top_k past tokens that a
    lightning indexer scores highest (DeepSeek Sparse Attention, DeepSeek-V3.2-Exp report, section 1).

    Args:
        d_model: model width C.
        n_heads: query heads H.
        top_k: keys each query keeps (DeepSeek-V3.2 uses 2048); a query with fewer past tokens
            keeps all of them, so top_k >= T is plain causal attention.
        n_kv_heads: key/value heads K, dividing H; None means K = H.
        head_dim: D; defaults to C / H.
        index_heads, index_head_dim: the indexer's J heads and their width.
        bias: whether the q, k, v and output projections have biases.

    The top-k choice is discrete, so no gradient reaches the indexer through the output; DSA
    trains it with its own KL loss towards the main attention's distribution: `indexer_loss`.
    The projections (and `project`) are grouped-query attention's; only how keys are chosen differs.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        top_k: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        index_heads: int = 4,
        index_head_dim: int = 16,
        bias: bool = False,
    ):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, bias=bias)
        _check_positive_int("top_k", top_k, "keys each query keeps")
        self.top_k = top_k
        self.indexer = Indexer(d_model, index_heads, index_head_dim)

    def _check_x(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, {self.d_model}), got {tuple(x.shape)}")

    @torch.no_grad()
    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> the selected key indices (B, T, S) and which slots are valid (B, T, S)."""
        self._check_x(x)
        return topk_select(self.indexer(x), self.top_k)

    def selection_pattern(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> boolean (B, T, T), True where query t attends to key s; for drawing."""
        indices, valid = self.select(x)
        return selection_to_mask(indices, valid, x.shape[1])

    def forward(self, x: torch.Tensor, *, naive: bool = True) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). naive=True gathers the selected keys (see topk_sparse_attention)."""
        self._check_x(x)
        B, T, _ = x.shape
        indices, valid = self.select(x)  # (B, T, S): which keys each query reads
        q, k, v = self.project(x)  # (B, H, T, D), (B, K, T, D), (B, K, T, D)
        out = topk_sparse_attention(q, k, v, indices, valid, naive=naive)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def indexer_loss(self, x: torch.Tensor, *, sparse: bool = False) -> torch.Tensor:
        """The indexer's training objective, KL(p_t || Softmax(I_t)) averaged over the B·T queries.

        As in the report's continued pre-training: the target p_t sums the main attention's
        probabilities over all heads and L1-normalizes them over the keys. In the dense warm-up
        stage the KL runs over all past tokens; with sparse=True (the sparse training stage) only
        over the selected set S_t, both distributions renormalized on it. The report sums over t; the
        mean differs by a constant. The target is computed without gradient and the indexer reads
        x.detach(), so this loss trains the indexer alone and the model's own loss trains the rest.
        """
        self._check_x(x)
        B, T, _ = x.shape
        keep = causal_mask(T, device=x.device).expand(B, T, T)  # (B, T, T): keys the KL runs over
        if sparse:
            keep = self.selection_pattern(x)
        with torch.no_grad():
            q, k, _ = self.project(x)  # (B, H, T, D), (B, K, T, D)
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # query head h reads kv head h // G
            scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, H, T, T)
            probs = torch.softmax(scores.masked_fill(~keep[:, None], float("-inf")), dim=-1)
            target = probs.sum(dim=1)  # aggregate over heads: (B, T, T)
            target = target / target.sum(dim=-1, keepdim=True)  # L1-normalize over the keys
        index_scores = self.indexer(x.detach()).masked_fill(~keep, float("-inf"))  # (B, T, T)
        log_pred = torch.log_softmax(index_scores, dim=-1).masked_fill(~keep, 0.0)  # 0·(-inf) would be NaN
        kl = torch.xlogy(target, target) - target * log_pred  # p log p - p log q, 0 where p = 0
        return kl.sum(dim=-1).mean()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, top_k={self.top_k}")

"""KV caches: what autoregressive decoding keeps so it never recomputes past keys and values.

Without a cache, generating token t re-runs attention's projections over all t previous tokens;
with one, each step projects only the new token and appends its key and value. Each cache here
serves one attention layer and is preallocated for `max_len` tokens (a "static" cache: one
allocation, fixed shapes), and grows a `length` counter as tokens are appended.

- `KVCache`: keys and values per kv head, for MHA / GQA / MQA: 2·K·D numbers per token.
- `SlidingWindowKVCache`: the same keys and values for a sliding-window layer (Mistral, Gemma 2/3),
  keeping only the last `window - 1` tokens: all that the layer's next query can see besides its own.
  Its memory is fixed by the window, not by the length of the text.
- `MLACache`: multi-head latent attention's compressed latent c_KV and its shared RoPE key:
  (d_c + d_R) numbers per token, whatever the number of heads (DeepSeek-V2, section 2.1).
- `StaticKVCache`: `KVCache`'s keys and values, but every shape is fixed and the write position is a
  tensor: what a compiled decode step needs to be compiled once (the gpt-fast recipe).

All remember the padding mask of the tokens they hold, so a caller passes `padding_mask` for its
new tokens only, and count the real tokens of each row (`real_lengths`), from which a model gets
the positions of the next tokens (`next_positions`). `nbytes` is measured from the allocated tensors.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache", "MLACache", "SlidingWindowKVCache", "StaticKVCache", "next_positions"]


class _LayerCache:
    """Shared bookkeeping: preallocated buffers indexed by time, a length, a padding history."""

    def __init__(self, batch_size: int, max_len: int, device: torch.device | None):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.padding = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self._has_padding = False

    def _buffers(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _reserve(self, new_len: int, batch_size: int, padding_mask: torch.Tensor | None) -> slice:
        if batch_size != self.batch_size:
            raise ValueError(f"the cache holds batch_size={self.batch_size}, the update has {batch_size}")
        if self.length + new_len > self.max_len:
            raise ValueError(
                f"the cache holds max_len={self.max_len} tokens; {self.length} are stored and "
                f"{new_len} more would exceed it"
            )
        span = slice(self.length, self.length + new_len)
        if padding_mask is not None:
            if padding_mask.shape != (batch_size, new_len) or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"padding_mask must be bool of shape (B, T_new) = ({batch_size}, {new_len}), "
                    f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            self.padding[:, span] = padding_mask
            self._has_padding = self._has_padding or not bool(padding_mask.all())
        return span

    def _padding_so_far(self) -> torch.Tensor | None:
        """(B, length) padding mask of every stored token, or None if none of them is padding."""
        return self.padding[:, : self.length] if self._has_padding else None

    def real_lengths(self) -> torch.Tensor | None:
        """(B,) how many real (non-padding) tokens each row has appended, or None if none was padding."""
        return self.padding[:, : self.length].sum(-1) if self._has_padding else None

    def reset(self) -> None:
        """Forget every stored token (the buffers are kept for reuse)."""
        self.truncate(0)

    def truncate(self, length: int) -> None:
        """Keep only the first `length` stored tokens, e.g. to roll back rejected draft tokens."""
        if not 0 <= length <= self.length:
            raise ValueError(f"length must be in [0, {self.length}] (the tokens stored), got {length}")
        self.length = length
        self.padding[:, length:] = True
        self._has_padding = not bool(self.padding[:, :length].all())

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the cached activations (the padding history is not counted)."""
        return sum(t.nelement() * t.element_size() for t in self._buffers().values())

    def bytes_per_token(self) -> float:
        """Cache bytes one token of one sequence takes in this layer, measured from the buffers."""
        return self.nbytes / (self.batch_size * self.max_len)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={tuple(t.shape)}" for n, t in self._buffers().items())
        return f"{type(self).__name__}(length={self.length}, {shapes})"


def _check_kv(k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
    """New keys (B, K, T, D) and values (B, K, T, Dv) must fit the buffers' K, D, Dv and dtype."""
    if (k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[1] != k_buf.shape[1]
            or k.shape[3] != k_buf.shape[3] or v.shape[3] != v_buf.shape[3]):
        raise ValueError(
            f"the cache stores (K={k_buf.shape[1]}, D={k_buf.shape[3]}, Dv={v_buf.shape[3]}) and k, v "
            f"must agree on (B, K, T); got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if k.dtype != k_buf.dtype or v.dtype != v_buf.dtype:
        raise ValueError(f"the cache stores {k_buf.dtype}, got k of dtype {k.dtype} and v of dtype {v.dtype}")


class KVCache(_LayerCache):
    """Keys (B, K, max_len, D) and values (B, K, max_len, Dv) of one MHA/GQA/MQA layer."""

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ):
        super().__init__(batch_size, max_len, device)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.k = torch.zeros(batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, n_kv_heads, max_len, v_head_dim, dtype=dtype, device=device)

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v}

    def update(
        self, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append k (B, K, T, D) and v (B, K, T, Dv); return every stored key, value and padding mask."""
        _check_kv(k, v, self.k, self.v)
        span = self._reserve(k.shape[2], k.shape[0], padding_mask)
        self.k[:, :, span] = k
        self.v[:, :, span] = v
        self.length = span.stop
        return self.k[:, :, : self.length], self.v[:, :, : self.length], self._padding_so_far()


class StaticKVCache:
    """Keys (B, K, max_len, D) and values (B, K, max_len, Dv) of one MHA/GQA/MQA layer, with fixed shapes.

    `KVCache` returns the first `length` stored tokens, so the attention it feeds changes shape at every
    step, and `length` is a Python int. `torch.compile` specializes a graph on both (a guard on each
    shape and int), so a compiled decode step built on it would be recompiled at every new token. This
    cache follows gpt-fast (PyTorch blog, "Accelerating Generative AI with PyTorch II: GPT, Fast", 2023),
    which keeps full-size caches and masks what is not there yet:

    - `update` always returns the *whole* buffers and a key mask `valid` (B, max_len), True where a real
      token has been written. The attention sees the same shapes at every step; which keys exist is data
      (the mask), not shape. A query at slot p sees nothing beyond p because no slot beyond p is valid
      yet (`reset` and `truncate` clear the mask, not the buffers); padding tokens are written with
      valid = False, so no query ever attends to them.
    - The write position `pos` is a 0-d long tensor, advanced in place (`add_`), and the new keys are
      written with `index_copy_` at it: the step reads no Python number that changes, so its guards
      hold from one token to the next and it is compiled once.
    - The buffers are allocated once and only ever written in place, so their addresses never change:
      what CUDA graphs (`torch.compile(mode="reduce-overhead")`) need, since a recorded graph replays
      reads and writes at fixed addresses. `mark_static()` tells the compiler so.

    Every row writes at the same slot; rows of different prompt lengths are left-padded, and positions
    (which count real tokens only) come from the caller. With T > 1 new tokens (a prompt), `update`
    returns the stored tokens followed by the new ones, (B, K, max_len + T, D): the attention's
    lower-right aligned causal mask then lines the T queries up with their own keys, so no query sees a
    later prompt token, again with shapes that depend on T only.

    `length` (a Python int read from `pos`, a device sync) is for eager code; the compiled path never
    reads it, nor checks bounds, which would need the same sync: a caller of the compiled step checks
    that the tokens fit before decoding (`generate_static` does).
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ):
        for name, value in (("batch_size", batch_size), ("max_len", max_len), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.batch_size, self.max_len = batch_size, max_len
        self.k = torch.zeros(batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, n_kv_heads, max_len, v_head_dim, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # True = real, written
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # the next slot to write

    @property
    def length(self) -> int:
        """Tokens written so far (padding included), as a Python int: a device sync, for eager code only."""
        return int(self.pos)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k (B, K, T, D) and v (B, K, T, Dv) at `pos`; return keys, values and their key mask.

        T == 1 (a decode step): the full buffers (B, K, max_len, D) and `valid` (B, max_len).
        T > 1 (a prompt, or several tokens at once): the buffers as they were, then the new tokens,
        (B, K, max_len + T, D) and (B, max_len + T); see the class docstring for why.
        padding_mask: (B, T) bool, True = real token; None means all real.
        """
        _check_kv(k, v, self.k, self.v)
        B, _, T, _ = k.shape
        if B != self.batch_size:
            raise ValueError(f"the cache holds batch_size={self.batch_size}, the update has {B}")
        if padding_mask is None:
            padding_mask = torch.ones(B, T, dtype=torch.bool, device=self.valid.device)
        elif padding_mask.shape != (B, T) or padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be bool of shape (B, T_new) = ({B}, {T}), "
                             f"got {padding_mask.dtype} {tuple(padding_mask.shape)}")
        if not torch.compiler.is_compiling():  # eager: check the bounds (a sync the compiled step avoids)
            stored = self.length
            if stored + T > self.max_len:
                raise ValueError(f"the cache holds max_len={self.max_len} tokens; {stored} are stored and {T} more "
                                 "would exceed it")
        slots = self.pos + torch.arange(T, device=self.pos.device)  # (T,) where the new tokens go
        if T == 1:  # write, then attend over the whole buffer: no copy of the cache
            self._write(slots, k, v, padding_mask)
            return self.k, self.v, self.valid
        keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)  # (B, K, max_len + T, D)
        mask = torch.cat([self.valid, padding_mask], dim=1)  # (B, max_len + T); the T slots are not valid yet
        self._write(slots, k, v, padding_mask)
        return keys, values, mask

    def _write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor) -> None:
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        self.valid.index_copy_(1, slots, padding_mask)
        self.pos.add_(slots.shape[0])

    def real_lengths(self) -> torch.Tensor:
        """(B,) how many real (non-padding) tokens each row has written."""
        return self.valid.sum(-1)

    def reset(self) -> None:
        """Forget every stored token, in place: the buffers keep their addresses (CUDA graphs rely on it)."""
        self.valid.fill_(False)
        self.pos.zero_()

    def truncate(self, length: int) -> None:
        """Keep only the first `length` stored tokens, e.g. to roll back rejected draft tokens."""
        stored = self.length
        if not isinstance(length, int) or not 0 <= length <= stored:
            raise ValueError(f"length must be an int in [0, {stored}] (the tokens stored), got {length!r}")
        self.valid[:, length:] = False
        self.pos.fill_(length)

    def mark_static(self) -> None:
        """Tell torch.compile that the buffers keep their addresses (they are only written in place), so
        that CUDA graphs may read and write them directly instead of copying them in and out at each replay."""
        for t in (self.k, self.v, self.valid, self.pos):
            torch._dynamo.mark_static_address(t)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the cached keys and values (the mask and position are not counted)."""
        return sum(t.nelement() * t.element_size() for t in (self.k, self.v))

    def bytes_per_token(self) -> float:
        """Cache bytes one token of one sequence takes in this layer, measured from the buffers."""
        return self.nbytes / (self.batch_size * self.max_len)

    def __repr__(self) -> str:
        return f"StaticKVCache(max_len={self.max_len}, k={tuple(self.k.shape)}, v={tuple(self.v.shape)})"


class SlidingWindowKVCache:
    """Keys and values of a sliding-window attention layer, keeping only the last `window - 1` tokens.

    A query at position i sees keys i - window + 1 .. i, so once the new tokens' keys are appended,
    everything older than the last window - 1 tokens can never be read again. `update` returns the
    kept tokens followed by the new ones (the layer masks them with the same lower-right aligned
    sliding-window mask as without a cache), then keeps the last window - 1 of them. The buffers
    hold (B, K, window - 1, D) whatever `max_len` is: that is the whole saving.

    `max_len` still bounds the total number of tokens appended, as for `KVCache`; `length` counts them.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        window: int,
        v_head_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int (keys each query sees, itself included), got {window!r}")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.batch_size, self.max_len, self.window, self.length = batch_size, max_len, window, 0
        self.capacity = min(window - 1, max_len)  # older tokens are out of every future query's window
        self.stored = 0  # tokens in the buffers: min(length, capacity)
        self.k = torch.zeros(batch_size, n_kv_heads, self.capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, n_kv_heads, self.capacity, v_head_dim, dtype=dtype, device=device)
        self.padding = torch.ones(batch_size, self.capacity, dtype=torch.bool, device=device)  # of stored tokens
        self._real = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens appended per row
        self._has_padding = False

    def update(
        self, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append k (B, K, T, D) and v (B, K, T, Dv); return the kept tokens then the new ones."""
        _check_kv(k, v, self.k, self.v)
        B, _, T, _ = k.shape
        if B != self.batch_size:
            raise ValueError(f"the cache holds batch_size={self.batch_size}, the update has {B}")
        if self.length + T > self.max_len:
            raise ValueError(f"the cache takes max_len={self.max_len} tokens; {self.length} were appended and "
                             f"{T} more would exceed it")
        if padding_mask is not None:
            if padding_mask.shape != (B, T) or padding_mask.dtype != torch.bool:
                raise ValueError(f"padding_mask must be bool of shape (B, T_new) = ({B}, {T}), "
                                 f"got {padding_mask.dtype} {tuple(padding_mask.shape)}")
            self._has_padding = self._has_padding or not bool(padding_mask.all())
            self._real += padding_mask.sum(-1)
        else:
            padding_mask = torch.ones(B, T, dtype=torch.bool, device=self.padding.device)
            self._real += T
        s = self.stored
        keys = torch.cat([self.k[:, :, :s], k], dim=2)  # (B, K, s + T, D): the kept past, then the new
        values = torch.cat([self.v[:, :, :s], v], dim=2)
        padding = torch.cat([self.padding[:, :s], padding_mask], dim=1)  # (B, s + T)
        n = min(self.capacity, s + T)  # keep the last n of them for the next call
        self.k[:, :, :n] = keys[:, :, s + T - n:]
        self.v[:, :, :n] = values[:, :, s + T - n:]
        self.padding[:, :n] = padding[:, s + T - n:]
        self.stored, self.length = n, self.length + T
        return keys, values, (padding if self._has_padding else None)

    def real_lengths(self) -> torch.Tensor | None:
        """(B,) how many real (non-padding) tokens each row has appended, or None if none was padding."""
        return self._real.clone() if self._has_padding else None

    def reset(self) -> None:
        """Forget every token (the buffers are kept for reuse)."""
        self.length = self.stored = 0
        self.padding.fill_(True)
        self._real.zero_()
        self._has_padding = False

    def truncate(self, length: int) -> None:
        """Only `reset` (length 0) or keeping everything: older tokens needed after a rollback are gone."""
        if length == self.length:
            return
        if length != 0:
            raise ValueError(f"a sliding-window cache cannot roll back from {self.length} to {length} tokens: it "
                             "has discarded the keys a rolled-back query would need; only truncate(0) is allowed")
        self.reset()

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the cached keys and values (the padding bookkeeping is not counted)."""
        return sum(t.nelement() * t.element_size() for t in (self.k, self.v))

    def __repr__(self) -> str:
        return (f"SlidingWindowKVCache(length={self.length}, window={self.window}, stored={self.stored}, "
                f"k={tuple(self.k.shape)}, v={tuple(self.v.shape)})")


def next_positions(caches, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of the new tokens input_ids (B, T), given what `caches` (one per layer, or None) hold.

    Positions count real tokens only, so a left-padded row gets the same positions as without its
    padding: (real tokens already cached) + (running count of real new tokens) - 1. A pad token takes
    the position of the real token after it (clamped at 0); it is masked out anyway.
    Returns (T,) when nothing is padded, else (B, T).
    """
    B, T = input_ids.shape
    device = input_ids.device
    cache = caches[0] if caches else None
    real_before = cache.real_lengths() if cache is not None else None  # (B,) or None when no padding
    if real_before is not None:
        offset = real_before.to(device)[:, None]  # (B, 1)
    else:
        offset = torch.tensor(cache.length if cache is not None else 0, device=device)
    if padding_mask is None:
        return offset + torch.arange(T, device=device)
    return (offset + padding_mask.long().cumsum(-1) - 1).clamp(min=0)


class MLACache(_LayerCache):
    """Multi-head latent attention's latent c_KV (B, max_len, d_c) and RoPE key (B, max_len, d_R)."""

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        kv_lora_rank: int,
        rope_head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ):
        super().__init__(batch_size, max_len, device)
        self.latent = torch.zeros(batch_size, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(batch_size, max_len, rope_head_dim, dtype=dtype, device=device)

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {"latent": self.latent, "k_rope": self.k_rope}

    def update(
        self, latent: torch.Tensor, k_rope: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append latent (B, T, d_c) and k_rope (B, T, d_R); return everything stored."""
        if (latent.dim() != 3 or k_rope.dim() != 3 or latent.shape[:2] != k_rope.shape[:2]
                or latent.shape[-1] != self.latent.shape[-1] or k_rope.shape[-1] != self.k_rope.shape[-1]):
            raise ValueError(
                f"the cache stores d_c={self.latent.shape[-1]}, d_R={self.k_rope.shape[-1]}; "
                f"got latent {tuple(latent.shape)} and k_rope {tuple(k_rope.shape)}"
            )
        if latent.dtype != self.latent.dtype or k_rope.dtype != self.k_rope.dtype:
            raise ValueError(
                f"the cache stores {self.latent.dtype}, got latent of dtype {latent.dtype} and k_rope of {k_rope.dtype}"
            )
        span = self._reserve(latent.shape[1], latent.shape[0], padding_mask)
        self.latent[:, span] = latent
        self.k_rope[:, span] = k_rope
        self.length = span.stop
        return self.latent[:, : self.length], self.k_rope[:, : self.length], self._padding_so_far()

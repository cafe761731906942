"""DeepSeek-V3 (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", arXiv:2412.19437), as Llama 3 changed in
three places, each built in an earlier chapter:

- attention is multi-head latent attention (MLA, `attention/mla.py`): the cache holds a 512-wide latent
  and one 64-wide RoPE key per token instead of per-head keys and values; RoPE is YaRN-extended
  (factor 40) and interleaved.
- after the first `first_k_dense` dense layers, the FFN is DeepSeekMoE (`moe/layers.py`): 1 shared +
  256 routed fine-grained experts, 8 active, chosen by sigmoid scores within the 4 best of 8 groups,
  balanced by a selection-only bias instead of an auxiliary loss (plus a tiny sequence-wise loss).
- Multi-Token Prediction (section 2.2): D extra modules, module k predicting the token k + 1 ahead.
  Module k combines the previous depth's hidden state h^{k-1}_i with the embedding of token i + k,

      h'_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]        (eq. 21)
      h^k  = TRM_k(h')   (one transformer block)                      (eq. 22)
      P^k_{i+k+1} = OutHead(RMSNorm(h^k_i))                           (eq. 23)

  sharing the main model's embedding and output head. Its loss, λ/D Σ_k CE_k (eqs. 24-25), densifies the
  training signal; at inference the modules can be dropped, or used to draft tokens. (The paper writes the
  concatenation hidden-first; the released weights' eh_proj takes the embedding first, as here. The two
  differ only by the order of eh_proj's input columns.)

The head is untied; norms are RMSNorm (ε 1e-6) with Llama's rounding order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llm_scratch.attention import MLAConfig, MultiHeadLatentAttention, next_positions
from llm_scratch.ffn import SwiGLU
from llm_scratch.models.gpt2 import check_input_ids
from llm_scratch.models.presets import PresetConfig
from llm_scratch.moe import DeepSeekMoE, moe_layers
from llm_scratch.norm import RMSNorm
from llm_scratch.training.losses import cross_entropy_loss

__all__ = ["DeepSeekV3", "DeepSeekV3Block", "DeepSeekV3Config", "MTPModule"]

# the released checkpoint's YaRN: trained at 4K, extended to 160K (factor 40; section 4.3)
DEEPSEEK_V3_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                    "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


@dataclass
class DeepSeekV3Config(PresetConfig):
    """Defaults are DeepSeek-V3's (671B). Names follow Hugging Face's DeepseekV3Config where they differ
    from ours only in spelling: n_routed_experts, n_experts_per_tok, n_group, topk_group, ..."""

    vocab_size: int = 129280
    context_length: int = 163840
    d_model: int = 7168
    n_layers: int = 61
    n_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    ffn_hidden: int = 18432  # the dense layers' SwiGLU width
    moe_hidden: int = 2048  # each expert's width
    first_k_dense: int = 3
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    rope_base: float = 10000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(DEEPSEEK_V3_YARN))
    rope_interleaved: bool = True
    norm_eps: float = 1e-6
    n_mtp: int = 1  # D, Multi-Token Prediction depth (num_nextn_predict_layers)
    mtp_loss_weight: float = 0.3  # λ (0.3 for the first 10T tokens, then 0.1)
    bias_update_speed: float = 0.001  # γ of the loss-free balancing (0.001, then 0 for the last 500B tokens)
    seq_balance_alpha: float = 1e-4  # α of the sequence-wise balance loss
    init_std: float = 0.02
    dropout: float = 0.0

    presets = {"deepseek-v3": {}}

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "ffn_hidden", "moe_hidden",
                     "n_routed_experts", "n_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("first_k_dense", "n_shared_experts", "n_mtp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.n_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"n_experts_per_tok ({self.n_experts_per_tok}) must be <= n_routed_experts "
                             f"({self.n_routed_experts})")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_group ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
        self.mla_config()  # validates the attention sizes


    def mla_config(self) -> MLAConfig:
        return MLAConfig(d_model=self.d_model, n_heads=self.n_heads, kv_lora_rank=self.kv_lora_rank,
                         q_lora_rank=self.q_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
                         qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim, rope_base=self.rope_base,
                         rope_interleaved=self.rope_interleaved, rope_scaling=self.rope_scaling, norm_eps=self.norm_eps)



class DeepSeekV3Block(nn.Module):
    """x + MLA(RMSNorm(x)), then x + FFN(RMSNorm(x)); the FFN is dense in the first layers, DeepSeekMoE after."""

    def __init__(self, cfg: DeepSeekV3Config, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cast_before_weight=True)
        self.attn = MultiHeadLatentAttention(cfg.mla_config())
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cast_before_weight=True)
        if layer < cfg.first_k_dense:
            self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        else:
            self.mlp = DeepSeekMoE(cfg.d_model, cfg.moe_hidden, cfg.n_routed_experts, cfg.n_shared_experts,
                                   cfg.n_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor,
                                   cfg.norm_topk_prob, bias_update_speed=cfg.bias_update_speed,
                                   seq_balance_alpha=cfg.seq_balance_alpha)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, padding_mask=None, cache=None, positions=None, attn_mask=None):
        x = x + self.dropout(self.attn(self.attn_norm(x), padding_mask=padding_mask, cache=cache, positions=positions,
                                       attn_mask=attn_mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class MTPModule(nn.Module):
    """One Multi-Token Prediction depth (eqs. 21-23), without the shared embedding and head."""

    def __init__(self, cfg: DeepSeekV3Config, layer: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps, cast_before_weight=True)
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps, cast_before_weight=True)
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)  # M_k
        self.block = DeepSeekV3Block(cfg, layer)  # TRM_k
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cast_before_weight=True)  # before the shared head

    def forward(self, h_prev: torch.Tensor, emb_ahead: torch.Tensor, padding_mask=None, positions=None):
        """h_prev (B, S, C) the previous depth's states at positions i; emb_ahead (B, S, C) Emb(t_{i+k})."""
        h = self.eh_proj(torch.cat([self.enorm(emb_ahead), self.hnorm(h_prev)], dim=-1))  # eq. 21
        return self.block(h, padding_mask=padding_mask, positions=positions)  # eq. 22


class DeepSeekV3(nn.Module):
    config_class = DeepSeekV3Config

    def __init__(self, cfg: DeepSeekV3Config):
        super().__init__()
        if type(cfg) is not DeepSeekV3Config:
            raise TypeError(f"DeepSeekV3 needs a DeepSeekV3Config, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(DeepSeekV3Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cast_before_weight=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(cfg.n_mtp))
        self.mtp_logits: list[torch.Tensor] = []  # filled by a training-mode forward
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std²) for linear, embedding, router and expert weights; norms at 1. Skipped on meta."""
        if self.embed.weight.is_meta:
            return
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=self.cfg.init_std)

    def parameter_counts(self) -> dict[str, int]:
        """Counted from the modules (works on meta): the main model, the MTP modules (their own weights; they
        share the embedding and head), and the parameters one token activates in the main model: all but the
        routed experts it is not sent to, with and without the embedding table (a lookup, not a matmul)."""
        main = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("mtp."))
        mtp = sum(p.numel() for p in self.mtp.parameters())
        idle = 0
        for block in self.blocks:
            if isinstance(block.mlp, DeepSeekMoE):
                experts = block.mlp.experts
                per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // experts.n_experts
                idle += (experts.n_experts - self.cfg.n_experts_per_tok) * per_expert
        activated = main - idle
        return {"main": main, "mtp": mtp, "activated": activated,
                "activated_without_embedding": activated - self.embed.weight.numel()}

    def init_caches(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> list:
        """One latent (MLA) cache per main-model layer."""
        if max_len > self.cfg.context_length:
            raise ValueError(f"max_len {max_len} exceeds the context length {self.cfg.context_length}")
        return [b.attn.init_cache(batch_size, max_len, dtype=dtype, device=device) for b in self.blocks]

    def hidden_states(self, input_ids, padding_mask=None, caches=None, positions=None) -> torch.Tensor:
        """input_ids (B, T) -> the last block's output (B, T, C), before the final norm."""
        check_input_ids(input_ids, caches, self.cfg.context_length)
        if positions is None:
            positions = next_positions(caches, input_ids, padding_mask)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, padding_mask=padding_mask, cache=caches[i] if caches else None, positions=positions)
        return x

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None, caches: list | None = None,
                positions: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> next-token logits (B, T, V) (or (B, 1, V) with last_only).

        In training mode (and without caches) the MTP modules run too and their logits are kept in
        `self.mtp_logits`: entry k-1 is (B, T-k, V), position i predicting token i + k + 1.
        """
        h = self.hidden_states(input_ids, padding_mask, caches, positions)
        self.mtp_logits = []
        if self.training and caches is None and len(self.mtp):
            self.mtp_logits = self.run_mtp(h, input_ids, padding_mask)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.norm(h))

    def run_mtp(self, h: torch.Tensor, input_ids: torch.Tensor, padding_mask=None) -> list[torch.Tensor]:
        """The D MTP depths on a full sequence: depth k's logits (B, T-k, V), position i -> token i + k + 1."""
        T = input_ids.shape[1]
        outputs, prev = [], h
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            mask = None if padding_mask is None else padding_mask[:, : T - k]
            positions = next_positions(None, input_ids[:, : T - k], mask)
            prev = module(prev[:, : T - k], self.embed(input_ids[:, k:]), padding_mask=mask, positions=positions)
            outputs.append(self.lm_head(module.norm(prev)))  # eq. 23: the shared head
        return outputs

    def training_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Next-token cross entropy + λ·mean_k CE_k of the MTP depths (eq. 25) + the MoE layers' auxiliary
        losses; use as Trainer's loss_fn. In eval mode (no MTP logits, no aux losses) it is the plain CE."""
        loss = cross_entropy_loss(logits, targets)
        if self.mtp_logits:
            # depth k at position i predicts token i + k + 1 = targets[:, i + k]
            mtp = [cross_entropy_loss(lg, targets[:, k:]) for k, lg in enumerate(self.mtp_logits, start=1)]
            loss = loss + self.cfg.mtp_loss_weight * torch.stack(mtp).mean()
        if self.training:
            for layer in moe_layers(self):
                loss = loss + layer.aux_loss
        return loss

    def update_router_biases(self) -> None:
        """Loss-free balancing: one bias step in every MoE layer from its load since the last call."""
        for layer in moe_layers(self):
            layer.update_bias()

    @torch.no_grad()
    def propose(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Greedy next token plus D draft tokens from the MTP modules: (B, T) -> (B, 1 + D).

        The main model predicts t_{T+1}; MTP depth k, fed the states so far and the tokens up to t_{T+k},
        drafts t_{T+k+1}. (Recomputed from scratch each call: for reading, not for speed.)
        """
        h = self.hidden_states(input_ids)
        first = self.lm_head(self.norm(h[:, -1])).argmax(-1)  # t_{T+1}
        return torch.cat([first[:, None], self.draft(h, input_ids, first)], dim=1)

    @torch.no_grad()
    def draft(self, h: torch.Tensor, input_ids: torch.Tensor, next_token: torch.Tensor) -> torch.Tensor:
        """The D MTP drafts after next_token: h (B, T, C) the main model's states of input_ids (B, T), next_token
        (B,) the token at T + 1 -> (B, D) greedy drafts of tokens T + 2 ... T + D + 1 (eqs. 21-23 at inference)."""
        tokens, ids, prev = [next_token], input_ids, h
        for module in self.mtp:
            ids = torch.cat([ids, tokens[-1][:, None]], dim=1)
            S = prev.shape[1]  # depth k sees positions 0..S-1 and the tokens one step further on
            prev = module(prev, self.embed(ids[:, -S:]), positions=torch.arange(S, device=ids.device))
            tokens.append(self.lm_head(module.norm(prev[:, -1])).argmax(-1))
        return torch.stack(tokens[1:], dim=1)

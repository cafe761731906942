"""The Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", arXiv:2010.11929).

    pixels (B, C, H, W) -> P×P patches -> linear projection (eq. 1) -> [CLS; patches] + learned positions
        -> n_layers × pre-LN encoder block (eqs. 2-3: bidirectional attention, GELU MLP) -> LayerNorm (eq. 4)
        -> head on the CLS token -> logits (B, n_classes)

An image is cut into N = (H/P)·(W/P) non-overlapping patches, each flattened to P·P·C numbers and projected to
the width D; the projection is a convolution whose kernel and stride are both P (the same linear map applied to
each patch, see `patchify`). A learnable CLS token is put in front, and its final state, after the encoder's last
LayerNorm, is what the classifier reads. Position embeddings are learned, one per patch position and one for CLS;
for another image size they are resized as a 2-D grid (section 3.2, "fine-tuning and higher resolution").

The encoder block is GPT-2's pre-LN block with two changes: attention sees every patch (no causal mask) and the
MLP uses the exact erf GELU. Weight names follow ours; `models/hf.py` maps Hugging Face's `ViTForImageClassification`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_scratch.attention import MultiHeadAttention
from llm_scratch.ffn import MLP
from llm_scratch.norm import LayerNorm

__all__ = ["ViT", "ViTConfig", "interpolate_position_embeddings", "patchify"]

# name -> (d_model, n_layers, n_heads, ffn_hidden); Table 1 of the paper (ViT-Base and ViT-Large), patch 16, 224 px
_PRESETS = {
    "vit-base-patch16-224": (768, 12, 12, 3072),
    "vit-large-patch16-224": (1024, 24, 16, 4096),
}


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    n_channels: int = 3
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_hidden: int = 3072
    n_classes: int = 1000
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12  # the released checkpoints' value

    def __post_init__(self):
        for name in ("image_size", "patch_size", "n_channels", "d_model", "n_layers", "n_heads", "ffn_hidden",
                     "n_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def grid(self) -> int:
        """Patches per side at the configured image size."""
        return self.image_size // self.patch_size

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ViTConfig:
        """"vit-base-patch16-224" or "vit-large-patch16-224" (1000 ImageNet classes unless overridden)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown ViT preset {name!r}; known: {', '.join(_PRESETS)}")
        d_model, n_layers, n_heads, ffn_hidden = _PRESETS[name]
        return cls(**{"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "ffn_hidden": ffn_hidden,
                      **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C·P·P): the patches in row-major order, each flattened channel-first (the layout a
    Conv2d kernel of shape (D, C, P, P) reads), so that patch embedding = patchify(x) @ W.view(D, -1)ᵀ + b."""
    B, C, H, W = pixel_values.shape
    P = patch_size
    x = pixel_values.reshape(B, C, H // P, P, W // P, P)  # (B, C, gh, P, gw, P)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // P) * (W // P), C * P * P)


def interpolate_position_embeddings(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + g·g, D) position embeddings of a g × g grid -> (1, 1 + gh·gw, D) for a gh × gw grid: the patch
    embeddings resized as a 2-D image (bicubic), the CLS embedding kept. The same grid returns pos itself."""
    n_patches = pos.shape[1] - 1
    g = round(n_patches ** 0.5)
    if g * g != n_patches:
        raise ValueError(f"position embeddings for {n_patches} patches are not a square grid")
    if tuple(grid) == (g, g):
        return pos
    cls, patches = pos[:, :1], pos[:, 1:]
    D = pos.shape[-1]
    patches = patches.reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g): an image with D channels
    patches = F.interpolate(patches.float(), size=tuple(grid), mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D)], dim=1)


class PatchEmbedding(nn.Module):
    """A P × P convolution with stride P: one D-vector per patch (eq. 1's E, applied to every patch)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.n_channels, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, N, D)


class EncoderBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)): bidirectional attention, exact-GELU MLP (eqs. 2-3)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, bias=True, dropout=cfg.dropout, causal=False)
        self.ln_2 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.ffn_hidden, activation="gelu", bias=True)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x)))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbedding(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # truncated normal (std 0.02) for weights, zeros for biases, as the reference implementations initialize
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _check(self, pixel_values: torch.Tensor) -> None:
        c = self.cfg
        if pixel_values.dim() != 4 or pixel_values.shape[1] != c.n_channels:
            raise ValueError(f"pixel_values must have shape (B, {c.n_channels}, H, W), got {tuple(pixel_values.shape)}")
        H, W = pixel_values.shape[-2:]
        if H % c.patch_size or W % c.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {c.patch_size}")

    def _embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        """Eq. 1: [CLS; patch embeddings] + position embeddings (interpolated to the image's grid on request)."""
        self._check(pixel_values)
        H, W = pixel_values.shape[-2:]
        grid = (H // self.cfg.patch_size, W // self.cfg.patch_size)
        pos = self.pos_embed
        if grid != (self.cfg.grid, self.cfg.grid):
            if not interpolate_pos_encoding:
                raise ValueError(f"image size {H}x{W} differs from the configured {self.cfg.image_size}x"
                                 f"{self.cfg.image_size}; pass interpolate_pos_encoding=True to resize the position "
                                 "embeddings")
            pos = interpolate_position_embeddings(pos, grid)
        x = self.patch_embed(pixel_values)  # (B, N, D)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos

    def hidden_states(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> the final LayerNorm's output (B, 1 + N, D): CLS first, then the patches
        in row-major order. An image of another size than cfg.image_size needs interpolate_pos_encoding=True."""
        x = self.dropout(self._embed(pixel_values, interpolate_pos_encoding))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> logits (B, n_classes), from the CLS token's final state."""
        return self.head(self.hidden_states(pixel_values, interpolate_pos_encoding)[:, 0])

    def attention_maps(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> list[torch.Tensor]:
        """Each layer's attention weights (B, H, 1 + N, 1 + N), recomputed explicitly (for plots, not speed)."""
        maps = []
        with torch.no_grad():
            x = self._embed(pixel_values, interpolate_pos_encoding)
            for block in self.blocks:
                maps.append(block.attn.attention_scores(block.ln_1(x)).softmax(dim=-1))
                x = block(x)
        return maps

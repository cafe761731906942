"""ViT: logits equal Hugging Face's ViTForImageClassification on tiny random configs (through load_hf_checkpoint),
the conv patch embedding is unfold + linear, position-embedding interpolation, preset parameter counts, errors."""

import pytest
import torch
from transformers import ViTConfig as HFViTConfig
from transformers import ViTForImageClassification

from llm_scratch.models import ViT, ViTConfig
from llm_scratch.models.hf import load_hf_checkpoint
from llm_scratch.models.vit import interpolate_position_embeddings, patchify

CASES = {
    "rgb-32": dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64, num_labels=5),
    "gray-8x8-patch2": dict(image_size=8, patch_size=2, num_channels=1, hidden_size=24, num_hidden_layers=3,
                            num_attention_heads=3, intermediate_size=48, num_labels=10),
    "one-patch": dict(image_size=16, patch_size=16, num_channels=3, hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32, num_labels=3),
}


def _hf_pair(tmp_path, case):
    torch.manual_seed(0)
    theirs = ViTForImageClassification(HFViTConfig(**CASES[case], hidden_dropout_prob=0.0,
                                                   attention_probs_dropout_prob=0.0)).eval()
    with torch.no_grad():  # HF initializes the CLS token and positions to 0 / small values: make them matter
        theirs.vit.embeddings.cls_token.normal_()
        theirs.vit.embeddings.position_embeddings.normal_()
    theirs.save_pretrained(tmp_path)
    return theirs, load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_hugging_face(tmp_path, case):
    theirs, ours = _hf_pair(tmp_path, case)
    assert isinstance(ours, ViT) and ours.cfg.n_classes == CASES[case]["num_labels"]
    c = ours.cfg
    x = torch.randn(4, c.n_channels, c.image_size, c.image_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-4, rtol=0)  # float32, ≤ 3 layers
        hidden = theirs.vit(x).last_hidden_state  # after the final LayerNorm
        torch.testing.assert_close(ours.hidden_states(x), hidden, atol=1e-4, rtol=0)


def test_interpolated_positions_equal_hugging_face(tmp_path):
    theirs, ours = _hf_pair(tmp_path, "rgb-32")
    for size in [(48, 40), (64, 64), (24, 24)]:  # 6 x 5, 8 x 8 and 3 x 3 grids instead of 4 x 4
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = theirs(x, interpolate_pos_encoding=True).logits
            got = ours(x, interpolate_pos_encoding=True)
        # both resize the 4 x 4 grid bicubically (align_corners=False) to the new grid: the same numbers
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_patch_embedding_is_unfold_plus_linear():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=12, patch_size=4, n_channels=3, d_model=16, n_layers=1, n_heads=2,
                          ffn_hidden=32, n_classes=2))
    x = torch.randn(2, 3, 12, 12)
    conv = model.patch_embed(x)  # (B, 9, 16)
    W, b = model.patch_embed.proj.weight, model.patch_embed.proj.bias  # (16, 3, 4, 4), (16,)
    by_hand = patchify(x, 4) @ W.reshape(16, -1).T + b
    torch.testing.assert_close(conv, by_hand, atol=1e-5, rtol=0)
    unfolded = torch.nn.functional.unfold(x, kernel_size=4, stride=4).transpose(1, 2)  # torch's own patches
    torch.testing.assert_close(patchify(x, 4), unfolded, atol=0, rtol=0)


def test_position_interpolation_to_the_native_grid_is_the_identity():
    pos = torch.randn(1, 1 + 16, 8)
    assert interpolate_position_embeddings(pos, (4, 4)) is pos
    bigger = interpolate_position_embeddings(pos, (8, 8))
    assert bigger.shape == (1, 65, 8) and torch.equal(bigger[:, 0], pos[:, 0])  # CLS kept
    with pytest.raises(ValueError, match="square"):
        interpolate_position_embeddings(torch.randn(1, 1 + 15, 8), (4, 4))


@pytest.mark.parametrize("preset, count", [("vit-base-patch16-224", 86_567_656),
                                           ("vit-large-patch16-224", 304_326_632)])
def test_preset_parameter_counts(preset, count):
    """The counts of Hugging Face's ViTForImageClassification with 1000 labels (no pooler)."""
    with torch.device("meta"):
        model = ViT(ViTConfig.from_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == count


def test_errors():
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="unknown ViT preset"):
        ViTConfig.from_preset("vit-huge")
    model = ViT(ViTConfig(image_size=16, patch_size=4, n_channels=1, d_model=16, n_layers=1, n_heads=2,
                          ffn_hidden=32, n_classes=2))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 1, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(torch.randn(1, 1, 20, 20))
    assert model(torch.randn(1, 1, 20, 20), interpolate_pos_encoding=True).shape == (1, 2)


def test_attention_maps_are_distributions():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=16, patch_size=4, n_channels=1, d_model=16, n_layers=2, n_heads=2,
                          ffn_hidden=32, n_classes=2)).eval()
    maps = model.attention_maps(torch.randn(3, 1, 16, 16))
    assert len(maps) == 2 and maps[0].shape == (3, 2, 17, 17)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(3, 2, 17))


def test_attention_maps_equal_hugging_face_also_interpolated(tmp_path):
    theirs, ours = _hf_pair(tmp_path, "rgb-32")
    theirs.set_attn_implementation("eager")  # the eager path returns the attention probabilities
    for size, interpolate in [((32, 32), False), ((48, 40), True)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = theirs(x, output_attentions=True, interpolate_pos_encoding=interpolate).attentions
        got = ours.attention_maps(x, interpolate_pos_encoding=interpolate)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=0)  # probabilities of float32 softmaxes
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours.attention_maps(torch.randn(1, 3, 48, 40))

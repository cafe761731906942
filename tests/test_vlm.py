"""The vision-language adapter: the placeholder becomes the image's slots, the image vectors land exactly there (in
reading order), the loss trains only the answer, frozen parts get no gradient and stay bit-identical, cached
generation equals uncached, bad input is refused; the digit questions; the committed digits ViT."""

import pytest
import torch

from llm_scratch.data import load_digits
from llm_scratch.models import GPT2, GPT2Config, Llama3, Llama3Config, ViT, ViTConfig
from llm_scratch.models.vlm import (
    IMAGE_TOKEN_ID,
    ImagePlaceholderTokenizer,
    VisionLanguageModel,
    VLMDataset,
    encode_image_example,
    generate_image_answers,
    set_trainable,
)
from llm_scratch.tasks import DIGIT_WORDS, IMAGE_FAMILIES, ImageExample, make_digit_examples
from llm_scratch.tokenizer import get_tokenizer
from llm_scratch.training.engine import TrainConfig, Trainer
from llm_scratch.training.losses import IGNORE_INDEX

N = 4  # a 4 x 4 image with patch 2 -> 2 x 2 = 4 patches = 4 slots


@pytest.fixture(scope="module")
def tok():
    return ImagePlaceholderTokenizer(get_tokenizer("shakespeare"), n_image_tokens=N)


def _vlm(tok, lm="gpt2"):
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=4, patch_size=2, n_channels=1, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32,
                        n_classes=10))
    if lm == "gpt2":
        decoder = GPT2(GPT2Config(vocab_size=tok.n_vocab, context_length=96, d_model=32, n_layers=2, n_heads=2))
    else:
        decoder = Llama3(Llama3Config(vocab_size=tok.n_vocab, context_length=96, d_model=32, n_layers=2, n_heads=4,
                                      n_kv_heads=2, ffn_hidden=48, rope_scaling=None,
                                      init_std=0.3))  # larger weights than 0.02: random greedy text that varies
    return VisionLanguageModel(vit, decoder).eval()


def _examples(n=6, families=IMAGE_FAMILIES):
    return make_digit_examples(torch.arange(n) % 10, families)


def test_placeholder_tokenizer_expands_and_collapses(tok):
    base = get_tokenizer("shakespeare")
    ids = tok.encode("look: <image> and <image>!")
    assert ids == (base.encode("look: ") + [IMAGE_TOKEN_ID] * N + base.encode(" and ") + [IMAGE_TOKEN_ID] * N
                   + base.encode("!"))
    assert tok.decode(ids) == "look: <image> and <image>!"
    assert tok.encode("<image>") == [IMAGE_TOKEN_ID] * N
    with pytest.raises(ValueError, match="is a token of the vocabulary"):
        ImagePlaceholderTokenizer(base, N, image_token_id=7)
    with pytest.raises(ValueError, match="n_image_tokens"):
        ImagePlaceholderTokenizer(base, 0)


@pytest.mark.parametrize("lm", ["gpt2", "llama3"])
def test_images_land_at_their_placeholders_in_reading_order(tok, lm):
    vlm = _vlm(tok, lm)
    row0 = tok.encode("a <image> b <image>")  # two images: pixel_values[0] then [1]
    row1 = tok.encode("c c c <image> d d d d")  # pixel_values[2]
    T = max(len(row0), len(row1))
    ids = torch.full((2, T), 5)
    ids[0, :len(row0)], ids[1, :len(row1)] = torch.tensor(row0), torch.tensor(row1)
    images = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        embeds = vlm.embed(ids, images)
        features = vlm.projector(vlm.vision.hidden_states(images)[:, 1:])  # (3, N, D): patches, no CLS
        text = vlm.language_model.embed_tokens(ids.clamp(min=0))
    slots = ids == IMAGE_TOKEN_ID
    assert slots.sum().item() == 3 * N
    starts = [(0, row0.index(IMAGE_TOKEN_ID)), (0, len(row0) - N), (1, row1.index(IMAGE_TOKEN_ID))]
    for image, (b, start) in enumerate(starts):
        assert slots[b, start:start + N].all()
        assert torch.equal(embeds[b, start:start + N], features[image])
    assert torch.equal(embeds[~slots], text[~slots])  # every other position is its token's embedding


def test_logits_are_the_language_model_on_the_spliced_embeddings(tok):
    vlm = _vlm(tok, "llama3")
    ids = torch.tensor([tok.encode("x <image> y z")])
    image = torch.randn(1, 1, 4, 4)
    with torch.no_grad():
        expected = vlm.language_model(inputs_embeds=vlm.embed(ids, image))
        assert torch.equal(vlm(ids, image), expected)
        other = vlm(ids, torch.randn(1, 1, 4, 4))
    first_slot = ids[0].tolist().index(IMAGE_TOKEN_ID)
    # causal: a different image changes nothing before its slots, and the logits from its slots on
    assert torch.equal(other[:, :first_slot], expected[:, :first_slot])
    assert not torch.allclose(other[:, first_slot:], expected[:, first_slot:])


def test_loss_targets_cover_only_the_answer(tok):
    examples = make_digit_examples([3, 8], ("caption", "parity"))  # images 0, 0, 1, 1
    images = torch.rand(2, 1, 4, 4)
    data = VLMDataset(tok, examples, images, context_length=96)
    inputs, targets = data.collate([data[i] for i in range(4)])
    end = tok.encode("<|im_end|>", allowed_special={"<|im_end|>"})[0]
    for b, ex in enumerate(examples):
        ids, mask = encode_image_example(tok, ex)
        n = len(ids) - 1
        answer = tok.encode(ex.answer)
        trained = targets[b][targets[b] != IGNORE_INDEX].tolist()
        assert trained == answer + [end]  # the answer and its closing marker, nothing else
        assert (targets[b, n:] == IGNORE_INDEX).all() and not inputs["padding_mask"][b, n:].any()  # padding
        slot_positions = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().flatten()
        assert len(slot_positions) == N and (targets[b, slot_positions] == IGNORE_INDEX).all()
        # targets[t] is the token at t + 1 wherever it is trained
        where = (targets[b] != IGNORE_INDEX).nonzero().flatten()
        assert torch.equal(targets[b, where], torch.tensor(ids)[where + 1])
        assert torch.equal(inputs["input_ids"][b, :n], torch.tensor(ids[:-1]))
        assert [m for m, t in zip(mask[1:], targets[b, :n].tolist(), strict=True) if t != IGNORE_INDEX] == [True] * len(
            trained)
    assert torch.equal(inputs["pixel_values"], images[[0, 0, 1, 1]])


def test_frozen_parts_get_no_gradient_and_stay_unchanged(tok):
    vlm = _vlm(tok)
    n_trainable = set_trainable(vlm)  # stage 1: the projector only
    assert n_trainable == sum(p.numel() for p in vlm.projector.parameters())
    frozen = {k: v.clone() for k, v in vlm.state_dict().items() if not k.startswith("projector.")}
    projector = {k: v.clone() for k, v in vlm.projector.state_dict().items()}
    examples = _examples(8)
    data = VLMDataset(tok, examples, torch.rand(8, 1, 4, 4), context_length=96)
    inputs, targets = data.collate([data[i] for i in range(4)])
    torch.nn.functional.cross_entropy(vlm(**inputs).flatten(0, 1), targets.flatten()).backward()
    for name, p in vlm.named_parameters():
        assert (p.grad is None) == (not name.startswith("projector.")), name
    vlm.zero_grad(set_to_none=True)
    trainer = Trainer(vlm, data, data, TrainConfig(max_steps=2, batch_size=4, lr=1e-2, eval_every=0, eval_batches=1,
                                                   progress=False), device="cpu", collate=data.collate)
    trainer.train_step()
    for k, v in vlm.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(v, projector[k]) for k, v in vlm.projector.state_dict().items())
    # stage 2 trains the language model too; the vision encoder stays frozen
    assert set_trainable(vlm, language_model=True) == n_trainable + sum(
        p.numel() for p in vlm.language_model.parameters())
    torch.nn.functional.cross_entropy(vlm(**inputs).flatten(0, 1), targets.flatten()).backward()
    assert all(p.grad is None for p in vlm.vision.parameters())
    assert all(p.grad is not None for p in vlm.language_model.parameters())


@pytest.mark.parametrize("lm", ["gpt2", "llama3"])
def test_cached_generation_equals_uncached(tok, lm):
    vlm = _vlm(tok, lm)
    with torch.no_grad():  # a larger projector scale, so the images actually steer what is generated
        vlm.projector[2].weight.mul_(20)
    examples = _examples(5)  # prompts of different lengths: left padding in the batch
    images = torch.rand(5, 1, 4, 4)
    cached = generate_image_answers(vlm, tok, examples, images, max_new_tokens=8, use_cache=True)
    uncached = generate_image_answers(vlm, tok, examples, images, max_new_tokens=8, use_cache=False)
    assert cached == uncached
    other = generate_image_answers(vlm, tok, examples, torch.rand(5, 1, 4, 4), max_new_tokens=8)
    assert other != cached  # the images matter to the answers


def test_bad_input_is_refused_by_name(tok):
    vlm = _vlm(tok)
    with_one = torch.tensor([tok.encode("<image> what?")])
    text_only = torch.tensor([tok.encode("what?")])
    image = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="no image placeholder"):
        vlm(text_only, image)
    with pytest.raises(ValueError, match=r"pixel_values holds 2 image\(s\)"):
        vlm(with_one, torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"2 placeholders of 4 slots\) but pixel_values holds 1"):
        vlm(torch.tensor([tok.encode("<image><image> what?")]), image)
    with pytest.raises(ValueError, match="no pixel_values were given"):
        vlm(with_one)
    for bad in (torch.rand(1, 1, 8, 8), torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4)):
        with pytest.raises(ValueError, match=r"pixel_values must have shape \(n_images, 1, 4, 4\)"):
            vlm(with_one, bad)
    assert vlm(text_only).shape == (1, text_only.shape[1], tok.n_vocab)  # text alone is fine
    with pytest.raises(ValueError, match="language_model must be a decoder"):
        VisionLanguageModel(vlm.vision, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not an index into the 2 images"):
        VLMDataset(tok, _examples(3), torch.rand(2, 1, 4, 4), context_length=96)


def test_digit_examples_and_their_checks():
    labels = torch.arange(10)
    examples = make_digit_examples(labels)
    assert len(examples) == 10 * len(IMAGE_FAMILIES)
    for ex in examples:
        d = ex.label
        assert ex.image == d and ex.check(ex.answer)
        expected = {"digit": str(d), "plus_two": str(d + 2)}.get(ex.family)
        if expected is not None:
            assert ex.answer == expected
        elif ex.family == "parity":
            assert ex.answer == ("yes" if (d % 2 == 0) == ("even" in ex.question) else "no")
        else:
            assert DIGIT_WORDS[d] in ex.answer.replace(",", "").split()
    assert make_digit_examples(labels, seed=3) == make_digit_examples(labels, seed=3)  # seeded
    caption = ImageExample(0, 7, "caption", "Describe the image.", "a handwritten seven")
    assert caption.check("The digit seven.") and not caption.check("a handwritten 7")
    assert not caption.check("a seven or a one") and not caption.check("a handwritten eight")
    parity = ImageExample(0, 7, "parity", "Is it even?", "no")
    assert parity.check(" No.") and not parity.check("yes")
    assert ImageExample(0, 7, "plus_two", "What is it plus two?", "9").check("9.0")
    with pytest.raises(ValueError, match="families must be"):
        make_digit_examples(labels, ["colour"])
    with pytest.raises(ValueError, match="digits 0..9"):
        make_digit_examples([10])


def test_committed_digits_vit_loads_strictly_and_has_its_recorded_accuracy():
    from llm_scratch.training.pretrained import load_or_train_digits_vit

    vit, info = load_or_train_digits_vit(progress=False)  # strict keys and the recorded SHA-256
    _, _, test_x, test_y = load_digits()
    with torch.no_grad():
        accuracy = (vit(test_x).argmax(-1) == test_y).float().mean().item()
    recorded = info["metadata"]["accuracy"]["test"]
    assert abs(accuracy - recorded) < 1 / len(test_y)  # the same predictions, up to one image on another CPU
    assert accuracy >= 0.95

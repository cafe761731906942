"""Supervised fine-tuning: the loss mask, packing (block-diagonal mask, restarting positions), the trainer."""

import pytest
import torch

from llm_scratch.models.gpt2 import GPT2, GPT2Config
from llm_scratch.models.hybrid import HybridConfig, HybridLM
from llm_scratch.models.llama3 import Llama3, Llama3Config
from llm_scratch.tasks import make_tasks
from llm_scratch.tokenizer import get_tokenizer
from llm_scratch.tokenizer.chat import IM_END
from llm_scratch.training.engine import ResumableBatches, TrainConfig
from llm_scratch.training.losses import IGNORE_INDEX, cross_entropy_loss
from llm_scratch.training.sft import (
    SFTDataset,
    collate_sft,
    encode_example,
    encode_prompt,
    pack_sequences,
    packed_attention_mask,
    packed_positions,
    sft_trainer,
    task_messages,
)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("shakespeare")


@pytest.fixture(scope="module")
def examples():
    return make_tasks(6, "train")  # 54 examples, every family


def test_task_messages_put_the_input_on_its_own_line():
    ex = make_tasks(1, "train", families=["reverse"])[0]
    user, assistant = task_messages(ex)
    assert user == {"role": "user", "content": f"{ex.instruction}\n{ex.input}"}
    assert assistant == {"role": "assistant", "content": ex.answer}
    add = make_tasks(1, "train", families=["add"])[0]  # no input: the instruction alone
    assert task_messages(add, with_answer=False) == [{"role": "user", "content": add.instruction}]


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer, examples):
    for ex in examples:
        ids, mask = encode_example(tokenizer, ex)
        trained = [t for t, m in zip(ids, mask, strict=True) if m]
        assert tokenizer.decode(trained) == ex.answer + IM_END  # the answer and its end-of-turn, nothing else
        # the prompt is exactly what precedes the answer: generation sees what training saw
        prompt = encode_prompt(tokenizer, ex)
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
        assert all(mask[len(prompt):len(prompt) + len(trained)])


def test_collate_targets_are_shifted_and_masked(tokenizer, examples):
    data = SFTDataset(tokenizer, examples[:5], context_length=128)
    inputs, targets = data.collate([data[i] for i in range(5)])
    for b, ex in enumerate(examples[:5]):
        ids, mask = encode_example(tokenizer, ex)
        n = len(ids) - 1
        assert inputs["input_ids"][b, :n].tolist() == ids[:-1]
        assert inputs["padding_mask"][b].sum() == n and inputs["padding_mask"][b, :n].all()
        expected = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
        assert targets[b, :n].tolist() == expected
        assert (targets[b, n:] == IGNORE_INDEX).all()  # padding is never a target


def test_pack_sequences_first_fit():
    rows = pack_sequences([5, 3, 4, 2, 6, 1], capacity=8)
    assert rows == [[0, 1], [2, 3, 5], [4]]
    lengths = torch.randint(1, 40, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = pack_sequences(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(200))  # each sequence exactly once
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert all(row == sorted(row) for row in rows)
    with pytest.raises(ValueError, match="capacity"):
        pack_sequences([70], 64)
    with pytest.raises(ValueError, match="capacity"):
        pack_sequences([3], 0)


def test_packed_positions_and_mask_against_a_loop():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2]])
    pos = packed_positions(seg)
    mask = packed_attention_mask(seg)
    for b in range(2):
        for t in range(8):
            start = t
            while start > 0 and seg[b, start - 1] == seg[b, t]:
                start -= 1
            assert pos[b, t] == t - start
            for s in range(8):
                assert mask[b, t, s] == (seg[b, t] == seg[b, s])


def _tiny_models():
    torch.manual_seed(0)
    vocab = get_tokenizer("shakespeare").n_vocab
    yield GPT2(GPT2Config(vocab_size=vocab, context_length=128, d_model=32, n_layers=2, n_heads=4))
    yield Llama3(Llama3Config(vocab_size=vocab, context_length=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              ffn_hidden=64))


@pytest.mark.parametrize("model", list(_tiny_models()), ids=["gpt2", "llama3"])
def test_packed_loss_equals_unpacked_loss(tokenizer, examples, model):
    model.eval()
    packed = SFTDataset(tokenizer, examples, context_length=128, pack=True)
    unpacked = SFTDataset(tokenizer, examples, context_length=128, pack=False)
    assert len(packed) < len(unpacked) / 2  # it did pack
    x_p, y_p = packed.collate([packed[i] for i in range(len(packed))])
    x_u, y_u = unpacked.collate([unpacked[i] for i in range(len(unpacked))])
    with torch.no_grad():
        logits_p, logits_u = model(**x_p), model(**x_u)
    # the same mean over the same answer tokens (float32; 1e-5 relative covers summation order)
    torch.testing.assert_close(cross_entropy_loss(logits_p, y_p), cross_entropy_loss(logits_u, y_u), rtol=1e-5,
                               atol=0)
    # and token for token: every example's logits in its packed row equal its logits alone
    row_of = {i: (r, sum(len(packed.sequences[j][0]) for j in row[:row.index(i)]))
              for r, row in enumerate(packed.rows) for i in row}
    for i in range(len(unpacked)):
        r, offset = row_of[i]
        n = len(unpacked.sequences[i][0])
        torch.testing.assert_close(logits_p[r, offset:offset + n], logits_u[i, :n], atol=1e-5, rtol=0)
    # without the block-diagonal mask (positions still restarting) examples would see each other
    leaky = model(input_ids=x_p["input_ids"], positions=x_p["positions"])
    assert not torch.allclose(leaky, logits_p, atol=1e-3)


def test_recurrent_layers_refuse_packing():
    cfg = HybridConfig(vocab_size=50, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       ffn_hidden=64, pattern="MA", ssm_state=8, ssm_head_dim=8)
    model = HybridLM(cfg)
    seg = torch.tensor([[1, 1, 2, 2]])
    with pytest.raises(ValueError, match="attn_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attn_mask=packed_attention_mask(seg))


def test_dataset_errors(tokenizer, examples):
    with pytest.raises(ValueError, match="context_length=10"):
        SFTDataset(tokenizer, examples, context_length=10)
    with pytest.raises(ValueError, match="empty"):
        SFTDataset(tokenizer, [], context_length=128)
    data = SFTDataset(tokenizer, examples, context_length=128, pack=True)
    with pytest.raises(ValueError, match="exactly one"):
        collate_sft([data[0]], pad_id=0, packed=False)


def test_sft_trainer_trains_on_answer_tokens_only(tokenizer, examples):
    model = next(_tiny_models())
    cfg = TrainConfig(max_steps=4, batch_size=2, lr=3e-3, eval_every=0, eval_batches=2, progress=False)
    trainer = sft_trainer(model, tokenizer, examples, make_tasks(1, "validation"), cfg, device="cpu")
    data = trainer.train_batches.dataset
    assert data.pack
    # the same batches the trainer will draw (the order depends only on the seed)
    replay = ResumableBatches(data, cfg.batch_size, seed=cfg.seed, collate=data.collate)
    expected_targets = sum(int((next(replay)[1] != IGNORE_INDEX).sum()) for _ in range(cfg.max_steps))
    history = trainer.train()
    assert trainer.tokens_seen == expected_targets  # answer tokens and end-of-turn tokens only
    assert history.val_loss and all(torch.isfinite(torch.tensor(history.train_loss)))
    assert history.train_loss[-1] < history.train_loss[0]


def test_committed_sft_model_loads_strictly_and_reproduces_its_accuracy(tokenizer):
    """The SFT model later chapters start from: strict keys, the settings `make artifacts` would use, and its
    recorded held-out accuracy recomputed by greedy generation. Greedy decoding can flip where two logits
    nearly tie, and another CPU sums in another order, so each family may differ by one example of 50."""
    from llm_scratch.checkpoint import checkpoint_paths
    from llm_scratch.training.pretrained import SFT_TRAINING, SHAKESPEARE_SFT, load_or_finetune, sft_eval_examples
    from llm_scratch.training.sft import evaluate_tasks

    st_path, json_path = checkpoint_paths(SHAKESPEARE_SFT)
    assert st_path.exists() and json_path.exists(), "run `make artifacts` to build it"
    model, info = load_or_finetune(device="cpu")
    meta = info["metadata"]
    assert {k: meta[k] for k in SFT_TRAINING} == SFT_TRAINING
    assert set(meta["accuracy"]) == {"pretrained_base", "random_init_sft", "pretrained_sft"}
    examples = sft_eval_examples()
    accuracy = evaluate_tasks(model, tokenizer, examples)
    recorded = meta["accuracy"]["pretrained_sft"]
    assert set(accuracy) == set(recorded)
    per_family = SFT_TRAINING["eval_per_family"]
    for family, value in accuracy.items():
        slack = 1 / per_family if family != "all" else 2 / len(examples)
        assert abs(value - recorded[family]) <= slack + 1e-9, (family, value, recorded[family])


def test_committed_checkpoints_stay_small():
    """GUIDE.md: the committed models are a few MB each, well under 20 MB in all."""
    from llm_scratch.training.pretrained import REPO_ROOT

    total = sum(p.stat().st_size for p in (REPO_ROOT / "data" / "checkpoints").glob("*.safetensors"))
    assert total < 16 * 2**20, f"{total / 2**20:.1f} MiB of checkpoints"

"""The runner over paged KV must reproduce stateless transformers runs: packed, multi-step, swapped, dropped."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from executor.kv_store import PagedKVStore
from executor.models import LoadedModel, ModelLoadError, load_model, preset_dims
from executor.runner import ModelRunner, SeqInput, sample

TINY_PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-opt"]
ATOL = 1e-4
CHUNK = 8


def make_runner(loaded: LoadedModel) -> tuple[ModelRunner, PagedKVStore]:
    store = PagedKVStore.for_model(loaded.dims, device_slots=64, host_slots=16, chunk_tokens=CHUNK)
    return ModelRunner(loaded, store), store


@torch.inference_mode()
def stateless_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """Logits of a plain transformers forward over the whole sequence, [len, vocab]."""
    return model(input_ids=torch.tensor([tokens], device=model.device), use_cache=False).logits[0]


def greedy_reference(model: torch.nn.Module, tokens: list[int], n: int, eos_token_id: int | None = None) -> list[int]:
    """Up to `n` greedy tokens from `model.generate` on the full history (by default EOS does not stop it)."""
    ids = torch.tensor([tokens], device=model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=eos_token_id,
        pad_token_id=0,
    )
    return out[0, len(tokens) :].tolist()


class Slots:
    """Device (or host) slots handed out in a shuffled order, so block tables are non-contiguous."""

    def __init__(self, count: int, seed: int = 0) -> None:
        self.free = list(range(count))
        random.Random(seed).shuffle(self.free)

    def take(self) -> int:
        return self.free.pop(0)

    def give(self, slot: int) -> None:
        self.free.append(slot)


@dataclass
class Conversation:
    """A sequence's tokens and block table, as the core's cache manager would keep them."""

    tokens: list[int]
    chunk_tokens: int
    table: list[int] = field(default_factory=list)

    def query(self, positions: list[int] | range, slots: Slots) -> SeqInput:
        """This step's input for `positions`, growing the block table to cover them."""
        positions = list(positions)
        context_len = positions[-1] + 1
        while len(self.table) * self.chunk_tokens < context_len:
            self.table.append(slots.take())
        return SeqInput([self.tokens[p] for p in positions], positions, list(self.table), context_len)

    def decode_query(self, slots: Slots) -> SeqInput:
        """The last token, sampled but not yet run."""
        return self.query([len(self.tokens) - 1], slots)


def random_tokens(n: int, seed: int, vocab: int = 512) -> list[int]:
    """Token ids away from the special ids 0-2."""
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def decode(runner: ModelRunner, convs: list[Conversation], slots: Slots, steps: int) -> None:
    """Greedy decode steps with every conversation in one batch, checking logits against stateless runs."""
    model = runner.model
    for _ in range(steps):
        logits = runner.forward([c.decode_query(slots) for c in convs])
        for conv, row in zip(convs, logits):
            assert_close(row, stateless_logits(model, conv.tokens)[-1])
            conv.tokens.append(int(row.argmax()))


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_packed_batch_matches_separate_runs(preset: str, tiny_model: Callable[[str], LoadedModel]) -> None:
    runner, _ = make_runner(tiny_model(preset))
    slots = Slots(64)
    convs = [Conversation(random_tokens(n, seed=n), CHUNK) for n in (5, 1, 37, 16, 2)]
    logits = runner.forward([c.query(range(len(c.tokens)), slots) for c in convs], all_logits=True)
    expected = torch.cat([stateless_logits(runner.model, c.tokens) for c in convs])
    assert logits.shape == expected.shape
    assert_close(logits, expected)
    last = runner.forward([c.query(range(len(c.tokens)), slots) for c in convs])
    assert_close(last, torch.stack([stateless_logits(runner.model, c.tokens)[-1] for c in convs]))


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_multi_step_prefill_then_decode_matches_generate(preset: str, tiny_model: Callable[[str], LoadedModel]) -> None:
    runner, _ = make_runner(tiny_model(preset))
    slots = Slots(64, seed=1)
    a, b = Conversation(random_tokens(30, seed=1), CHUNK), Conversation(random_tokens(11, seed=2), CHUNK)
    prompt_a, prompt_b = list(a.tokens), list(b.tokens)

    first = runner.forward([a.query(range(13), slots), b.query(range(11), slots)])  # A's first part, B whole
    assert_close(first[1], stateless_logits(runner.model, b.tokens)[-1])
    b.tokens.append(int(first[1].argmax()))
    logits = runner.forward([a.query(range(13, 30), slots)])  # the rest of A reuses its paged KV
    assert_close(logits[0], stateless_logits(runner.model, a.tokens)[-1])
    a.tokens.append(int(logits[0].argmax()))

    decode(runner, [a, b], slots, steps=12)  # different context lengths: the padded decode path
    assert a.tokens[30:] == greedy_reference(runner.model, prompt_a, 13)
    assert b.tokens[11:] == greedy_reference(runner.model, prompt_b, 13)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-opt"])
def test_swap_out_and_back_into_other_slots(preset: str, tiny_model: Callable[[str], LoadedModel]) -> None:
    runner, store = make_runner(tiny_model(preset))
    slots, host = Slots(64, seed=2), Slots(16, seed=3)
    a = Conversation(random_tokens(40, seed=3), CHUNK)
    prompt = list(a.tokens)
    a.tokens.append(int(runner.forward([a.query(range(40), slots)])[0].argmax()))
    decode(runner, [a], slots, steps=2)

    moved = [0, 1, 3]  # chunks of A to send to the host; chunks 2, 4 and 5 stay on the device
    out_pairs = [(a.table[i], host.take()) for i in moved]
    before = store.device_pool[:, [d for d, _ in out_pairs]].clone()
    store.swap_out(out_pairs)
    store.synchronize()
    assert torch.equal(store.host_pool[:, [h for _, h in out_pairs]], before)

    for device_slot, _ in out_pairs:  # the device copies are reclaimed and overwritten
        store.device_pool[:, device_slot].normal_(std=100.0)
        slots.give(device_slot)
    in_pairs = [(h, slots.take()) for _, h in out_pairs]
    assert not {d for _, d in in_pairs} & {d for d, _ in out_pairs}
    assert store.swap_in(in_pairs) is None  # CPU: the copy is done, no events to wait on
    for i, (_, device_slot) in zip(moved, in_pairs):
        a.table[i] = device_slot

    decode(runner, [a], slots, steps=6)
    assert a.tokens[40:] == greedy_reference(runner.model, prompt, 9)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_dropped_leading_chunks_recomputed_with_new_prompt(
    preset: str, tiny_model: Callable[[str], LoadedModel]
) -> None:
    runner, store = make_runner(tiny_model(preset))
    slots = Slots(64, seed=4)
    a, b = Conversation(random_tokens(50, seed=5), CHUNK), Conversation(random_tokens(20, seed=6), CHUNK)
    logits = runner.forward([a.query(range(50), slots), b.query(range(20), slots)])
    b.tokens.append(int(logits[1].argmax()))

    dropped = 2  # A's first two chunks are dropped: slots overwritten and handed to others
    for i in range(dropped):
        store.device_pool[:, a.table[i]].normal_(std=100.0)
        slots.give(a.table[i])
        a.table[i] = slots.take()
    a.tokens += random_tokens(12, seed=7)  # the next turn's prompt, positions 50..61
    c = Conversation(random_tokens(9, seed=8), CHUNK)

    # One forward: A recomputes [0, 16) and computes [50, 62) over reused [16, 50); B decodes; C prefills.
    a_positions = list(range(dropped * CHUNK)) + list(range(50, 62))
    batch = [a.query(a_positions, slots), b.decode_query(slots), c.query(range(9), slots)]
    logits = runner.forward(batch, all_logits=True)
    expected = torch.cat([
        stateless_logits(runner.model, a.tokens)[a_positions],
        stateless_logits(runner.model, b.tokens)[-1:],
        stateless_logits(runner.model, c.tokens),
    ])
    assert_close(logits, expected)

    prompt = list(a.tokens)
    a.tokens.append(int(logits[len(a_positions) - 1].argmax()))
    decode(runner, [a], slots, steps=5)
    assert a.tokens[62:] == greedy_reference(runner.model, prompt, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_paging_with_layer_events() -> None:
    loaded = load_model("random:tiny-llama", device="cuda")
    assert loaded.torch_dtype == torch.float16
    store = PagedKVStore.for_model(loaded.dims, device_slots=64, host_slots=16, chunk_tokens=CHUNK, device="cuda")
    assert store.host_pool.is_pinned()
    runner = ModelRunner(loaded, store)
    slots, host = Slots(64, seed=7), Slots(16, seed=8)
    a, b = Conversation(random_tokens(40, seed=9), CHUNK), Conversation(random_tokens(9, seed=10), CHUNK)
    logits = runner.forward([a.query(range(40), slots), b.query(range(9), slots)])
    a.tokens.append(int(logits[0].argmax()))
    b.tokens.append(int(logits[1].argmax()))

    out_pairs = [(a.table[i], host.take()) for i in range(len(a.table))]
    store.swap_out(out_pairs)
    store.synchronize()  # the test scribbles on the source slots from outside the copy stream
    for device_slot, _ in out_pairs:
        store.device_pool[:, device_slot].normal_(std=100.0)
        slots.give(device_slot)
    in_pairs = [(h, slots.take()) for _, h in out_pairs]
    events = store.swap_in(in_pairs)
    assert len(events) == loaded.dims["layers"]
    a.table = [d for _, d in in_pairs]

    for _ in range(4):  # the attention of each layer waits on its own swap-in event
        logits = runner.forward([a.decode_query(slots), b.decode_query(slots)])
        for conv, row in zip([a, b], logits):
            expected = stateless_logits(loaded.model, conv.tokens)[-1]
            torch.testing.assert_close(row.float(), expected.float(), atol=2e-2, rtol=0)
            conv.tokens.append(int(row.argmax()))


def test_unknown_preset_lists_the_allowed_ones() -> None:
    with pytest.raises(ModelLoadError, match="tiny-llama.*llama-2-13b"):
        load_model("random:tiny-mamba")


@pytest.mark.parametrize("device", ["cuda:7", "garbage", "mps"] + ([] if torch.cuda.is_available() else ["cuda:0"]))
def test_bad_device_is_rejected_before_loading(device: str) -> None:
    with pytest.raises(ModelLoadError, match="device"):
        load_model(None, device=device)


def test_unsupported_architecture_and_missing_files(tmp_path) -> None:
    from transformers import BertConfig

    bert = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32)
    bert.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'bert'.*llama, mistral, qwen2, gpt2, opt"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("random:tiny-llama", dtype="int8")


def test_big_preset_dims_need_no_allocation() -> None:
    llama = preset_dims("llama-2-13b")
    assert (llama["layers"], llama["hidden_size"], llama["heads"], llama["kv_heads"], llama["head_dim"]) == (
        40, 5120, 40, 10, 128)
    assert (llama["intermediate_size"], llama["vocab_size"], llama["max_context"]) == (13824, 32000, 4096)
    opt = preset_dims("random:opt-13b")
    assert (opt["layers"], opt["kv_heads"], opt["intermediate_size"], opt["vocab_size"], opt["max_context"]) == (
        40, 40, 20480, 50272, 2048)
    smol = preset_dims("smollm2-135m", dtype="float32")
    assert (smol["layers"], smol["heads"], smol["kv_heads"], smol["head_dim"], smol["dtype"]) == (
        30, 9, 3, 64, "float32")
    store = PagedKVStore(0, 0, layers=40, kv_heads=10, head_dim=128, chunk_tokens=32, dtype=torch.float16)
    assert store.bytes_per_chunk == 2 * 40 * 32 * 10 * 128 * 2


def test_store_that_does_not_fit_the_model_is_rejected(tiny_model: Callable[[str], LoadedModel]) -> None:
    loaded = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="does not fit"):
        ModelRunner(loaded, PagedKVStore(4, 0, layers=2, kv_heads=2, head_dim=16))


def test_bad_sequence_input_is_rejected(tiny_model: Callable[[str], LoadedModel]) -> None:
    runner, _ = make_runner(tiny_model("tiny-llama"))
    with pytest.raises(ValueError, match="ascending"):
        runner.forward([SeqInput([5, 6], [3, 2], [0], 4)])
    with pytest.raises(ValueError, match="inconsistent"):
        runner.forward([SeqInput([5, 6], [8, 9], [0], 10)])  # one block of 8 cannot hold position 9
    with pytest.raises(ValueError, match="inconsistent"):
        runner.forward([SeqInput([5], [0], [64], 1)])  # the store has device slots 0..63


def test_sample() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9]])
    assert sample(logits).tolist() == [1, 0]
    assert sample(logits, temperature=1.0, top_p=0.01).tolist() == [1, 0]
    draws = [sample(logits, 1.0, 1.0, torch.Generator().manual_seed(s)).tolist() for s in range(2)]
    assert draws == [sample(logits, 1.0, 1.0, torch.Generator().manual_seed(s)).tolist() for s in range(2)]


def test_smollm2_gguf_two_turn_chat_with_paging(no_network) -> None:
    loaded = load_model(None)
    tok, model = loaded.tokenizer, loaded.model
    assert loaded.dims["layers"] == 30 and loaded.dims["kv_heads"] == 3 and loaded.dims["dtype"] == "float32"
    chunk = 32
    store = PagedKVStore.for_model(loaded.dims, device_slots=12, host_slots=4, chunk_tokens=chunk)
    runner = ModelRunner(loaded, store)
    slots, host = Slots(12, seed=5), Slots(4, seed=6)

    def greedy_turn(conv: Conversation, query: SeqInput) -> None:
        start = len(conv.tokens)
        reference = greedy_reference(model, conv.tokens, 16, eos_token_id=tok.eos_token_id)
        conv.tokens.append(int(runner.forward([query])[0].argmax()))
        while len(conv.tokens) - start < len(reference):
            conv.tokens.append(int(runner.forward([conv.decode_query(slots)])[0].argmax()))
        assert conv.tokens[start:] == reference

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    conv = Conversation(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"], chunk)
    greedy_turn(conv, conv.query(range(len(conv.tokens)), slots))

    # Between turns chunk 1 goes to the host and back into another slot, and chunk 0 is dropped.
    device_slot, host_slot = conv.table[1], host.take()
    store.swap_out([(device_slot, host_slot)])
    store.device_pool[:, device_slot].zero_()
    conv.table[1] = slots.take()
    store.swap_in([(host_slot, conv.table[1])])
    store.device_pool[:, conv.table[0]].normal_()

    history = len(conv.tokens)  # the last answer token was sampled but never run: it opens the new span
    end_of_answer = "" if conv.tokens[-1] == tok.eos_token_id else tok.eos_token
    suffix = f"{end_of_answer}\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n"
    conv.tokens += tok.encode(suffix, add_special_tokens=False)
    greedy_turn(conv, conv.query(list(range(chunk)) + list(range(history - 1, len(conv.tokens))), slots))

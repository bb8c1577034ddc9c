"""Generation: cache vs no cache, greedy equivalences, top-p on a known distribution, beams,
batching with left padding, compiled static-shape decoding, stop strings (also across tokens),
seeds and streaming, and the checks every sampling option gets."""

from __future__ import annotations

import shutil

import pytest
import torch

from llm_lightning.config import LLaMAConfig
from llm_lightning.errors import SettingError
from llm_lightning.fused_projections import fused_projections
from llm_lightning.generation import _beam_search, filter_logits, generate, stream
from llm_lightning.lora import LoRAConfig, apply_lora, lora_disabled, merge_lora, unmerge_lora
from llm_lightning.model import LLaMA
from llm_lightning.loading import embedded_tokenizer
from llm_lightning.prompts import get_template
from llm_lightning.sampling import SamplingOptions, held_back

pytestmark = pytest.mark.kernels  # numerics through cpu_kernels' paths: CI runs these on every path

PROMPTS = ["What is the capital of France?", "Name three colors.", "Write the number 42 in words."]


@pytest.fixture(scope="module")
def smollm2(default_model):
    return default_model


def chat(text: str) -> str:
    return get_template("auto", embedded_tokenizer()).format(text)


def greedy_without_cache(model, tokenizer, prompt: str, steps: int) -> list[int]:
    ids = tokenizer.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            out.append(token)
    return out


def test_cached_greedy_equals_uncached_greedy(smollm2):
    model, tokenizer = smollm2
    prompt = chat(PROMPTS[2])
    expected = tokenizer.decode(greedy_without_cache(model, tokenizer, prompt, 20))
    assert generate(model, tokenizer, prompt, max_new_tokens=20) == expected


def test_fused_projections_compute_the_same_and_give_every_weight_back():
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=64)).eval()
    apply_lora(model.layers[1], LoRAConfig(r=2, targets=("wq", "wv")))
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = model(ids)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with fused_projections(model), torch.no_grad():
        first, second = model.layers
        assert first.attention.fused_qkv is not None and second.attention.fused_qkv is None  # LoRA keeps its own
        assert all(block.feed_forward.fused_w13 is not None for block in model.layers)
        stacked = first.attention.fused_qkv
        assert first.attention.wk.weight.data_ptr() == stacked[64:].data_ptr()  # a view, not a copy
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    assert all(block.attention.fused_qkv is None and block.feed_forward.fused_w13 is None for block in model.layers)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    pointers = [p.data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers) and all(p.is_contiguous() for p in model.parameters())


def test_calls_inside_one_fused_block_stack_once_and_sample_the_same(smollm2):
    """generate.py, chat and lm-eval's generate_until sample many prompts inside one block: the
    calls' own blocks must leave its stacking alone, and the text must not change."""
    model, tokenizer = smollm2
    prompts = [chat(p) for p in PROMPTS[:2]]
    expected = [generate(model, tokenizer, p, max_new_tokens=8) for p in prompts]
    with fused_projections(model):
        stacked = model.layers[0].attention.fused_qkv
        assert stacked is not None
        got = [generate(model, tokenizer, p, max_new_tokens=8) for p in prompts]
        assert model.layers[0].attention.fused_qkv is stacked  # not given back by the first call
        assert model.layers[0].attention.wq.weight.data_ptr() == stacked.data_ptr()
    assert got == expected and model.layers[0].attention.fused_qkv is None


@pytest.mark.parametrize("dora", [False, True])
def test_merged_or_switched_off_adapters_stack_and_compute_the_same(dora):
    # generate.py samples with the adapter merged; compare=true's base answers with it switched off.
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=64)).eval()
    apply_lora(model, LoRAConfig(r=2, targets=("wq", "wv"), dora=dora))
    for name, parameter in model.named_parameters():
        if name.endswith("lora_b"):
            torch.nn.init.normal_(parameter)  # a trained adapter: B no longer zero
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        adapted = model(ids)
        with lora_disabled(model):
            base = model(ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with lora_disabled(model), fused_projections(model), torch.no_grad():
        assert all(block.attention.fused_qkv is not None for block in model.layers)
        torch.testing.assert_close(model(ids), base, rtol=1e-5, atol=1e-5)
    merge_lora(model)
    with fused_projections(model), torch.no_grad():
        assert all(block.attention.fused_qkv is not None for block in model.layers)
        torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    with torch.no_grad():  # the adapter apart again, and every weight given back its own storage
        torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    assert all(block.attention.fused_qkv is None and not block.attention.wq.merged for block in model.layers)
    pointers = [p.data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)


def test_adapter_changes_while_its_layer_is_stacked_are_refused():
    """A stacked product reads the weights alone: switching the adapter back on (a stream begun
    inside lora_disabled and left unfinished), or unmerging it, mid-sampling would go on without it."""
    torch.manual_seed(0)
    tokenizer = embedded_tokenizer()
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)).eval()
    apply_lora(model, LoRAConfig(r=2, targets=("wq", "wv")))
    with pytest.raises(RuntimeError, match="lora_disabled\\(\\) ended while a sampling call"):
        with lora_disabled(model):
            pieces = stream(model, tokenizer, "Hello", max_new_tokens=8)
            next(pieces)
    assert not model.layers[0].attention.wq.disabled  # the adapter is on again, as the block promised
    pieces.close()  # the stream ends: the weights are given back, the layers no longer stacked
    assert not any(m.stacked for m in model.modules() if hasattr(m, "stacked"))
    with lora_disabled(model):  # a stream that ends inside the block is fine, and answers as the base model
        streamed = "".join(stream(model, tokenizer, "Hello", max_new_tokens=4))
        assert streamed == generate(model, tokenizer, "Hello", max_new_tokens=4)
        pieces = stream(model, tokenizer, "Hello", max_new_tokens=8)
        next(pieces)
        with lora_disabled(model):  # nested: leaving the inner block keeps the outer one in force
            pass
        assert model.layers[0].attention.wq.disabled
        pieces.close()
    assert not model.layers[0].attention.wq.disabled
    merge_lora(model)
    with fused_projections(model):
        with pytest.raises(RuntimeError, match="cannot unmerge a LoRA adapter while sampling"):
            unmerge_lora(model)
    unmerge_lora(model)
    assert not model.layers[0].attention.wq.merged


def test_sampling_under_inference_mode_leaves_weights_that_train():
    # Lightning validates under inference mode, and sample generations run there, between training steps.
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=64))
    apply_lora(model, LoRAConfig(r=2, targets=("wq", "wv")))
    ids = torch.randint(0, 64, (1, 6))
    with torch.inference_mode(), fused_projections(model):
        assert model.layers[0].feed_forward.fused_w13 is not None
        model(ids)
    assert not any(p.is_inference() for p in model.parameters())
    model(ids).sum().backward()  # saves the frozen w1/w3 for backward: fails if they became inference tensors
    assert model.layers[0].attention.wq.lora_b.grad is not None


def test_a_model_trains_after_generate_which_runs_in_inference_mode():
    tokenizer = embedded_tokenizer()
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=tokenizer.vocab_size))
    apply_lora(model, LoRAConfig(r=2, targets=("wq", "wv")))
    generate(model, tokenizer, "Hello", max_new_tokens=3)
    generate(model, tokenizer, "Hello", max_new_tokens=3, num_beams=2)
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    assert all(layer.attention.kv_cache is None for layer in model.layers)
    model(torch.randint(0, 64, (1, 6))).sum().backward()
    assert model.layers[0].attention.wq.lora_b.grad is not None


def test_top_k_1_and_one_beam_equal_greedy(smollm2):
    model, tokenizer = smollm2
    prompt = chat(PROMPTS[1])
    greedy = generate(model, tokenizer, prompt, max_new_tokens=16)
    assert generate(model, tokenizer, prompt, max_new_tokens=16, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(model, tokenizer, prompt, max_new_tokens=16, num_beams=1) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    kept = lambda p: set(torch.isfinite(filter_logits(logits, top_p=p))[0].nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.4) == {1}
    assert kept(0.41) == {1, 3}
    assert kept(0.7) == {1, 3}
    assert kept(0.71) == {1, 3, 4}
    assert kept(0.95) == {1, 2, 3, 4}
    assert kept(1.0) == {0, 1, 2, 3, 4}
    assert set(torch.isfinite(filter_logits(logits, top_k=2))[0].nonzero().flatten().tolist()) == {1, 3}


def _logprob(model, prompt_ids: list[int], continuation: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + continuation]))[0].float().log_softmax(-1)
    return sum(logits[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(continuation))


def test_beam_search_scores_at_least_greedy(smollm2):
    model, tokenizer = smollm2
    for text in PROMPTS:
        prompt_ids = tokenizer.encode(chat(text))
        greedy = greedy_without_cache(model, tokenizer, chat(text), 12)
        beam, beam_logprob = _beam_search(model, tokenizer, prompt_ids, num_beams=4, max_new_tokens=12,
                                          length_penalty=0.0)
        assert beam_logprob == pytest.approx(_logprob(model, prompt_ids, beam + ([tokenizer.eos_id] if len(beam) < 12 else [])), abs=1e-3)
        greedy_logprob = _logprob(model, prompt_ids, greedy + ([tokenizer.eos_id] if len(greedy) < 12 else []))
        assert beam_logprob >= greedy_logprob - 1e-4


def test_batched_left_padded_equals_one_by_one(smollm2):
    model, tokenizer = smollm2
    prompts = [chat(p) for p in PROMPTS]
    assert len({len(tokenizer.encode(p)) for p in prompts}) == 3  # really padded
    batched = generate(model, tokenizer, prompts, max_new_tokens=24)
    assert batched == [generate(model, tokenizer, p, max_new_tokens=24) for p in prompts]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_static_decoding_equals_eager(smollm2):
    """compile=True: a padded batch through the compiled static-shape step gives the eager text."""
    model, tokenizer = smollm2
    prompts = [chat(p) for p in PROMPTS[:2]]
    eager = generate(model, tokenizer, prompts, max_new_tokens=24)
    assert generate(model, tokenizer, prompts, max_new_tokens=24, compile=True) == eager


def test_stop_strings_cut_exactly(smollm2):
    model, tokenizer = smollm2
    prompt = chat("Count from 1 to 10, separated by commas.")
    full = generate(model, tokenizer, prompt, max_new_tokens=40)
    assert "5" in full
    cut = generate(model, tokenizer, prompt, max_new_tokens=40, stop=["5"])
    assert cut == full[: full.index("5")]
    assert generate(model, tokenizer, [prompt, chat(PROMPTS[0])], max_new_tokens=40, stop=["5"])[0] == cut


def test_sampling_is_deterministic_under_a_seed_and_streams(smollm2):
    model, tokenizer = smollm2
    prompt = chat("Tell me a short story about a cat.")
    options = dict(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=11)
    first = generate(model, tokenizer, prompt, **options)
    assert generate(model, tokenizer, prompt, **options) == first
    assert generate(model, tokenizer, prompt, **{**options, "seed": 12}) != first
    assert "".join(stream(model, tokenizer, prompt, **options)) == first


def test_repetition_penalty_changes_greedy_output(smollm2):
    model, tokenizer = smollm2
    prompt = chat("Repeat the word 'cat' ten times.")
    plain = generate(model, tokenizer, prompt, max_new_tokens=20)
    penalized = generate(model, tokenizer, prompt, max_new_tokens=20, repetition_penalty=1.5)
    assert plain != penalized


def test_stop_string_spanning_two_tokens_never_leaks(smollm2):
    """A stop string whose first character ends one token and whose second starts the next: the
    first character is held back until the next token shows it belongs to the stop string."""
    model, tokenizer = smollm2
    prompt = chat("Count from 1 to 10, separated by commas.")
    pieces = list(stream(model, tokenizer, prompt, max_new_tokens=40))
    full = "".join(pieces)
    boundaries = [sum(len(p) for p in pieces[:i]) for i in range(1, len(pieces))]
    boundary = next(b for b in boundaries if full.find(full[b - 1:b + 1]) == b - 1)
    stop = full[boundary - 1:boundary + 1]
    expected = full[:boundary - 1]
    assert generate(model, tokenizer, prompt, max_new_tokens=40, stop=[stop]) == expected
    assert "".join(stream(model, tokenizer, prompt, max_new_tokens=40, stop=[stop])) == expected
    assert generate(model, tokenizer, [prompt, chat(PROMPTS[0])], max_new_tokens=40, stop=[stop])[0] == expected
    assert generate(model, tokenizer, prompt, max_new_tokens=40, stop=None) == full


def test_held_back_is_the_longest_suffix_that_starts_a_stop_string():
    assert held_back("answer #", ["##"]) == 1
    assert held_back("answer ##", ["##"]) == 1  # "##" itself is cut, not held; its last "#" may start another
    assert held_back("abc", ["xyz", "bcd", "c!"]) == 2
    assert held_back("ab", ["abc"]) == 2
    assert held_back("abc", []) == 0


@pytest.mark.parametrize(("options", "message"), [
    (dict(top_k=-3), "top_k=-3: expected an integer >= 0"),
    (dict(top_p=1.5), "top_p=1.5: expected a number in (0, 1]"),
    (dict(top_p=0.0, temperature=0.8), "top_p=0.0: expected a number in (0, 1]"),
    (dict(temperature=-1), "temperature=-1: expected a number >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens=0: expected an integer >= 1"),
    (dict(num_beams=0), "num_beams=0: expected an integer >= 1"),
    (dict(repetition_penalty=0), "repetition_penalty=0: expected a number > 0"),
    (dict(num_beams=2, temperature=0.7), "temperature=0.7 with num_beams=2: beam search is deterministic"),
    (dict(num_beams=2, top_p=0.9), "top_p=0.9 with num_beams=2"),
    (dict(num_beams=3, top_k=5), "top_k=5 with num_beams=3"),
    (dict(stop=[1]), "stop=[1]: expected a list of strings"),
])
def test_bad_sampling_options_are_refused_in_one_line(options, message):
    with pytest.raises(SettingError) as error:
        SamplingOptions(**options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_max_new_tokens_beyond_the_context_is_clipped_with_a_warning(caplog):
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=64, max_seq_len=16)).eval()

    class Ids:  # a tokenizer over ids 0-63: the text is the ids, space-separated
        eos_id, pad_id, stop_ids = 63, 0, frozenset({63})

        def encode(self, text, bos=True):
            return [int(t) for t in text.split()]

        def stream_decoder(self):
            return type("D", (), {"push": lambda _, t: f"{t} ", "flush": lambda _: ""})()

    answer = generate(model, Ids(), "1 2 3 4 5 6", max_new_tokens=100, min_new_tokens=10)
    assert len(answer.split()) == 10
    assert "max_new_tokens=100 clipped to 10" in caplog.text
    with pytest.raises(SettingError, match="fills the model's context of 16"):
        generate(model, Ids(), " ".join(["1"] * 16), max_new_tokens=4)


class _IdTokenizer:
    """A tokenizer over ids 0-63 whose text is the ids, space-separated: tests read the ids back."""

    eos_id, pad_id = 63, 0

    def __init__(self, end_of_turn_ids=()):
        self.stop_ids = frozenset((self.eos_id, *end_of_turn_ids))

    def encode(self, text, bos=True):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)

    def stream_decoder(self):
        return type("D", (), {"push": lambda _, t: f"{t} ", "flush": lambda _: ""})()


def test_generation_stops_on_a_declared_end_of_turn_id_as_on_eos():
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=64, max_seq_len=64)).eval()
    free = [int(t) for t in generate(model, _IdTokenizer(), "1 2 3", max_new_tokens=12, min_new_tokens=12).split()]
    cut = next(i for i, t in enumerate(free) if i > 0 and t not in free[:i])
    stopped = generate(model, _IdTokenizer(end_of_turn_ids=(free[cut],)), "1 2 3", max_new_tokens=12)
    assert [int(t) for t in stopped.split()] == free[:cut]
    held = generate(model, _IdTokenizer(end_of_turn_ids=(free[cut],)), "1 2 3", max_new_tokens=12, min_new_tokens=12)
    assert [int(t) for t in held.split()] != free and free[cut] not in [int(t) for t in held.split()]
    # Beam search finishes a hypothesis on any stop id: with every id one, each ends at once.
    assert generate(model, _IdTokenizer(end_of_turn_ids=range(63)), "1 2 3", max_new_tokens=12, num_beams=2) == ""


def test_beam_search_applies_the_repetition_penalty(smollm2):
    model, tokenizer = smollm2
    prompt = chat("Repeat the word 'cat' ten times.")
    plain = generate(model, tokenizer, prompt, max_new_tokens=20, num_beams=2)
    assert generate(model, tokenizer, prompt, max_new_tokens=20, num_beams=2, repetition_penalty=1.5) != plain

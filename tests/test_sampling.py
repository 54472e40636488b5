"""Sampling and stopping: validation, seeds, top-k, penalties, stop strings and tokens, min/max tokens, logprobs,
UTF-8 safe detokenization, the incremental step API, and rejected requests.

Runs on the PyTorch reference attention (the engine logic does not depend on the backend; the kernels are tested
elsewhere and through tests/test_engine_parity.py).
"""
import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.engine.detokenizer import IncrementalDetokenizer
from flashserve.engine.request import Request
from flashserve.engine.sampler import Sampler
from flashserve.models.checkpoint import write_random_checkpoint

PROMPTS = [[10, 20, 30, 40, 50], [60, 70], [80, 90, 100, 110, 120, 130, 140, 150, 160]]


@pytest.fixture(autouse=True)
def reference_attention(monkeypatch):
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("llama"))
    write_random_checkpoint(directory, "LlamaForCausalLM", seed=3)
    return LLM(directory, dtype="float32", device="cpu", block_size=4, num_kv_blocks=64)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("kwargs", [
    dict(n=0), dict(n=1.5), dict(logit_bias={5: 100.5}), dict(logit_bias={-1: 1.0}), dict(logit_bias={"5": 1.0}),
    dict(logit_bias=[5]), dict(logit_bias={5: True}), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5),
    dict(top_k=-2), dict(min_p=1.5),
    dict(max_tokens=0), dict(min_tokens=-1), dict(min_tokens=5, max_tokens=4), dict(repetition_penalty=0.0),
    dict(presence_penalty=2.5), dict(frequency_penalty=-3.0), dict(logprobs=-1), dict(stop=[""]),
    dict(stop=[1]), dict(stop_token_ids=[-1]), dict(seed="x"), dict(temperature=float("nan")),
    dict(temperature=float("inf")), dict(temperature="0.5"), dict(repetition_penalty=float("nan")), dict(top_k=5.0),
    dict(top_k=True), dict(max_tokens=3.0), dict(logprobs=True), dict(stop_token_ids=5), dict(stop=5),
    dict(detokenize=1), dict(detokenize=False, stop="x"),
])
def test_invalid_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_vllm_semantics_of_tiny_temperature_and_max_tokens_none(llm):
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-4).greedy
    greedy = _tokens(llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                  use_tqdm=False))
    tiny = _tokens(llm.generate(PROMPTS, SamplingParams(temperature=1e-30, max_tokens=4, ignore_eos=True),
                                use_tqdm=False))
    assert tiny == greedy
    short = LLM(llm.engine.config.model, dtype="float32", device="cpu", block_size=4, num_kv_blocks=8,
                max_model_len=12)
    output = short.generate([PROMPTS[0]], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == 12 - len(PROMPTS[0]) and output.outputs[0].finish_reason == "length"


def test_seeded_requests_do_not_depend_on_the_batch(llm):
    params = [SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, seed=12, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)]
    forward = _tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    backward = _tokens(llm.generate(PROMPTS[::-1], params[::-1], use_tqdm=False))[::-1]
    alone = _tokens(llm.generate(PROMPTS[:1], params[:1], use_tqdm=False))
    assert forward[:2] == backward[:2]
    assert alone[0] == forward[0]


def test_n_completions_per_prompt(llm):
    seeded = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    outputs = llm.generate(PROMPTS[:2], seeded, use_tqdm=False)
    assert [len(output.outputs) for output in outputs] == [3, 3]
    assert [completion.index for completion in outputs[0].outputs] == [0, 1, 2]
    samples = [completion.token_ids for completion in outputs[0].outputs]
    assert len({tuple(tokens) for tokens in samples}) > 1
    again = llm.generate(PROMPTS[:2], seeded, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in again] == [[c.token_ids for c in o.outputs] for o in outputs]
    single = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)
    assert single[0].outputs[0].token_ids == samples[0]  # copy 0 samples like the request with n = 1
    greedy = llm.generate(PROMPTS[:1], SamplingParams(n=2, temperature=0, max_tokens=4), use_tqdm=False)
    assert greedy[0].outputs[0].token_ids == greedy[0].outputs[1].token_ids and greedy[0].finished
    with pytest.raises(ValueError, match="n = 1"):
        llm.engine.add_request("n2", PROMPTS[0], SamplingParams(n=2))


def test_logit_bias(llm):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={42: 100.0})
    assert _tokens(llm.generate(PROMPTS, params, use_tqdm=False)) == [[42] * 5] * 3
    unbiased = _tokens(llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                                    use_tqdm=False))[0]
    banned = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={unbiased[0]: -100.0})
    assert _tokens(llm.generate(PROMPTS[:1], banned, use_tqdm=False))[0][0] != unbiased[0]
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(PROMPTS[:1], SamplingParams(logit_bias={10 ** 6: 1.0}), use_tqdm=False)
    assert not llm.engine.requests


def test_top_k_1_equals_greedy(llm):
    greedy = _tokens(llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                  use_tqdm=False))
    top1 = _tokens(llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=6, ignore_eos=True),
                                use_tqdm=False))
    assert top1 == greedy


def test_max_tokens_and_stop_token_ids_and_min_tokens(llm):
    greedy = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    assert len(greedy.token_ids) == 6 and greedy.finish_reason == "length"
    stop_id = greedy.token_ids[1]
    stopped = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop_id],
                                                       ignore_eos=True), use_tqdm=False)[0].outputs[0]
    first = greedy.token_ids.index(stop_id)
    assert stopped.token_ids == greedy.token_ids[:first + 1] and stopped.finish_reason == "stop"
    assert stopped.stop_reason == stop_id and greedy.stop_reason is None
    tokenizer = llm.get_tokenizer()
    assert stopped.text == tokenizer.decode(stopped.token_ids[:-1])
    kept = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop_id],
                                                    ignore_eos=True, include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == tokenizer.decode(kept.token_ids)  # vLLM keeps the stop token's text when asked
    held = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=6, min_tokens=4,
                                                    stop_token_ids=[stop_id], ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 4 and stop_id not in held.token_ids[:4]


def _stop_string_case(llm):
    """A greedy completion and a 3-character stop string that spans a token boundary inside it."""
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for prompt in PROMPTS:
        output = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        text = output.text
        for i in range(2, len(output.token_ids)):
            boundary = len(tokenizer.decode(output.token_ids[:i]))
            stop = text[boundary - 1:boundary + 2]
            if len(stop) == 3 and stop.isascii() and stop.isprintable() and 0 < boundary - 1:
                return prompt, output, stop
    pytest.skip("no printable stop string found in the random model's output")


def test_stop_strings_across_token_boundaries(llm):
    prompt, output, stop = _stop_string_case(llm)
    start = output.text.index(stop)
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == output.text[:start] and cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=stop, ignore_eos=True,
                                                 include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == output.text[:start + 3]


def test_step_api_streams_deltas_and_holds_back_stop_prefixes(llm):
    prompt, output, stop = _stop_string_case(llm)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True)
    engine.add_request("stream", prompt, params)
    deltas = []
    while engine.has_unfinished():
        deltas.extend(o for o in engine.step() if o.request_id == "stream")
    text = "".join(d.outputs[0].text for d in deltas)
    assert text == output.text[:output.text.index(stop)]
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])


def test_abort_request_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("doomed", PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request("doomed")
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request(["a", "b", "unknown"])  # vLLM also takes a list of ids
    assert not engine.has_unfinished() and not engine.requests


def test_penalties_match_a_hand_computed_case():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    request = Request("p", None, [0, 1], params, max_model_len=100)
    request.token_ids += [3, 3, 4]  # output so far: token 3 twice, token 4 once
    penalized = logits.clone()
    assert sampler.penalties.apply(penalized, [request]) == [0]
    # repetition (prompt+output tokens 0, 1, 3, 4): positive / 2, negative * 2;
    # then output counts: token 3 -> -(0.25*2 + 0.5), token 4 -> -(0.25 + 0.5).
    expected = torch.tensor([[1.0, -2.0, 0.5, 1.5 - 1.0, -4.0 - 0.75, 1.0]])
    torch.testing.assert_close(penalized, expected)
    token_ids, _ = sampler(logits.clone(), [request], eos_token_ids=[])
    assert token_ids == [0]  # 2.0 / 2 = 1.0 ties token 5's 1.0; argmax takes the first


def _penalized_from_scratch(logits, request):
    """The penalties computed from all of a request's tokens (what the device-side counts must reproduce)."""
    params, row = request.params, logits.clone()
    seen = torch.tensor(sorted(set(request.token_ids)))
    row[seen] = torch.where(row[seen] > 0, row[seen] / params.repetition_penalty, row[seen] * params.repetition_penalty)
    counts = torch.bincount(torch.tensor(request.output_token_ids, dtype=torch.long), minlength=row.shape[0]).float()
    return row - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()


def test_penalty_counts_follow_the_sampled_tokens():
    sampler = Sampler(torch.device("cpu"), seed=5)
    vocab = 12
    plain = Request("plain", None, [1, 2], SamplingParams(temperature=1.0), max_model_len=100)
    requests = [Request(f"r{i}", None, [i, 3, 3], SamplingParams(temperature=1.0, repetition_penalty=1.5,
                                                                 presence_penalty=0.3, frequency_penalty=0.2),
                        max_model_len=100) for i in range(2)]
    requests[1].token_ids += [5, 5]  # a preempted request coming back with output tokens
    generator = torch.Generator().manual_seed(2)
    for step in range(6):
        batch = [requests[0], plain, requests[1]] if step % 2 else [requests[1], requests[0]]
        logits = torch.randn(len(batch), vocab, generator=generator)
        penalized = logits.clone()
        sampler.penalties.apply(penalized, batch)
        for row, request in enumerate(batch):
            expected = logits[row] if request is plain else _penalized_from_scratch(logits[row], request)
            torch.testing.assert_close(penalized[row], expected)
        token_ids, _ = sampler(logits, batch, eos_token_ids=[])
        for request, token_id in zip(batch, token_ids):
            request.token_ids.append(token_id)
    sampler.release("r0")
    assert list(sampler.penalties.slots) == ["r1"] and sampler.penalties.free


def test_logprobs_hold_the_sampled_token_and_the_top_n(llm):
    output = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    assert len(output.logprobs) == 3
    tokenizer = llm.get_tokenizer()
    for token_id, entry in zip(output.token_ids, output.logprobs):
        assert token_id in entry and len(entry) == 2  # vLLM's structure: {token id: Logprob}
        values = [lp.logprob for lp in entry.values()]
        assert entry[token_id].logprob == max(values) and all(v <= 0 for v in values)
        assert entry[token_id].rank == 1 and sorted(lp.rank for lp in entry.values()) == [1, 2]
        assert entry[token_id].decoded_token == tokenizer.decode([token_id])
    sampled = llm.generate(PROMPTS[:1], SamplingParams(temperature=5.0, seed=1, max_tokens=8, logprobs=0,
                                                       ignore_eos=True), use_tqdm=False)[0].outputs[0]
    for token_id, entry in zip(sampled.token_ids, sampled.logprobs):
        assert list(entry) == [token_id] and entry[token_id].rank >= 1


def test_detokenize_false_returns_the_same_tokens_without_text(llm):
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=1, ignore_eos=True)
    with_text = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    without = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=6, logprobs=1, ignore_eos=True,
                                                       detokenize=False), use_tqdm=False)
    for a, b in zip(with_text, without):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids and a.outputs[0].text and b.outputs[0].text == ""
        assert all(lp.decoded_token is None for entry in b.outputs[0].logprobs for lp in entry.values())


def test_incremental_detokenizer_never_splits_characters(llm):
    tokenizer = llm.get_tokenizer()
    text = "naïve café — 日本語 🙂 ok"
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    pieces = [detokenizer.step(token_ids[:i]) for i in range(1, len(token_ids) + 1)]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece == "") > 0  # multi-byte characters were held back


def test_rejected_requests_leave_the_engine_working(llm):
    engine = llm.engine
    with pytest.raises(ValueError):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError):
        llm.generate([PROMPTS[0], [1] * engine.max_model_len], use_tqdm=False)
    with pytest.raises(ValueError):
        llm.generate([[engine.vocab_size]], use_tqdm=False)
    with pytest.raises(ValueError):
        llm.generate([PROMPTS[0]], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[-1, 5]], use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a"], {"temperature": 0}, use_tqdm=False)
    with pytest.raises(ValueError, match="prompts"):
        llm.generate(None, use_tqdm=False)
    with pytest.raises(ValueError):
        engine.add_request("huge", [1] * 300, SamplingParams(max_tokens=1))  # 301 tokens > 64 blocks of 4
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("unbounded", [1] * 3, SamplingParams(max_tokens=None))  # may grow to 512 tokens
    assert not engine.has_unfinished() and not engine.requests
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [2, 2, 2]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_string_prompts_and_chat(llm):
    outputs = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                           use_tqdm=False)
    assert outputs[0].prompt == "Hello there" and len(outputs[0].outputs[0].token_ids) == 3
    replies = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=3,
                                                                           ignore_eos=True), use_tqdm=False)
    assert "<|assistant|>" in replies[0].prompt and len(replies[0].outputs[0].token_ids) == 3


def test_prompt_forms_of_vllm(llm):
    """Prompt dicts (vLLM's TextPrompt / TokensPrompt), numpy arrays and tensors give the same tokens as lists."""
    import numpy as np

    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    expected = _tokens(llm.generate([PROMPTS[0], "Hello there"], params, use_tqdm=False))
    forms = [{"prompt_token_ids": PROMPTS[0]}, {"prompt": "Hello there"}]
    outputs = llm.generate(forms, params, use_tqdm=False)
    assert _tokens(outputs) == expected and outputs[1].prompt == "Hello there"
    assert _tokens(llm.generate({"prompt": "Hello there"}, params, use_tqdm=False)) == expected[1:]
    arrays = [np.array(PROMPTS[0]), torch.tensor(PROMPTS[0]), [np.int64(t) for t in PROMPTS[0]]]
    assert _tokens(llm.generate(arrays, params, use_tqdm=False)) == expected[:1] * 3
    assert _tokens(llm.generate(np.array(PROMPTS[0]), params, use_tqdm=False)) == expected[:1]
    with pytest.raises(ValueError, match="prompt dict"):
        llm.generate([{"text": "Hello"}], params, use_tqdm=False)


def test_chat_batches_take_one_params_per_conversation_and_need_a_template(llm):
    conversations = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]]
    params = [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)]
    replies = llm.chat(conversations, params, use_tqdm=False)
    assert [len(r.outputs[0].token_ids) for r in replies] == [2, 3]
    tokenizer = llm.get_tokenizer()
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match="chat template"):
            llm.chat(conversations[0], use_tqdm=False)
    finally:
        tokenizer.chat_template = template


def test_reset_prefix_cache_returns_true_like_vllm(llm):
    assert llm.reset_prefix_cache() is True


def test_llm_constructor_errors(llm, tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path), device="cpu")
    typed = LLM(llm.engine.config.model, dtype=torch.float32, device="cpu", num_kv_blocks=8)
    assert typed.engine.runner.dtype == torch.float32

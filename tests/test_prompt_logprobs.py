"""Prompt logprobs (``SamplingParams.prompt_logprobs``) offline and through the server (``echo``, ``max_tokens: 0``,
vLLM's ``prompt_logprobs`` field), against Hugging Face's log-softmax of the same tiny random checkpoint's logits in
float32: every prompt position, with chunked prefill, with the prefix cache warm, and with preemption.

Runs on the PyTorch reference attention, except one test through the environment's backend (the Triton kernels under
``TRITON_INTERPRET=1`` in CI). The server tests reuse tests/test_server.py's server.
"""
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flashserve import LLM, SamplingParams
from flashserve.engine.prompt_logprobs import PromptLogprobRows
from flashserve.engine.request import Request
from flashserve.engine.scheduler import ScheduledBatch
from test_server import _events, _wait_idle, client, model_dir, server  # noqa: F401 (fixtures)

TOLERANCE = 1e-4
GREEDY = dict(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture
def reference_attention(monkeypatch):
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _prompts(vocab_size: int = 400) -> list[list[int]]:
    """Prompts of 1 to 25 tokens; two share their first 16 tokens (4 blocks of 4)."""
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(3, vocab_size) for _ in range(n)]
    base = draw(16)
    return [draw(1), draw(6), base + draw(4), draw(13), base + draw(9)]


def _reference(hf_model, prompt: list[int]) -> torch.Tensor:
    """Hugging Face's log-softmax of the float32 logits at every position of ``prompt``: (len(prompt), vocab)."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)


def _check(prompt_logprobs, prompt: list[int], reference: torch.Tensor, num_top: int, tokenizer=None) -> None:
    """vLLM's format, and every entry equal to Hugging Face's: the prompt token's logprob and rank (1 + the tokens
    more likely), and the top ``num_top`` tokens, ranked 1..num_top, with the logprobs of their rank."""
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        row, token, entries = reference[position - 1], prompt[position], prompt_logprobs[position]
        assert abs(entries[token].logprob - row[token].item()) < TOLERANCE
        rank = entries[token].rank
        assert int((row > row[token] + TOLERANCE).sum()) + 1 <= rank <= int((row > row[token] - TOLERANCE).sum()) + 1
        others = {token_id: entry for token_id, entry in entries.items() if token_id != token}
        assert len(entries) in (num_top, num_top + 1) and (rank <= num_top or len(entries) == num_top + 1)
        assert len({entry.rank for entry in others.values()}) == len(others)
        ordered = row.sort(descending=True).values
        for token_id, entry in others.items():
            assert 1 <= entry.rank <= num_top and abs(entry.logprob - row[token_id].item()) < TOLERANCE
            assert abs(entry.logprob - ordered[entry.rank - 1].item()) < TOLERANCE
        if tokenizer is not None:
            assert all(entry.decoded_token == tokenizer.decode([token_id], skip_special_tokens=True)
                       for token_id, entry in entries.items())


def _llm(model_dir: str, **options) -> LLM:
    return LLM(model_dir, **dict(dict(dtype="float32", device="cpu", block_size=4), **options))


def _assert_no_leaks(llm: LLM) -> None:
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not llm.engine.requests and not llm.engine.scoring


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 5, "enable_prefix_caching": False}],
                         ids=["whole-prompts", "chunked-prefill"])
def test_prompt_logprobs_match_hugging_face(model_dir, hf_model, tokenizer, reference_attention, options):
    prompts = _prompts()
    llm = _llm(model_dir, **options)
    plain = llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    asks = [3, None, 0, 5, None]
    params = [SamplingParams(**GREEDY, prompt_logprobs=k) for k in asks]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, k, output, expected in zip(prompts, asks, outputs, plain):
        assert output.outputs[0].token_ids == expected.outputs[0].token_ids  # nothing else changes
        if k is None:
            assert output.prompt_logprobs is None
        else:
            _check(output.prompt_logprobs, prompt, _reference(hf_model, prompt), k, tokenizer)
    _assert_no_leaks(llm)


def test_prefix_cache_is_not_read_but_kept(model_dir, hf_model, reference_attention):
    prompts = _prompts()
    llm = _llm(model_dir, enable_prefix_caching=True)
    llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    before = llm.prefix_cache_stats()
    assert before["hit_tokens"] > 0
    scored = prompts[1:]  # a one-token prompt has no prompt logprob to compute: it may read the cache
    outputs = llm.generate(scored, SamplingParams(**GREEDY, prompt_logprobs=2), use_tqdm=False)
    for prompt, output in zip(scored, outputs):
        _check(output.prompt_logprobs, prompt, _reference(hf_model, prompt), 2)
    assert llm.prefix_cache_stats() == before  # no lookup: neither queried nor hit (as vLLM counts)
    llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    assert llm.prefix_cache_stats()["hit_tokens"] > before["hit_tokens"]
    _assert_no_leaks(llm)


def _check_preemption(model_dir, hf_model) -> None:
    prompts = _prompts()
    expected = [o.outputs[0].token_ids for o in _llm(model_dir).generate(prompts, SamplingParams(**GREEDY),
                                                                          use_tqdm=False)]
    llm = _llm(model_dir, num_kv_blocks=9, max_num_batched_tokens=7)
    outputs = llm.generate(prompts, SamplingParams(**GREEDY, prompt_logprobs=1), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for prompt, output in zip(prompts, outputs):
        _check(output.prompt_logprobs, prompt, _reference(hf_model, prompt), 1)
    _assert_no_leaks(llm)


def test_chunked_prefill_with_preemption(model_dir, hf_model, reference_attention):
    _check_preemption(model_dir, hf_model)


def test_through_selected_kernels(model_dir, hf_model):
    """Chunked prefill + preemption with the environment's attention backend (the Triton kernels in CI)."""
    _check_preemption(model_dir, hf_model)


def test_step_outputs_and_max_tokens_0(model_dir, hf_model, reference_attention):
    llm = _llm(model_dir, max_num_batched_tokens=6)
    engine = llm.engine
    prompt = _prompts()[4]
    engine.add_request("scored", prompt, SamplingParams(max_tokens=0, prompt_logprobs=1))
    engine.add_request("both", prompt, SamplingParams(**GREEDY, prompt_logprobs=1))
    generated = engine.stats.generated_tokens
    deltas = {"scored": [], "both": []}
    while engine.has_unfinished():
        for output in engine.step():
            deltas[output.request_id].append(output)
    (scored,) = deltas["scored"]
    assert scored.finished and scored.outputs[0].finish_reason == "length"
    assert scored.outputs[0].token_ids == [] and scored.outputs[0].text == ""
    reference = _reference(hf_model, prompt)
    _check(scored.prompt_logprobs, prompt, reference, 1)
    both = deltas["both"]
    assert len(both) == GREEDY["max_tokens"]
    _check(both[0].prompt_logprobs, prompt, reference, 1)
    assert all(delta.prompt_logprobs is None for delta in both[1:])  # once, on the first output (vLLM v1 deltas)
    assert engine.stats.generated_tokens - generated == GREEDY["max_tokens"]
    engine.add_request("dropped", prompt, SamplingParams(prompt_logprobs=1))
    engine.step()  # 6 of its 25 prompt tokens
    assert engine.scoring == {"dropped"}
    engine.abort_request("dropped")
    _assert_no_leaks(llm)


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompt_logprobs=-1), "prompt_logprobs"), (dict(prompt_logprobs=True), "prompt_logprobs"),
    (dict(prompt_logprobs=1.5), "prompt_logprobs"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=0, logprobs=1), "max_tokens"), (dict(max_tokens=-1, prompt_logprobs=0), "max_tokens"),
])
def test_invalid_values_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        SamplingParams(**kwargs)


def test_rows_are_those_of_unscored_prompt_positions():
    asking = Request("a", None, [5, 6, 7, 8, 9, 10], SamplingParams(prompt_logprobs=2), 64)
    other = Request("b", None, [1, 2, 3, 4], SamplingParams(), 64)
    batch = ScheduledBatch()
    batch.add(other, 4)
    batch.add(asking, 3)  # positions 0..2 of 6: they score tokens 1..3
    rows = PromptLogprobRows.of(batch)
    assert (rows.rows, rows.targets, rows.num_top, rows.spans) == ([4, 5, 6], [6, 7, 8], [2, 2, 2], [(asking, 3)])
    asking.prompt_logprobs += [{}] * 3
    asking.num_computed_tokens = 3
    batch = ScheduledBatch()
    batch.add(asking, 3)  # positions 3..5: the last one's logits sample, they score nothing
    assert PromptLogprobRows.of(batch).rows == [0, 1]
    asking.prompt_logprobs += [{}] * 2
    asking.num_computed_tokens = 0  # preempted: the recompute adds nothing
    batch = ScheduledBatch()
    batch.add(asking, 6)
    assert PromptLogprobRows.of(batch) is None and not asking.needs_prompt_logprobs


def _check_openai_logprobs(logprobs: dict, prompt: list[int], reference: torch.Tensor, tokenizer) -> None:
    """The echoed prompt's part of a completions logprobs object: OpenAI's nulls first, then Hugging Face's."""
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["tokens"][:len(prompt)] == [tokenizer.decode(prompt[:1])] + [
        tokenizer.decode([token], skip_special_tokens=True) for token in prompt[1:]]
    for position in range(1, len(prompt)):
        row = reference[position - 1]
        assert abs(logprobs["token_logprobs"][position] - row[prompt[position]].item()) < TOLERANCE
        (top,) = logprobs["top_logprobs"][position].values()
        assert abs(top - row.max().item()) < TOLERANCE
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], logprobs["tokens"]))


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_logprobs_scores_the_prompt(client, server, hf_model, tokenizer, max_tokens):
    text = "Hello, my name is"
    prompt = tokenizer.encode(text)
    reference = _reference(hf_model, prompt)
    body = {"prompt": text, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    result = client.post("/v1/completions", json=body).json()
    choice = result["choices"][0]
    assert choice["text"].startswith(text) and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(prompt) + max_tokens
    _check_openai_logprobs(choice["logprobs"], prompt, reference, tokenizer)
    assert result["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                               "total_tokens": len(prompt) + max_tokens}
    plain = client.post("/v1/completions", json=dict(body, echo=False, max_tokens=1)).json()["choices"][0]
    assert choice["text"] == text + (plain["text"] if max_tokens else "")
    if max_tokens:
        # the echoed request's LM head runs over every prompt row, the plain one's over the last row only: on the
        # CPU the two matmul shapes may round differently in the last bits
        assert choice["logprobs"]["token_logprobs"][-1] == pytest.approx(plain["logprobs"]["token_logprobs"][0],
                                                                         rel=1e-5, abs=1e-6)
        assert abs(choice["logprobs"]["token_logprobs"][-1] - reference[-1].max().item()) < TOLERANCE
    by_ids = client.post("/v1/completions", json=dict(body, prompt=prompt)).json()["choices"][0]
    assert by_ids["text"] == tokenizer.decode(prompt) + choice["text"][len(text):]
    assert by_ids["logprobs"] == choice["logprobs"]
    _wait_idle(server[1])


def test_streamed_echo_starts_with_the_prompt(client, server):
    body = {"prompt": "The sky", "echo": True, "logprobs": 1, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json=dict(body, stream=True)) as response:
        chunks = [event["choices"][0] for event in _events(response)[:-1]]
    assert chunks[0]["text"].startswith("The sky") and len(chunks) == 5
    assert "".join(chunk["text"] for chunk in chunks) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((chunk["logprobs"][key] for chunk in chunks), []) == whole["logprobs"][key]
    with client.stream("POST", "/v1/completions", json=dict(body, stream=True, max_tokens=0)) as response:
        events = _events(response)
    assert events[-1] == "[DONE]" and len(events) == 2
    only = events[0]["choices"][0]
    assert only["text"] == "The sky" and only["finish_reason"] == "length"
    assert only["logprobs"]["tokens"] == whole["logprobs"]["tokens"][:len(only["logprobs"]["tokens"])]
    _wait_idle(server[1])


def test_prompt_logprobs_field_on_both_endpoints(client, server, hf_model, tokenizer):
    prompt = _prompts()[3]
    reference = _reference(hf_model, prompt)
    body = {"prompt": prompt, "prompt_logprobs": 2, "max_tokens": 2, "echo": True, "logprobs": 4}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    field = choice["prompt_logprobs"]
    assert len(field) == len(prompt) and field[0] is None
    for position in range(1, len(prompt)):
        entries = field[position]
        assert str(prompt[position]) in entries and len(entries) <= 3  # the token and the top 2 (of the 4 computed)
        for token_id, entry in entries.items():
            assert abs(entry["logprob"] - reference[position - 1, int(token_id)].item()) < TOLERANCE
            assert entry["decoded_token"] == tokenizer.decode([int(token_id)], skip_special_tokens=True)
    for position, top in enumerate(choice["logprobs"]["top_logprobs"][1:len(prompt)], start=1):
        best = reference[position - 1].topk(4).values  # keyed by text, tokens of one text share an entry
        assert 1 <= len(top) <= 4 and all((best - value).abs().min() < TOLERANCE for value in top.values())
    assert "prompt_logprobs" not in client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()[
        "choices"][0]
    chat = {"messages": [{"role": "user", "content": "Hi"}], "prompt_logprobs": 1, "max_tokens": 0}
    result = client.post("/v1/chat/completions", json=chat).json()
    assert len(result["prompt_logprobs"]) == result["usage"]["prompt_tokens"] and result["prompt_logprobs"][0] is None
    assert result["choices"][0]["message"]["content"] == "" and result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 0 and "prompt_logprobs" not in result["choices"][0]
    _wait_idle(server[1])


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": "x"}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"echo": True, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"echo": "loud"}, "echo"),
    ("/v1/completions", {"max_tokens": 0, "logprobs": 1}, "max_tokens"),
    ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/chat/completions", {"prompt_logprobs": 50}, "prompt_logprobs"),
    ("/v1/chat/completions", {"max_tokens": 0, "logprobs": True}, "max_tokens"),
])
def test_bad_values_are_400_naming_the_field(client, server, path, fields, param):
    base = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    response = client.post(path, content=json.dumps(dict(base, **fields)),
                           headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    _wait_idle(server[1])

"""Structured outputs offline: JSON schemas, regex, choice, grammar and json_object constrain the demo model's
(random-weight) output, grammars compile once and off the engine thread, invalid specs are ValueErrors naming the
field, and constrained requests survive preemption and mix with unconstrained ones.

Runs on the PyTorch reference attention (the engine logic does not depend on the backend).
"""
import json
import re
import threading

import pytest

from flashserve import LLM, SamplingParams, StructuredOutputsParams
from flashserve.models.demo import demo_model_path

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

NAME = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "shade": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["color", "shade"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer",
                                                                                       "minimum": 1,
                                                                                       "maximum": 9999},
                                                                                "email": NAME},
                                               "required": ["id", "email"]},
                                      "active": {"type": "boolean"}},
     "required": ["user", "active"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "array", "items": {"type": "number", "minimum": -1,
                                                                           "maximum": 1},
                                                "minItems": 2, "maxItems": 2}},
     "required": ["point"]},
    {"type": "object", "properties": {"status": {"const": "ok"}, "code": {"type": "integer", "minimum": 200,
                                                                         "maximum": 599}},
     "required": ["status", "code"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "name": NAME,
                                      "owner": {"type": ["string", "null"], "maxLength": 8}},
     "required": ["kind", "name", "owner"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}},
        "label": {"enum": ["x", "y"]}}, "required": ["matrix", "label"]},
]


@pytest.fixture(autouse=True)
def reference_attention(monkeypatch):
    monkeypatch.setenv("FLASHSERVE_ATTENTION_BACKEND", "torch")


@pytest.fixture(scope="module")
def llm():
    return LLM(demo_model_path(), dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=512)


def _constrained(**kwargs) -> SamplingParams:
    defaults = dict(temperature=1.0, max_tokens=200, seed=None)
    return SamplingParams(**dict(defaults, **{k: v for k, v in kwargs.items() if k != "spec"}),
                          structured_outputs=kwargs["spec"])


@pytest.mark.slow
def test_hundred_requests_over_ten_schemas_validate(llm):
    """The issue's bar: 100 requests over 10 schemas (nested objects, arrays, enums, bounded numbers, required
    fields), all finished by their grammar with JSON that validates."""
    params = [_constrained(spec=StructuredOutputsParams(json=SCHEMAS[i % 10]), seed=i) for i in range(100)]
    outputs = llm.generate(["Reply in JSON:"] * 100, params, use_tqdm=False)
    for index, output in enumerate(outputs):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", (index, completion.text)
        jsonschema.validate(json.loads(completion.text), SCHEMAS[index % 10])


def test_regex_choice_grammar_and_json_object(llm):
    specs = [StructuredOutputsParams(regex=r"[a-z]{3,6}-\d{2}"), StructuredOutputsParams(choice=["yes", "no", "n/a"]),
             StructuredOutputsParams(grammar='root ::= "(" [0-9] [0-9]? ("+" [0-9])? ")"'),
             StructuredOutputsParams(json_object=True)]
    outputs = llm.generate(["Answer:"] * 4, [_constrained(spec=spec, temperature=0, max_tokens=60)
                                              for spec in specs], use_tqdm=False)
    texts = [output.outputs[0].text for output in outputs]
    assert re.fullmatch(r"[a-z]{3,6}-\d{2}", texts[0])
    assert texts[1] in ("yes", "no", "n/a")
    assert re.fullmatch(r"\(\d\d?(\+\d)?\)", texts[2])
    if outputs[3].outputs[0].finish_reason == "stop":  # any JSON object may run past max_tokens
        assert isinstance(json.loads(texts[3]), dict)
    assert all(output.outputs[0].finish_reason == "stop" for output in outputs[:3])


def test_unconstrained_requests_are_unchanged_next_to_constrained_ones(llm):
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = llm.generate(["Hello", "World"], plain, use_tqdm=False)
    spec = StructuredOutputsParams(json=SCHEMAS[0])
    mixed = llm.generate(["Hello", "Reply:", "World"], [plain, _constrained(spec=spec, temperature=0), plain],
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids]
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMAS[0])


def test_preempted_requests_keep_valid_output():
    small = LLM(demo_model_path(), dtype="float32", device="cpu", max_model_len=128, block_size=4,
                num_kv_blocks=20)
    spec = StructuredOutputsParams(json=SCHEMAS[0])
    params = [_constrained(spec=spec, temperature=0, max_tokens=60) for _ in range(4)]
    outputs = small.generate(["Reply in JSON please:"] * 4, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    small.engine.scheduler.num_preemptions = 0
    expected = small.generate(["Reply in JSON please:"], params[0], use_tqdm=False)[0].outputs[0].text
    assert small.engine.scheduler.num_preemptions == 0
    for output in outputs:
        assert output.outputs[0].text == expected
        jsonschema.validate(json.loads(output.outputs[0].text), SCHEMAS[0])


@pytest.mark.parametrize("spec, field", [
    (dict(json={"type": "strin"}), "structured_outputs.json"),
    (dict(json="{not json"), "structured_outputs.json"),
    (dict(regex="a(b"), "structured_outputs.regex"),
    (dict(grammar="root ::= missing_rule"), "structured_outputs.grammar"),
])
def test_invalid_specs_name_the_field(llm, spec, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), use_tqdm=False)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("kwargs", [dict(), dict(json={}, regex="a"), dict(choice=[]), dict(choice=["a", 1]),
                                    dict(regex=""), dict(json=[1]), dict(json_object=1)])
def test_malformed_params_raise(kwargs):
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(**kwargs)


def test_min_tokens_is_refused_with_a_grammar():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(choice=["a"]))


def test_grammars_compile_once_off_the_engine_thread(llm, monkeypatch):
    engine = llm.engine
    compiler = engine._grammars()
    release = threading.Event()
    threads, calls = [], []
    original = compiler._compile

    def slow_compile(grammar):
        threads.append(threading.current_thread().name)
        calls.append(grammar)
        release.wait(10)
        return original(grammar)

    monkeypatch.setattr(compiler, "_compile", slow_compile)
    schema = {"type": "object", "properties": {"slow": {"type": "integer", "minimum": 0, "maximum": 3}},
              "required": ["slow"]}
    engine.add_request("plain", "Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    for index in range(2):
        engine.add_request(f"json-{index}", "Hi", _constrained(spec=StructuredOutputsParams(json=schema)))
    finished = set()
    while "plain" not in finished:  # the plain request decodes while the grammar compiles
        finished |= {output.request_id for output in engine.step() if output.finished}
    assert len(engine.grammar_waitlist) == 2
    release.set()
    texts = {}
    while engine.has_unfinished():
        for output in engine.step():
            texts[output.request_id] = texts.get(output.request_id, "") + output.outputs[0].text
    assert len(calls) == 1 and threads[0].startswith("flashserve-grammar")
    for index in range(2):
        jsonschema.validate(json.loads(texts[f"json-{index}"]), schema)


def test_abort_while_the_grammar_compiles(llm, monkeypatch):
    engine = llm.engine
    compiler = engine._grammars()
    release = threading.Event()
    original = compiler._compile
    monkeypatch.setattr(compiler, "_compile", lambda g: (release.wait(10), original(g))[1])
    engine.add_request("waiting", "Hi", _constrained(spec=StructuredOutputsParams(regex="[0-9]{4}x")))
    engine.abort_request("waiting")
    assert not engine.has_unfinished()
    release.set()


def test_a_failed_compilation_aborts_the_request(llm, monkeypatch):
    compiler = llm.engine._grammars()

    def failing_compile(grammar):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(compiler, "_compile", failing_compile)
    spec = StructuredOutputsParams(regex="[0-9]{5}z")
    (output,) = llm.generate(["x"], _constrained(spec=spec), use_tqdm=False)
    assert output.outputs[0].finish_reason == "abort" and not llm.engine.has_unfinished()
    monkeypatch.undo()
    assert llm.generate(["x"], _constrained(spec=spec, temperature=0), use_tqdm=False)[0].outputs[0].text.endswith("z")


def test_token_bitmask_matches_xgrammar_and_leaves_plain_batches_alone():
    import torch
    import xgrammar

    from flashserve.engine.request import Request
    from flashserve.engine.structured_outputs import TokenBitmask

    vocab = 1000
    bitmask = TokenBitmask(8, vocab, torch.device("cpu"))
    plain = [Request(f"r{i}", None, [1, 2], SamplingParams(), 64) for i in range(3)]
    logits = torch.randn(3, vocab)
    assert bitmask.apply(logits, plain) is logits  # nothing to do: the very same tensor

    class FixedGrammar:  # a request grammar whose matcher's next-token mask is a given random bitmask row
        def __init__(self, row):
            self.matcher = self
            self.row = row

    words = torch.randint(-2**31, 2**31 - 1, (3, bitmask.host.shape[1]), dtype=torch.int32)
    plain[0].grammar, plain[2].grammar = FixedGrammar(words[0]), FixedGrammar(words[2])

    class Filler:
        def batch_fill_next_token_bitmask(self, matchers, host, rows):
            for matcher, row in zip(matchers, rows):
                host[row] = matcher.row

    bitmask._batch_matcher = Filler()
    masked = bitmask.apply(logits, plain)
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, words, indices=[0, 2])
    assert torch.equal(masked, expected) and torch.equal(logits[1], masked[1])

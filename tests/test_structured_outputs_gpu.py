"""Structured outputs on the GPU with CUDA graphs: the mask applies to the graphs' logits, constrained and
unconstrained requests share decode batches, and every constrained output validates."""
import json

import pytest

from flashserve import LLM, SamplingParams, StructuredOutputsParams
from flashserve.models.demo import demo_model_path
from test_structured_outputs import SCHEMAS

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
pytestmark = pytest.mark.gpu


def test_constrained_decode_under_cuda_graphs():
    llm = LLM(demo_model_path(), max_model_len=1024, max_num_seqs=128, num_kv_blocks=8192)  # not 90% of the GPU
    assert llm.engine.runner.graphs is not None
    replays = []
    original = llm.engine.runner.graphs.replay
    llm.engine.runner.graphs.replay = lambda size, *args: (replays.append(size), original(size, *args))[1]
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=300,
                                  structured_outputs=StructuredOutputsParams(json=SCHEMAS[i % len(SCHEMAS)]))
                   for i in range(96)]
    plain = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) for _ in range(32)]
    outputs = llm.generate(["Reply in JSON:"] * 128, constrained + plain, use_tqdm=False)
    assert replays, "decode steps should replay CUDA graphs"
    for index, output in enumerate(outputs[:96]):
        assert output.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(output.outputs[0].text), SCHEMAS[index % len(SCHEMAS)])
    assert all(len(output.outputs[0].token_ids) == 40 for output in outputs[96:])

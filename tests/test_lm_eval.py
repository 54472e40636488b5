"""lm-evaluation-harness's ``local-completions`` model against a live server (tests/test_server.py's, on the tiny
random checkpoint with the reference attention), on two small local tasks written to a temporary folder: YAML task
configs (``dataset_path: json`` on a local JSONL file) loaded through ``TaskManager(include_path=...)``.

* multiple choice (``output_type: multiple_choice``, ``acc``): lm-eval scores every choice with one ``echo: true,
  logprobs: 1, max_tokens: 1`` completion on token ids; each loglikelihood, its ``is_greedy`` and the resulting
  ``acc`` must equal Hugging Face's, computed from the same checkpoint's float32 logits on the same tokens.
* ``generate_until`` (``until: ["\\n"]``, ``exact_match``): lm-eval's generations must equal ``LLM.generate``'s
  greedy ones with the stop strings lm-eval sends (``"\\n"`` and the EOS text).

Nothing leaves 127.0.0.1: the Hugging Face hubs are set offline and name resolution of any other host fails.
"""
import json
import socket

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flashserve import LLM, SamplingParams
from test_server import ENGINE_OPTIONS, MODEL_NAME, _wait_idle, model_dir, server  # noqa: F401 (fixtures)

lm_eval = pytest.importorskip("lm_eval")
import datasets  # noqa: E402 (installed with lm-eval)
from lm_eval.tasks import TaskManager  # noqa: E402

TOLERANCE = 1e-4
MAX_GEN_TOKS = 8
QUESTIONS = [  # (context, choices): gold answers come from Hugging Face's scores (see `_gold`), and the greedy
    # next token joins the choices where it survives retokenization (see `_with_greedy_choice`)
    ("The river ran slowly past the old", [" mill", " boat", " city"]),
    ("Every morning the baker opened his", [" shop", " letter", " garden", " door"]),
    ("The library was quiet except for the sound of", [" pages", " trains"]),
    ("In the garden there were roses, tulips, and", [" beans", " sheep", " numbers"]),
    ("The mountain path was steep and ", ["narrow", "quiet"]),  # lm-eval moves the trailing space
    ("A good teacher asks questions that make students", [" think", " sleep", " run", " read"]),
]
PROMPTS = ["Tell me a story about", "He kept a", "The train was late, so the"]  # the first two stop at "\n"
MC_TASK, GEN_TASK = "flashserve_mc", "flashserve_gen"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""
MC_YAML = """output_type: multiple_choice
target_delimiter: ""
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
"""
GEN_YAML = f"""output_type: generate_until
doc_to_text: prompt
doc_to_target: target
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_GEN_TOKS}
metric_list:
  - metric: exact_match
"""


class _LocalOnly:
    """``socket.getaddrinfo`` for 127.0.0.1 only: any other host is recorded and refused."""

    def __init__(self):
        self.getaddrinfo, self.refused = socket.getaddrinfo, []

    def __call__(self, host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            self.refused.append(host)
            raise OSError(f"the lm-eval test must not resolve {host!r}")
        return self.getaddrinfo(host, *args, **kwargs)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids  # lm-eval's add_bos_token=False


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair``: trailing spaces move to the continuation, the whole is encoded and split
    after the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = _encode(tokenizer, context)
    return context_ids, _encode(tokenizer, context + continuation)[len(context_ids):]


@torch.no_grad()
def _log_softmax(hf_model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _loglikelihood(hf_model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """lm-eval's (loglikelihood, is_greedy) from Hugging Face: the sum of the continuation tokens' float32
    log-softmax given what precedes them, and whether every one of them is the argmax."""
    rows = _log_softmax(hf_model, context_ids + continuation_ids)[len(context_ids) - 1:-1]
    targets = torch.tensor(continuation_ids)
    return rows[torch.arange(len(targets)), targets].sum().item(), bool((rows.argmax(-1) == targets).all())


def _with_greedy_choice(hf_model, tokenizer, context: str, choices: list[str]) -> list[str]:
    """``choices`` plus the text of the greedy next token when lm-eval tokenizes it back to that token (then its
    ``is_greedy`` is True)."""
    context_ids = _encode(tokenizer, context)
    greedy = _log_softmax(hf_model, context_ids)[-1].argmax().item()
    text = tokenizer.decode([greedy])
    return choices + [text] if _encode_pair(tokenizer, context, text)[1] == [greedy] else choices


def _gold(scores: list[list[float]]) -> list[int]:
    """Gold answers that make ``acc`` 1/2: the best-scored choice for even documents, another one for odd ones.
    The best choice must beat the next by more than TOLERANCE, so that the server's scores pick it too."""
    gold = []
    for index, lls in enumerate(scores):
        ranked = sorted(range(len(lls)), key=lls.__getitem__, reverse=True)
        assert lls[ranked[0]] - lls[ranked[1]] > 2 * TOLERANCE, f"document {index}: a near tie, {lls}"
        gold.append(ranked[index % 2])
    return gold


def _write_task(folder, name: str, body: str, docs: list[dict]) -> None:
    """``name``.yaml (TASK_YAML, then ``body``) on the documents written to ``name``.jsonl."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    header = TASK_YAML.format(task=name, data=data, cache=folder / "datasets-cache")
    (folder / f"{name}.yaml").write_text(header + body)


@pytest.fixture(scope="module")
def expected(model_dir, server):
    """The documents of both tasks and what lm-eval should make of them: every choice's (loglikelihood, is_greedy)
    from Hugging Face, and the greedy generations of ``LLM.generate`` on lm-eval's token ids and stop strings."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    questions = [(context, _with_greedy_choice(hf_model, tokenizer, context, choices))
                 for context, choices in QUESTIONS]
    scores = [[_loglikelihood(hf_model, *_encode_pair(tokenizer, context, choice)) for choice in choices]
              for context, choices in questions]
    gold = _gold([[ll for ll, _ in lls] for lls in scores])
    llm = LLM(model_dir, **ENGINE_OPTIONS)
    prompt_ids = [_encode(tokenizer, prompt) for prompt in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=MAX_GEN_TOKS)
    unstopped = [o.outputs[0].text for o in llm.generate(prompt_ids, params, use_tqdm=False)]
    stop = ["\n", tokenizer.eos_token]  # lm-eval adds the EOS text to `until`
    params = SamplingParams(temperature=0, max_tokens=MAX_GEN_TOKS, stop=stop)
    generations = [o.outputs[0].text for o in llm.generate(prompt_ids, params, use_tqdm=False)]
    assert ["\n" in text for text in unstopped] == [True, True, False]
    return dict(questions=questions, scores=scores, gold=gold, generations=generations,
                targets=generations[:-1] + [generations[-1] + "!"])  # exact_match 2/3


@pytest.fixture(scope="module")
def results(model_dir, server, expected, tmp_path_factory):
    """lm-eval's results on both tasks, with the samples logged."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    _write_task(folder, MC_TASK, MC_YAML, [dict(context=context, choices=choices, gold=answer) for (context, choices),
                                           answer in zip(expected["questions"], expected["gold"])])
    _write_task(folder, GEN_TASK, GEN_YAML, [dict(prompt=prompt, target=target)
                                             for prompt, target in zip(PROMPTS, expected["targets"])])
    model_args = dict(model=MODEL_NAME, base_url=f"{server[0]}/v1/completions", tokenizer=model_dir,
                      tokenizer_backend="huggingface", tokenized_requests=True, num_concurrent=1, max_retries=1,
                      max_length=ENGINE_OPTIONS["max_model_len"], timeout=30)
    local_only = _LocalOnly()
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            patch.setenv(variable, "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # both are read at import
        patch.setattr(socket, "getaddrinfo", local_only)
        evaluated = lm_eval.simple_evaluate(
            model="local-completions", model_args=model_args, tasks=[MC_TASK, GEN_TASK],
            task_manager=TaskManager(include_path=str(folder), include_defaults=False), log_samples=True,
            bootstrap_iters=0)
    assert local_only.refused == []
    _wait_idle(server[1])
    return evaluated


def _samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda sample: sample["doc_id"])


def test_multiple_choice_scores_match_hugging_face(results, expected):
    samples = _samples(results, MC_TASK)
    assert [sample["doc_id"] for sample in samples] == list(range(len(QUESTIONS)))
    for sample, (context, choices), scores, answer in zip(samples, expected["questions"], expected["scores"],
                                                         expected["gold"]):
        assert [tuple(arguments) for arguments in sample["arguments"]] == [(context, choice) for choice in choices]
        got = [tuple(resp[0]) for resp in sample["resps"]]
        assert len(got) == len(scores)
        for (ll, greedy), (want_ll, want_greedy) in zip(got, scores):
            assert abs(ll - want_ll) < TOLERANCE and greedy == want_greedy
        lls = [ll for ll, _ in scores]
        assert sample["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == answer)
    assert any(greedy for scores in expected["scores"] for _, greedy in scores)
    assert results["results"][MC_TASK]["acc,none"] == 0.5


def test_generate_until_matches_llm_generate(results, expected):
    samples = _samples(results, GEN_TASK)
    assert [sample["arguments"][0][0] for sample in samples] == PROMPTS
    assert [sample["resps"][0][0] for sample in samples] == expected["generations"]
    assert [sample["target"] for sample in samples] == expected["targets"]
    assert [sample["exact_match"] for sample in samples] == [1.0, 1.0, 0.0]
    assert results["results"][GEN_TASK]["exact_match,none"] == pytest.approx(2 / 3)

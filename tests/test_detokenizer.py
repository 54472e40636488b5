"""The byte-level shortcut of the incremental detokenizer gives exactly the text of the two-decode path."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flashserve.engine.detokenizer import IncrementalDetokenizer, OutputText
from flashserve.engine.token_bytes import byte_level_chars, token_bytes, token_texts
from flashserve.models.checkpoint import SPECIAL_TOKENS, save_tokenizer, train_tokenizer
from flashserve.models.demo import DEMO_TOKENIZER_VOCAB_SIZE
from flashserve.sampling_params import SamplingParams

TEXTS = ["naïve café — 日本語 🙂 ok", "Ünïcödé ∑ ∫ 中文字符 😀😃🎉 end", "plain ascii text, with spaces  and\nnewlines"]


@pytest.fixture(scope="module", params=[400, DEMO_TOKENIZER_VOCAB_SIZE], ids=["small", "demo"])
def tokenizer(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"tokenizer-{request.param}")
    save_tokenizer(train_tokenizer(request.param), str(directory))
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _by_tokenizer(detokenizer: IncrementalDetokenizer) -> IncrementalDetokenizer:
    """The same detokenizer without the byte table: today's two decodes on every step."""
    detokenizer.token_bytes, detokenizer.prefix_is_text = None, False
    return detokenizer


def _random_stream(tokenizer, rng: random.Random) -> list[int]:
    """Token ids mixing encoded text (multi-byte characters split across tokens), random ids (invalid bytes too,
    and a few past the vocabulary, as a model with padded embeddings may sample) and special tokens."""
    special_ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    vocab_size = len(tokenizer)
    stream = []
    while len(stream) < 40:
        kind = rng.random()
        if kind < 0.5:
            text = rng.choice(TEXTS)
            start = rng.randrange(len(text))
            stream += tokenizer.encode(text[start:start + rng.randint(1, 8)], add_special_tokens=False)
        elif kind < 0.85:
            stream.append(rng.randrange(vocab_size + 3))
        else:
            stream.append(rng.choice(special_ids))
    return stream


def test_byte_table_matches_the_tokenizer(tokenizer):
    table = token_bytes(tokenizer)
    assert table is not None and token_bytes(tokenizer) is table
    special_ids = set(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS))
    for token_id, data in enumerate(table):
        assert (data is None) == (token_id in special_ids)
        if data is not None and data.decode(errors="replace") == data.decode(errors="ignore"):
            assert tokenizer.backend_tokenizer.decode([token_id]) == data.decode()


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_shortcut_gives_the_deltas_of_two_decodes(tokenizer, skip_special_tokens):
    rng = random.Random(skip_special_tokens)
    fast_steps = 0
    for _ in range(150):
        prompt = _random_stream(tokenizer, rng)[:rng.randint(1, 12)]
        stream = _random_stream(tokenizer, rng)
        fast = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
        slow = _by_tokenizer(IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens))
        token_ids = list(prompt)
        for position, token_id in enumerate(stream):
            token_ids.append(token_id)
            flush = position == len(stream) - 1 or rng.random() < 0.02
            fast_steps += fast.prefix_is_text
            assert fast.step(token_ids, flush) == slow.step(token_ids, flush)
            assert (fast.prefix_offset, fast.read_offset) == (slow.prefix_offset, slow.read_offset)
    assert fast_steps > 1000  # the shortcut was taken, not only the fallback


@pytest.mark.parametrize("stop", [None, ["日本", "e", " ok"]])
@pytest.mark.parametrize("include_stop_str_in_output", [True, False])
def test_output_text_is_the_same_with_the_shortcut(tokenizer, stop, include_stop_str_in_output):
    rng = random.Random(len(stop or []) + include_stop_str_in_output)
    for _ in range(60):
        params = SamplingParams(stop=stop, include_stop_str_in_output=include_stop_str_in_output,
                                skip_special_tokens=rng.random() < 0.5)
        prompt = _random_stream(tokenizer, rng)[:5]
        stream = _random_stream(tokenizer, rng)
        fast, slow = OutputText(tokenizer, prompt, params), OutputText(tokenizer, prompt, params)
        _by_tokenizer(slow.detokenizer)
        token_ids = list(prompt)
        finish = rng.choice(["stop", "length"])
        for position, token_id in enumerate(stream):
            token_ids.append(token_id)
            reason = finish if position == len(stream) - 1 else None
            results = [(text.add(token_ids, position + 1, reason), text.take_unsent(reason is not None))
                       for text in (fast, slow)]
            assert results[0] == results[1]
            if results[0][0] is not None:
                break
        assert fast.text == slow.text


def test_other_tokenizers_have_no_byte_table(tmp_path):
    chars = byte_level_chars()
    assert len(chars) == 256 and sorted(chars.values()) == list(range(256))
    metaspace = Tokenizer(models.BPE(vocab={"a": 0, "▁b": 1}, merges=[]))
    metaspace.decoder = decoders.Metaspace()
    assert token_bytes(PreTrainedTokenizerFast(tokenizer_object=metaspace)) is None
    save_tokenizer(train_tokenizer(300), str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert token_bytes(tokenizer)[100] is not None
    tokenizer.add_tokens(["héllo"])
    added_id = tokenizer.convert_tokens_to_ids("héllo")
    assert token_bytes(tokenizer)[added_id] is None
    tokenizer.add_special_tokens({"additional_special_tokens": [tokenizer.convert_ids_to_tokens(100)]})
    assert token_bytes(tokenizer)[100] is None  # now special: skip_special_tokens leaves it out


def test_tokens_outside_the_byte_alphabet_decode_as_their_own_utf8():
    # a token with "中" or "€" is not byte-level: ByteLevel keeps its UTF-8; letters keep most sequences valid
    chars = [*byte_level_chars(), *"中€" * 20, *"abcdefghij" * 40]
    assert "中" not in byte_level_chars() and "€" not in byte_level_chars()
    rng = random.Random(0)
    vocab = {}
    while len(vocab) < 3000:
        vocab["".join(rng.choice(chars) for _ in range(rng.randint(1, 6)))] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    table = token_bytes(tokenizer)
    checked = 0
    for _ in range(1000):
        ids = [rng.randrange(len(table)) for _ in range(rng.randint(1, 4))]
        expected = tokenizer.backend_tokenizer.decode(ids)
        if all(table[token_id] is not None for token_id in ids) and "\ufffd" not in expected:
            assert b"".join(table[token_id] for token_id in ids).decode() == expected
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("stop", [None, ["日本", "e", " ok"]])
def test_output_text_extend_is_add_then_take_unsent(tokenizer, stop):
    """``extend`` (the engine's one call per token) returns what ``add`` then ``take_unsent`` return, text too."""
    rng = random.Random(7 + len(stop or []))
    for _ in range(40):
        params = SamplingParams(stop=stop, include_stop_str_in_output=rng.random() < 0.5)
        prompt = _random_stream(tokenizer, rng)[:5]
        stream = _random_stream(tokenizer, rng)
        one, two = OutputText(tokenizer, prompt, params), OutputText(tokenizer, prompt, params)
        token_ids = list(prompt)
        finish = rng.choice(["stop", "length"])
        for position, token_id in enumerate(stream):
            token_ids.append(token_id)
            reason = finish if position == len(stream) - 1 else None
            stop_string = two.add(token_ids, position + 1, reason)
            expected = (stop_string, two.take_unsent(reason is not None or stop_string is not None))
            assert one.extend(token_ids, position + 1, reason) == expected
            if stop_string is not None:
                break
        assert one.text == two.text and one.num_sent_chars == two.num_sent_chars


def test_long_output_text_kept_in_pieces_is_the_whole_text(tokenizer):
    """Past the pieces an OutputText keeps before joining them, ``text`` is still everything sent, in order."""
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    stream = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)[:700]
    output = OutputText(tokenizer, prompt, SamplingParams())
    token_ids, sent = list(prompt), []
    for position, token_id in enumerate(stream):
        token_ids.append(token_id)
        sent.append(output.extend(token_ids, position + 1, "length" if position == len(stream) - 1 else None)[1])
    assert len(stream) == 700 and output.text == "".join(sent)
    assert output.text == tokenizer.decode(stream, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_text_table_classifies_every_token(tokenizer):
    """``token_texts``: complete text, "" (wait: empty or an incomplete last character), False (added token or
    invalid bytes), None (valid text ending in U+FFFD), from the byte table."""
    for data, text in zip(token_bytes(tokenizer), token_texts(tokenizer)):
        if data is None:
            assert text is False
            continue
        try:
            decoded = data.decode()
        except UnicodeDecodeError as error:
            assert text == ("" if error.reason == "unexpected end of data" else False)
            continue
        assert text == (None if decoded.endswith("\ufffd") else decoded)

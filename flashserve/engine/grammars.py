"""Grammars of structured outputs: a ``StructuredOutputsParams`` -> an xgrammar grammar, compiled off the engine
thread and cached.

Building the grammar (schema or regex -> EBNF) is fast and happens when the request is added, so that an invalid
schema, regex or grammar is a ValueError naming the field right away. Compiling it against the tokenizer's
vocabulary (the token masks xgrammar precomputes) can take from milliseconds to seconds; it runs in a worker
thread, once per distinct grammar (``StructuredOutputsParams.key``): every request with the same key shares the
same ``Future`` of the ``CompiledGrammar``. The cache keeps the ``MAX_CACHED_GRAMMARS`` most recently used.
"""
import json
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from flashserve.sampling_params import StructuredOutputsParams

MAX_CACHED_GRAMMARS = 512
# The character classes xgrammar's JSON-schema grammars (0.2.9) use inside strings, rewritten to the characters JSON
# allows unescaped (and only valid UTF-8): the class of a string with minLength/maxLength lets raw control
# characters (U+0000-U+001F) in (mlc-ai/xgrammar#800), and both let UTF-8-encoded surrogates (U+D800-U+DFFF,
# bytes no decoder accepts) in. Escapes stay unreachable in length-bounded strings, as before.
_STRING_CHARACTER_CLASSES = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')
_JSON_STRING_CHARACTER = r'[^\0-\x1f\"\\\uD800-\uDFFF]'
_XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[\d:]+\] [^ ]+:\d+: (Check failed: .*? is false: )?")


def _xgrammar():
    """The xgrammar module, or a ValueError saying how to install it."""
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured_outputs needs the xgrammar package: pip install 'flashserve[structured]'") \
            from None
    return xgrammar


def build_grammar(spec: StructuredOutputsParams):
    """The ``xgrammar.Grammar`` of ``spec``; ValueError starting with ``structured_outputs.<field>`` when xgrammar
    refuses the schema, regex or grammar (an unsupported schema feature included)."""
    xgr = _xgrammar()
    kind = spec.kind
    try:
        if kind == "json":
            grammar = xgr.Grammar.from_json_schema(spec.key[1], any_whitespace=False, strict_mode=True)
            text = original = str(grammar)
            for character_class in _STRING_CHARACTER_CLASSES:
                text = text.replace(character_class, _JSON_STRING_CHARACTER)
            return grammar if text == original else xgr.Grammar.from_ebnf(text)
        if kind == "json_object":
            return xgr.Grammar.builtin_json_grammar()
        if kind == "regex":
            return xgr.Grammar.from_regex(spec.regex)
        if kind == "choice":
            # one alternative per choice: JSON string literals are valid EBNF literals
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(choice) for choice in spec.choice))
        return xgr.Grammar.from_ebnf(spec.grammar)
    except (RuntimeError, ValueError) as error:
        message = _XGRAMMAR_LOG_PREFIX.sub("", str(error).strip().splitlines()[0] if str(error).strip() else "")
        noun = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(kind, kind)
        raise ValueError(f"structured_outputs.{kind}: invalid {noun}: {message or type(error).__name__}") from None


class GrammarCompiler:
    """Compiles grammars for one tokenizer in a worker thread, each distinct one once.

    The worker first reads the vocabulary (its own copy of the tokenizer, xgrammar's ``TokenizerInfo``: about a
    second for a 150k-token vocabulary), so that neither that nor any compilation ever runs on the engine thread.

    Args:
        tokenizer_path: the Hugging Face tokenizer the outputs are decoded with (a local directory).
        vocab_size: the model's vocabulary size (rows of its logits; may exceed the tokenizer's).
        stop_token_ids: the tokens that end a completed grammar (the engine's EOS tokens).
    """

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]):
        _xgrammar()  # a missing package is a ValueError now, not a failed compilation later
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashserve-grammar")
        self._compiler = None
        self._setup = self._executor.submit(self._make_compiler, tokenizer_path, vocab_size, list(stop_token_ids))
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()

    def _make_compiler(self, tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]) -> None:
        """Worker thread: xgrammar's compiler for the tokenizer."""
        from transformers import AutoTokenizer

        xgr = _xgrammar()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=stop_token_ids or None)
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def _compile(self, grammar):
        """Worker thread: the ``CompiledGrammar`` of ``grammar`` (after the compiler's set-up, whose error, if
        any, it raises)."""
        self._setup.result()
        return self._compiler.compile_grammar(grammar)

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """The future ``CompiledGrammar`` of ``spec`` (a cached one when the same grammar was asked for before);
        ValueError naming the field, at once, for an invalid one."""
        key = spec.key
        future = self._cache.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._cache.move_to_end(key)
            return future
        grammar = build_grammar(spec)
        future = self._cache[key] = self._executor.submit(self._compile, grammar)
        while len(self._cache) > MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return future

"""Each token's bytes, for byte-level BPE tokenizers (GPT-2, Llama-3, Qwen), read once from the tokenizer's JSON.

For such a tokenizer (a ``BPE`` model whose decoder is exactly ``ByteLevel``) the Rust ``decode`` of ids that are
all vocabulary tokens (no added tokens) is the UTF-8 decoding, with U+FFFD for invalid bytes, of the
concatenation of each token's bytes: ``ByteLevel`` maps each character of a token back to its byte through GPT-2's
byte <-> character table, or, for a token with a character outside that table, takes the token's own UTF-8 bytes.
``token_bytes`` returns that per-token table; the incremental detokenizer uses it to decode without calling the
tokenizer (``flashserve.engine.detokenizer``). Added tokens (special or not) get None: their text depends on
``skip_special_tokens`` and on the added-vocabulary rules, so windows holding them go to the tokenizer.
"""
import json
import weakref

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""tokenizer -> ((vocabulary size, number of added tokens) when built, its table or None, its text table or None)."""


def byte_level_chars() -> dict[str, int]:
    """GPT-2's character -> byte table: printable Latin-1 bytes stand for themselves, the other bytes for the
    characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(byte): byte for byte in printable}
    others = [byte for byte in range(256) if chr(byte) not in chars]
    chars.update({chr(256 + index): byte for index, byte in enumerate(others)})
    return chars


def _build(backend) -> list[bytes | None] | None:
    """The table of a Rust ``tokenizers.Tokenizer``, or None when it is not a plain byte-level BPE tokenizer."""
    spec = json.loads(backend.to_str())
    decoder, model = spec.get("decoder") or {}, spec.get("model") or {}
    if decoder.get("type") != "ByteLevel" or model.get("type") != "BPE":
        return None
    chars = byte_level_chars()
    vocab, added_tokens = model["vocab"], spec.get("added_tokens") or []
    table: list[bytes | None] = [None] * (max([*vocab.values(), *(added["id"] for added in added_tokens), -1]) + 1)
    for token, token_id in vocab.items():
        if all(char in chars for char in token):
            table[token_id] = bytes(chars[char] for char in token)
        else:
            table[token_id] = token.encode()
    for added in added_tokens:
        table[added["id"]] = None
    return table


def token_bytes(tokenizer) -> list[bytes | None] | None:
    """The bytes of every token id of a Hugging Face fast tokenizer (None for added tokens), or None for a
    tokenizer that is not byte-level BPE (or not a fast one). Built once per tokenizer, again if tokens were added
    (or made special) since."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    # tokens can only be added (an existing token made special counts as added): sizes tell whether it changed
    sizes = (backend.get_vocab_size(with_added_tokens=True), len(backend.get_added_tokens_decoder()))
    try:
        cached = _TABLES.get(tokenizer)
    except TypeError:  # a tokenizer that cannot be a weak key: no shortcut rather than a table per request
        return None
    if cached is None or cached[0] != sizes:
        table = _build(backend)
        cached = _TABLES[tokenizer] = (sizes, table, None if table is None else _texts(table))
    return cached[1]


def token_texts(tokenizer) -> list[str | bool | None] | None:
    """Beside ``token_bytes``, what each token's bytes alone decode to: their text where they are complete text
    (valid UTF-8, not empty, not ending in U+FFFD); "" where they are empty or valid UTF-8 up to an incomplete last
    character (text that has to wait for the next token); False for added tokens and invalid UTF-8 (not text
    alone); None for valid text ending in U+FFFD. No table where ``token_bytes`` has none."""
    if token_bytes(tokenizer) is None:
        return None
    return _TABLES[tokenizer][2]


def _texts(table: list[bytes | None]) -> list[str | bool | None]:
    """The text table of a byte table (see ``token_texts``)."""
    texts: list[str | bool | None] = []
    for data in table:
        try:
            text = data.decode()
        except AttributeError:
            text = False
        except UnicodeDecodeError as error:
            text = "" if error.reason == "unexpected end of data" else False
        else:
            text = None if text.endswith("\ufffd") else text
        texts.append(text)
    return texts

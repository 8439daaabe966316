"""Text to token ids and back, for every model Tidal serves.

    tok = load_tokenizer_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = tok.encode(prompt)                  # "<|im_start|>" in the text becomes its id
    out = b"".join(tok.token_bytes(i) for i in generated_ids).decode("utf-8", errors="replace")

Four sources share one interface, `Tokenizer`:
- GGUF with a byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama 3, Qwen2,
  Mistral Nemo): encoded by a `tokenizers.Tokenizer` built from the file's tokens and merges.
- GGUF with a SentencePiece vocabulary (`"llama"`: Llama 2, Mistral 7B): encoded by the score-driven
  merge loop in `SentencePieceBPETokenizer`.
- A Hugging Face model directory with `tokenizer.json`: encoded by `tokenizers` itself.
- `ByteTokenizer`, the 260-id tokenizer of the random-weights test model "tiny-llama".

Output text is defined by `token_bytes`: the exact bytes each id adds to the output, precomputed for
every id. Control tokens add nothing, so "<|im_end|>" never leaks into a response.
"""

from __future__ import annotations

import abc
import heapq
import json
import os
import re
from datetime import datetime
from functools import lru_cache, partial
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from instance.gguf_meta import read_gguf_metadata

CHAT_ROLES = ("system", "user", "assistant", "tool")

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn even when the metadata names a different eos, as llama.cpp treats them.
_END_OF_TURN_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>")

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer(abc.ABC):
    """Encodes prompts, renders chat templates, and gives each token's output bytes."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None

    def __init__(
        self,
        pieces: list[bytes],
        *,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        add_bos: bool,
        chat_template: str | None,
        bos_token: str = "",
        eos_token: str = "",
    ):
        self._pieces = pieces
        self.vocab_size = len(pieces)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        self._bos_token = bos_token
        self._eos_token = eos_token

    @abc.abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Ids for `text`, special tokens written in it parsed to their ids, no BOS added."""

    def encode(self, text: str) -> list[int]:
        """Ids for `text`, with BOS in front when the model wants one and the text does not start with it."""
        ids = self._encode_text(text)
        if self.add_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token adds to output text; b"" for control tokens and for ids past the vocabulary
        (a model's embedding table may be padded beyond it)."""
        if 0 <= token_id < self.vocab_size:
            return self._pieces[token_id]
        return b""

    def decode(self, token_ids) -> str:
        return b"".join(self.token_bytes(i) for i in token_ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, rendered with the model's chat template."""
        if not self.chat_template:
            raise ValueError(
                "this model has no chat template; send a plain completion prompt instead of chat messages"
            )
        _check_messages(messages)
        try:
            return _compile_template(self.chat_template).render(
                messages=messages,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as error:
            raise ValueError(f"the model's chat template rejected these messages: {error}") from error


def _check_messages(messages: list[dict]) -> None:
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            raise ValueError(f"message {index} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if "content" not in message:
            raise ValueError(f"message {index} (role {role!r}) has no 'content'; add the message text as 'content'")


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # The same environment transformers renders chat templates in, so prompts come out identical.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _split_special(text: str, specials: dict[str, int]):
    """Yield the text between special tokens as str, and each special token found as its id."""
    if not specials:
        yield text
        return
    pattern = _special_pattern(tuple(sorted(specials, key=len, reverse=True)))
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            yield text[start : match.start()]
        yield specials[match.group()]
        start = match.end()
    if start < len(text):
        yield text[start:]


@lru_cache(maxsize=8)
def _special_pattern(texts_longest_first: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in texts_longest_first))


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level BPE vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


def _byte_level_bytes(text: str) -> bytes:
    """The bytes a byte-level BPE token spells; a character outside the table stands for itself."""
    inverse = _unicode_to_bytes()
    return b"".join(bytes([inverse[c]]) if c in inverse else c.encode("utf-8") for c in text)


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _sentencepiece_bytes(text: str, byte_fallback: bool = True) -> bytes:
    """The bytes a SentencePiece token spells: "▁" is a space, "<0xAB>" is the byte 0xAB."""
    match = _BYTE_TOKEN.fullmatch(text) if byte_fallback else None
    if match:
        return bytes([int(match.group(1), 16)])
    return text.replace("▁", " ").encode("utf-8")


class ByteTokenizer(Tokenizer):
    """The tiny-llama tokenizer: ids 0..255 are raw bytes, then four special tokens."""

    SPECIALS = {"<s>": 256, "</s>": 257, "<|im_start|>": 258, "<|im_end|>": 259}
    CHAT_TEMPLATE = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    def __init__(self):
        super().__init__(
            [bytes([b]) for b in range(256)] + [b""] * len(self.SPECIALS),
            bos_token_id=256,
            eos_token_ids=(257, 259),
            add_bos=True,
            chat_template=self.CHAT_TEMPLATE,
            bos_token="<s>",
            eos_token="</s>",
        )

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _split_special(text, self.SPECIALS):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(part.encode("utf-8"))
        return ids


class HuggingFaceTokenizer(Tokenizer):
    """Encoding done by a `tokenizers.Tokenizer`; output bytes come from the precomputed pieces."""

    def __init__(self, backend: tokenizers.Tokenizer, pieces: list[bytes], **common):
        super().__init__(pieces, **common)
        self._backend = backend

    def _encode_text(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids


class SentencePieceBPETokenizer(Tokenizer):
    """SentencePiece BPE driven by token scores, as llama.cpp runs GGUF files with `tokenizer.ggml.model == "llama"`.

    Spaces become "▁" and a "▁" is put in front of the text and after each special token (the dummy prefix,
    unless the file turns `add_space_prefix` off). Then, repeatedly, the adjacent pair whose concatenation is
    the highest-scoring vocabulary token is merged (leftmost on ties). A piece left outside the vocabulary is
    spelled with its UTF-8 bytes as "<0xAB>" tokens. Because of the dummy prefix, `decode(encode("hi"))` is " hi".
    """

    def __init__(
        self,
        tokens: list[str],
        scores: list[float],
        token_types: list[int],
        *,
        add_space_prefix: bool = True,
        unknown_token_id: int | None = None,
        **common,
    ):
        spelled = (NORMAL, USER_DEFINED, BYTE)
        pieces = [_sentencepiece_bytes(t) if k in spelled else b"" for t, k in zip(tokens, token_types)]
        super().__init__(pieces, **common)
        entries = list(enumerate(zip(tokens, scores, token_types)))
        self._mergeable = {t: (i, score) for i, (t, score, k) in entries if k == NORMAL}
        self._specials = {t: i for i, (t, _, k) in entries if k in (CONTROL, USER_DEFINED)}
        self._byte_ids = {self._pieces[i][0]: i for i, (t, _, k) in entries if k == BYTE and _BYTE_TOKEN.fullmatch(t)}
        self._add_space_prefix = add_space_prefix
        self._unknown_token_id = unknown_token_id

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        after_special = True
        for part in _split_special(text, self._specials):
            if isinstance(part, int):
                ids.append(part)
                after_special = True
                continue
            prefix = "▁" if self._add_space_prefix and after_special else ""
            ids.extend(self._merge(prefix + part.replace(" ", "▁")))
            after_special = False
        return ids

    def _merge(self, text: str) -> list[int]:
        symbols: list[str | None] = list(text)
        n = len(symbols)
        following = list(range(1, n + 1))
        preceding = list(range(-1, n - 1))
        candidates: list[tuple[float, int, int, str]] = []

        def consider(left: int, right: int) -> None:
            merged = symbols[left] + symbols[right]
            if merged in self._mergeable:
                heapq.heappush(candidates, (-self._mergeable[merged][1], left, right, merged))

        for i in range(n - 1):
            consider(i, i + 1)
        while candidates:
            _, left, right, merged = heapq.heappop(candidates)
            if None in (symbols[left], symbols[right]) or symbols[left] + symbols[right] != merged:
                continue  # stale: one side has merged with something else since
            symbols[left], symbols[right] = merged, None
            following[left] = following[right]
            if following[left] < n:
                preceding[following[left]] = left
            if preceding[left] >= 0:
                consider(preceding[left], left)
            if following[left] < n:
                consider(left, following[left])

        ids: list[int] = []
        i = 0
        while i < n:
            ids.extend(self._piece_ids(symbols[i]))
            i = following[i]
        return ids

    def _piece_ids(self, piece: str) -> list[int]:
        if piece in self._mergeable:
            return [self._mergeable[piece][0]]
        ids = []
        for byte in piece.encode("utf-8"):
            token_id = self._byte_ids.get(byte, self._unknown_token_id)
            if token_id is None:
                raise ValueError(
                    f"the character {piece!r} is not in this model's vocabulary, which has no byte or unknown tokens"
                )
            ids.append(token_id)
        return ids


# How text is split into words before byte-level BPE, per GGUF `tokenizer.ggml.pre` (same as llama.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_FAMILIES = {
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2",
    "smollm": "smollm",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "megrez": "qwen2",
    "tekken": "tekken",
}


def _byte_level_pre_tokenizer(family: str):
    if family == "smollm":  # what SmolLM2's own tokenizer.json does: every digit is its own word
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "tekken": _TEKKEN_SPLIT}[family]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def load_tokenizer_from_gguf(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist; check the model path")
    meta = read_gguf_metadata(path)
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(
            f"{path} carries no tokenizer (no tokenizer.ggml.tokens); use a GGUF converted with its tokenizer"
        )
    token_types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    model = meta.get("tokenizer.ggml.model")
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    explicit_eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos_ids = _end_of_generation_ids(explicit_eos, {t: i for i, t in enumerate(tokens)})
    common = dict(
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=tokens[bos_id] if bos_id is not None else "",
        eos_token=tokens[eos_id] if eos_id is not None else "",
    )
    if model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        family = _PRE_TOKENIZER_FAMILIES.get(pre)
        if family is None:
            raise ValueError(
                f"{path} asks for the {pre!r} pre-tokenizer, which Tidal does not implement; "
                f"supported: {', '.join(sorted(_PRE_TOKENIZER_FAMILIES))}"
            )
        default_add_bos = family in ("llama3", "tekken")
        common["add_bos"] = meta.get("tokenizer.ggml.add_bos_token", default_add_bos)
        return _byte_level_from_gguf(tokens, token_types, meta.get("tokenizer.ggml.merges") or [], family, common)
    if model == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError(
                f"{path} has a SentencePiece vocabulary without tokenizer.ggml.scores; re-convert it with llama.cpp"
            )
        return SentencePieceBPETokenizer(
            tokens,
            scores,
            token_types,
            add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
            unknown_token_id=meta.get("tokenizer.ggml.unknown_token_id"),
            add_bos=meta.get("tokenizer.ggml.add_bos_token", True),
            **common,
        )
    raise ValueError(
        f"{path} uses the {model!r} tokenizer; Tidal reads the 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) "
        "GGUF tokenizers"
    )


def _byte_level_from_gguf(tokens, token_types, merges, family: str, common: dict) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ", 1)) for m in merges],
        ignore_merges=family in ("llama3", "tekken"),  # a word that is already a token stays whole
    )
    backend = tokenizers.Tokenizer(model)
    if family == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _byte_level_pre_tokenizer(family)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, token_types) if kind == USER_DEFINED]
    )
    pieces = []
    for text, kind in zip(tokens, token_types):
        if kind == NORMAL:
            pieces.append(_byte_level_bytes(text))
        elif kind == USER_DEFINED:
            pieces.append(text.encode("utf-8"))  # matched as raw text, so it reads back as raw text
        elif kind == BYTE:
            pieces.append(_sentencepiece_bytes(text))
        else:
            pieces.append(b"")
    return HuggingFaceTokenizer(backend, pieces, **common)


def _end_of_generation_ids(explicit: list[int | None], special_ids: dict[str, int]) -> tuple[int, ...]:
    """The declared end ids first, then any well-known end-of-turn token the vocabulary has."""
    ids = [i for i in explicit if i is not None]
    ids += [special_ids[t] for t in _END_OF_TURN_TEXTS if t in special_ids]
    return tuple(dict.fromkeys(ids))


def load_tokenizer_from_hf_dir(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory (tokenizer.json, tokenizer_config.json, ...)."""
    directory = Path(path)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(
            f"{directory} has no tokenizer.json; point at a Hugging Face model directory that contains one"
        )
    backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    decoder_kinds = _decoder_kinds(json.loads(tokenizer_file.read_text(encoding="utf-8")).get("decoder"))
    config = _read_json(directory / "tokenizer_config.json")
    generation = _read_json(directory / "generation_config.json")

    added = backend.get_added_tokens_decoder()
    vocab = backend.get_vocab(with_added_tokens=True)
    pieces = [b""] * (max(vocab.values()) + 1)
    if "ByteLevel" in decoder_kinds:
        spell = _byte_level_bytes
    elif decoder_kinds & {"Metaspace", "ByteFallback", "Replace"}:
        spell = partial(_sentencepiece_bytes, byte_fallback="ByteFallback" in decoder_kinds)
    else:
        raise ValueError(
            f"{tokenizer_file} has a {sorted(decoder_kinds) or 'missing'} decoder; Tidal reads byte-level BPE and "
            "SentencePiece tokenizers (decoder ByteLevel, Metaspace or ByteFallback)"
        )
    for text, i in vocab.items():
        if i in added:
            pieces[i] = b"" if added[i].special else added[i].content.encode("utf-8")
        else:
            pieces[i] = spell(text)

    bos_id = _config_token_id(backend, config.get("bos_token"))
    eos_id = _config_token_id(backend, config.get("eos_token"))
    generation_eos = generation.get("eos_token_id")
    generation_eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    special_ids = {token.content: i for i, token in added.items() if token.special}
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):  # not stated: does tokenizer.json's post-processor add it?
        add_bos = bos_id is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    return HuggingFaceTokenizer(
        backend,
        pieces,
        bos_token_id=bos_id,
        eos_token_ids=_end_of_generation_ids([eos_id, *generation_eos], special_ids),
        add_bos=add_bos,
        chat_template=_hf_chat_template(directory, config),
        bos_token=backend.id_to_token(bos_id) if bos_id is not None else "",
        eos_token=backend.id_to_token(eos_id) if eos_id is not None else "",
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or remove it") from error


def _decoder_kinds(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    kinds = {decoder.get("type")}
    for child in decoder.get("decoders") or []:
        kinds |= _decoder_kinds(child)
    return kinds


def _config_token_id(backend: tokenizers.Tokenizer, token) -> int | None:
    """tokenizer_config.json names tokens as a string or as {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _hf_chat_template(directory: Path, config: dict) -> str | None:
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template

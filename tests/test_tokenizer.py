"""Tokenizer: GGUF-built vs transformers' tokenizer of the same file, chat templates, streaming."""
from __future__ import annotations

import json

import jinja2
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors

from d3kernels.loaders.gguf import load_gguf
from d3kernels.tokenizer import Tokenizer

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading, trailing and   inner   spaces  \n\n\ttabs\r\nCRLF",
    "Unicode: café, naïve, 日本語, Ελληνικά, русский",
    "Emoji 😀🚀 and a family 👨‍👩‍👧 (ZWJ sequence)",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "Digits 12345 + 678 = 13023, pi ≈ 3.14159, a1b22c333",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>doc<file_sep>path/to/file.py<gh_stars>",
    "don't I'll we're they've",
    "",
    " ",
]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3? 🤔"}],
]


@pytest.fixture(scope="module")
def tok(smollm2_gguf_path) -> Tokenizer:
    return load_gguf(smollm2_gguf_path)[2]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_smollm2_tokenizer, text):
    ids = tok.encode(text)
    assert ids == hf_smollm2_tokenizer.encode(text)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == \
            hf_smollm2_tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_tokens(tok):
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)  # <|im_start|>, <|im_end|>
    assert tok.stop_token_ids == (2, 0)  # <|im_end|>, <|endoftext|>
    assert not tok.add_bos_token and tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    assert tok.encode("<|im_end|>") == [2]
    assert tok.decode([1, 19556, 2]) == "Hello"


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_smollm2_tokenizer, messages,
                                            add_generation_prompt):
    rendered = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == hf_smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == hf_smollm2_tokenizer.encode(rendered, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_stream_decoder_reproduces_decode(tok):
    text = "Emoji 😀🚀👨‍👩‍👧 café 日本語 — done.<|im_end|>"
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some emoji span several tokens and were held back


def test_stream_decoder_flush_returns_incomplete_tail(tok):
    ids = tok.encode("a😀")
    stream = tok.stream_decoder()
    assert stream.push(ids[0]) == "a"
    assert stream.push(ids[1]) == ""  # first byte(s) of the emoji only
    assert stream.flush() == tok.decode(ids[:2])[1:]


def test_from_hf_dir_matches_transformers(hf_smollm2_tokenizer, tmp_path):
    hf_smollm2_tokenizer.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf_smollm2_tokenizer.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.apply_chat_template(CHATS[1]) == hf_smollm2_tokenizer.apply_chat_template(
        CHATS[1], tokenize=False, add_generation_prompt=True)


def test_from_hf_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_hf_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_from_hf_dir_post_processor_bos_not_doubled(tmp_path):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<s>": 256, "</s>": 257}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 256)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True,
        "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"},
                          {"name": "tool_use", "template": "unused"}]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    a, b = vocab["a"], vocab["b"]
    assert tok.encode("ab") == [256, a, b]
    assert tok.encode("ab", add_special_tokens=False) == [a, b]
    assert tok.encode_chat([{"role": "user", "content": "ab"}]) == [256, a, b]
    assert (tok.bos_token_id, tok.eos_token_id, tok.stop_token_ids) == (256, 257, (257,))


# ------------------------------------------------------------------ synthetic GGUF metadata
def _tiny_fields(**overrides) -> dict:
    """A byte-level vocabulary: the 256 byte symbols, one merge, two control tokens and one
    user-defined token."""
    tokens = list(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "<s>", "</s>", "<think>"]
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 257 + [3, 3, 4],
        "tokenizer.ggml.merges": ["Ġ t"],
        "tokenizer.ggml.bos_token_id": 257,
        "tokenizer.ggml.eos_token_id": 258,
        "tokenizer.ggml.add_bos_token": True,
    }
    fields.update(overrides)
    return fields


def test_gguf_fields_bos_and_added_tokens():
    tok = Tokenizer.from_gguf_fields(_tiny_fields())
    ids = tok.encode(" t<think></s>")
    assert ids == [257, 256, 259, 258]
    assert tok.encode(" t", add_special_tokens=False) == [256]
    assert tok.decode(ids) == " t<think>"  # control tokens dropped, user-defined kept
    assert tok.decode(ids, skip_special_tokens=False) == "<s> t<think></s>"
    assert tok.stop_token_ids == (258,)


def test_gguf_fields_errors():
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf_fields(_tiny_fields(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match="'mystery-pre'"):
        Tokenizer.from_gguf_fields(_tiny_fields(**{"tokenizer.ggml.pre": "mystery-pre"}))
    tok = Tokenizer.from_gguf_fields(_tiny_fields())
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_helpers():
    template = ("{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
                "{{ raise_exception('bad role ' + m.role) }}{% endif %}"
                "{{ m.content | tojson }}{{ eos_token }}{% endfor %}")
    tok = Tokenizer.from_gguf_fields(_tiny_fields(**{"tokenizer.chat_template": template}))
    assert tok.apply_chat_template([{"role": "user", "content": "é\"<"}]) == \
        "<s>" + json.dumps("é\"<", ensure_ascii=False) + "</s>"
    assert tok.encode_chat([{"role": "user", "content": "t"}])[:1] == [257]  # BOS once
    assert tok.encode_chat([{"role": "user", "content": "t"}])[1] != 257
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])

"""Text <-> token ids for Llama-family models, built from GGUF metadata or a Hugging Face directory.

The heavy lifting (BPE, byte-level pre-tokenization, added tokens) is done by the HF ``tokenizers``
library; this module only assembles a ``tokenizers.Tokenizer`` the way llama.cpp describes it in a
GGUF file, and adds BOS handling, stop tokens, chat templates and streaming decode on top.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# End-of-turn / end-of-text markers of common Llama-family chat models. Generation stops on any
# of them that exist in the vocabulary, besides the declared EOS.
_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")

# Pre-tokenizer splits, keyed by llama.cpp's ``tokenizer.ggml.pre`` names. The regexes are the ones
# llama.cpp (llama-vocab.cpp) uses for those names; a wrong split silently yields different ids,
# so unknown names are rejected rather than guessed.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Names whose split is exactly GPT-2's regex (ByteLevel's built-in one).
_GPT2_PRE = {"default", "gpt2", "mpt", "olmo", "jais"}
# GPT-2's regex after isolating every digit (SmolLM2 is "smollm").
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_REGEX_PRE = {
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_level_pre_tokenizer(pre: str):
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in _REGEX_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_REGEX_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    known = sorted(_GPT2_PRE | _DIGITS_PRE | set(_REGEX_PRE))
    raise ValueError(f"tokenizer: unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} "
                     f"(supported: {', '.join(known)})")


def _split_merge(merge: str) -> tuple[str, str]:
    # As llama.cpp does: at the first space after position 0.
    i = merge.find(" ", 1)
    if i < 0:
        raise ValueError(f"tokenizer: malformed GGUF merge {merge!r}")
    return merge[:i], merge[i + 1:]


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandboxed environment transformers uses."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the model-level conventions around it.

    Attributes: ``vocab_size`` (int, added tokens included), ``bos_token_id`` / ``eos_token_id``
    (int or None), ``add_bos_token`` (whether ``encode`` prepends BOS), ``stop_token_ids``
    (tuple[int, ...]: EOS plus the end-of-turn / end-of-text tokens in ``_STOP_TOKENS`` that
    exist in the vocabulary), ``chat_template``
    (Jinja source or None).
    """

    def __init__(self, backend: _Backend, *, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos_token: bool, chat_template: str | None):
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None
        # A tokenizer.json post-processor may already insert BOS; adding it again would double it.
        already_added = bos_token_id is not None and bos_token_id in backend.encode("").ids
        self.add_bos_token = bool(add_bos_token) and bos_token_id is not None and not already_added
        stops = (eos_token_id, *(backend.token_to_id(t) for t in _STOP_TOKENS))
        self.stop_token_ids = tuple(dict.fromkeys(i for i in stops if i is not None))

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
        """Build from GGUF metadata (``tokenizer.ggml.*`` keys mapped to Python values).

        Only ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE, as in SmolLM2 and Llama 3) is
        supported.
        """
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer: GGUF tokenizer model {model!r} is not supported "
                             f"(only 'gpt2', byte-level BPE)")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in fields:
                raise ValueError(f"tokenizer: GGUF metadata lacks {key!r}")
        tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
        merges = [_split_merge(m) for m in fields["tokenizer.ggml.merges"]]
        pre = fields.get("tokenizer.ggml.pre", "default")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("tokenizer: GGUF token list contains duplicate tokens")

        # Llama-3-style vocabularies take a whole pre-token from the vocab before merging (HF's
        # tokenizer.json sets ignore_merges there, llama.cpp does the same).
        backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                      ignore_merges=pre in _REGEX_PRE))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()

        # Control tokens must match whole in text and be droppable on decode (special); user-defined
        # ones must match whole but stay visible. They are already in the vocab, so ids don't move.
        types = fields.get("tokenizer.ggml.token_type") or ()
        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_USER_DEFINED]
        backend.add_special_tokens(special)
        backend.add_tokens(user)
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ValueError("tokenizer: GGUF special tokens are not part of the token list")

        bos = fields.get("tokenizer.ggml.bos_token_id")
        eos = fields.get("tokenizer.ggml.eos_token_id")
        # A byte-level BPE file that doesn't say adds no BOS (transformers' GGUF loader agrees).
        add_bos = fields.get("tokenizer.ggml.add_bos_token", False)
        return cls(backend, bos_token_id=None if bos is None else int(bos),
                   eos_token_id=None if eos is None else int(eos), add_bos_token=bool(add_bos),
                   chat_template=fields.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        """Build from a Hugging Face model directory: ``tokenizer.json`` (required) plus, when
        present, ``tokenizer_config.json`` (chat template, BOS/EOS, add_bos_token) and
        ``chat_template.jinja``."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer: model directory not found: {path}")
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"tokenizer: {tokenizer_file} not found (a fast-tokenizer "
                                    f"tokenizer.json is required)")
        backend = _Backend.from_file(str(tokenizer_file))
        config_file = path / "tokenizer_config.json"
        config = (json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file()
                  else {})

        def token_id(value) -> int | None:
            # tokenizer_config stores special tokens as a string or as an AddedToken dict.
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(backend, bos_token_id=token_id(config.get("bos_token")),
                   eos_token_id=token_id(config.get("eos_token")),
                   add_bos_token=bool(config.get("add_bos_token", False)), chat_template=template)

    # ----------------------------------------------------------------------------- encode/decode
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, BOS first if the model wants it."""
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the chat template."""
        if self.chat_template is None:
            raise ValueError("tokenizer: this tokenizer has no chat template; encode plain text "
                             "with encode() instead")
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._token(self.bos_token_id), eos_token=self._token(self.eos_token_id))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat. The template writes its own special tokens (BOS
        included where the model wants one), so none are added here."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                           add_special_tokens=False)


class StreamDecoder:
    """Incremental detokenizer: ``push(token_id)`` returns the text that token completes.

    A character may span several byte-level tokens; its text is held back until the decode no
    longer ends in U+FFFD. Decoding works on a short window of recent ids (a prefix already
    emitted plus the pending ids) and diffs against the prefix, so each push costs O(window) and
    decoders that treat the sequence start specially (leading-space stripping) stay consistent.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0    # ids before this index have been emitted

    def _window_texts(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        return (decode(self._ids[self._prefix:self._read], self._skip),
                decode(self._ids[self._prefix:], self._skip))

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        emitted, full = self._window_texts()
        if len(full) <= len(emitted) or full.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(emitted):]

    def flush(self) -> str:
        """Text still held back (e.g. an incomplete character at the end), U+FFFD included."""
        emitted, full = self._window_texts()
        self._prefix = self._read = len(self._ids)
        return full[len(emitted):]

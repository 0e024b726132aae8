"""Tokenizer: text ↔ token ids for one model, its special tokens (BOS, the set of ids that end generation, PAD)
and its chat template.

Built from a GGUF file's embedded vocabulary (see gguf_vocab.py) or from a Hugging Face model directory
(tokenizer.json + tokenizer_config.json + generation_config.json + special_tokens_map.json + chat_template.jinja).
Wraps the Rust `tokenizers` library; pagoda never imports transformers (it is only the tests' oracle).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from pagoda.tokenizer.chat_template import render_chat_template
from pagoda.tokenizer.gguf_vocab import build_gguf_tokenizer

# Named special tokens a chat template may reference as variables (transformers exposes the same names).
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TooManyTokensError(ValueError):
    """A text has more tokens than the caller's bound; `count` is how many."""

    def __init__(self, count: int):
        super().__init__(f"the text has {count} tokens")
        self.count = count


class Tokenizer:
    """One model's tokenizer; immutable after construction except `chat_template`, which a caller may override."""

    def __init__(
        self,
        hf_tokenizer: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        chat_templates: Mapping[str, str] | None = None,
    ):
        """`eos_token_ids` are extra ids that end generation besides `eos_token_id`; `chat_templates` maps a
        template name to its source, "default" being the one used unless tools pick "tool_use"."""
        self._tok = hf_tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        # Invariant: every id here is inside the vocabulary; the primary EOS is a member whenever it is.
        ids = {i for i in (eos_token_id, *eos_token_ids) if i is not None}
        self.eos_token_ids: frozenset[int] = frozenset(i for i in ids if 0 <= i < self.vocab_size)
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.chat_template: str | None = self.chat_templates.get("default")
        added = self._tok.get_added_tokens_decoder()
        self.all_special_ids: list[int] = sorted(i for i, t in added.items() if t.special)
        self._special_id_set = frozenset(self.all_special_ids)
        self._byte_level = '"ByteLevel"' in json.dumps(json.loads(hf_tokenizer.to_str()).get("decoder"))
        self._token_bytes_cache: dict[int, bytes] = {}

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """From `GGUFFile(path).metadata`. `extra_eos_token_ids` lets a caller that knows better (e.g. a model
        registry entry) add end-of-generation ids the file does not declare."""
        tok = build_gguf_tokenizer(dict(metadata))
        get = metadata.get
        # llama.cpp's end-of-generation set: EOS plus the end-of-turn/-message ids the file declares.
        eos_ids = [get("tokenizer.ggml.eot_token_id"), get("tokenizer.ggml.eom_token_id"), *extra_eos_token_ids]
        templates = {"default": get("tokenizer.chat_template")}
        prefix = "tokenizer.chat_template."
        templates.update({k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)})
        return cls(
            tok,
            bos_token_id=get("tokenizer.ggml.bos_token_id"),
            eos_token_id=get("tokenizer.ggml.eos_token_id"),
            eos_token_ids=[i for i in eos_ids if i is not None],
            pad_token_id=get("tokenizer.ggml.padding_token_id"),
            unk_token_id=get("tokenizer.ggml.unknown_token_id"),
            chat_templates={k: v for k, v in templates.items() if isinstance(v, str)},
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """From a Hugging Face model directory; tokenizer.json is required, the other files are optional."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{path} has no tokenizer.json; pagoda needs the fast-tokenizer file (convert the model's "
                "tokenizer with transformers' save_pretrained, or use a GGUF file)"
            )
        tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        specials = {name: _token_content(config.get(name)) for name in _NAMED_SPECIALS}
        # special_tokens_map.json overrides tokenizer_config.json, as in transformers.
        for name, value in _read_json(path / "special_tokens_map.json").items():
            if name in _NAMED_SPECIALS and _token_content(value) is not None:
                specials[name] = _token_content(value)
        ids = {name: tok.token_to_id(t) if t is not None else None for name, t in specials.items()}

        # tokenizer.json's post-processor decides BOS/EOS; like transformers 5, add_bos_token/add_eos_token in
        # tokenizer_config.json are ignored when tokenizer.json exists (which pagoda requires).
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        eos_id = ids["eos_token"] if ids["eos_token"] is not None else (gen_eos[0] if gen_eos else None)
        return cls(
            tok,
            bos_token_id=ids["bos_token"],
            eos_token_id=eos_id,
            eos_token_ids=[*gen_eos, *extra_eos_token_ids],
            pad_token_id=ids["pad_token"],
            unk_token_id=ids["unk_token"],
            chat_templates=_hf_chat_templates(path, config),
        )

    # ---------------------------------------------------------------- vocabulary

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including added tokens (what the model's embedding must cover)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _token_str(self, token_id: int | None) -> str | None:
        return self._tok.id_to_token(token_id) if token_id is not None else None

    @property
    def bos_token(self) -> str | None:
        return self._token_str(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token_str(self.eos_token_id)

    # ---------------------------------------------------------------- text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special tokens written in the text (e.g. "<|im_start|>") are recognized.
        `add_special_tokens` adds the model's BOS/EOS where its tokenizer asks for them.

        Through `encode_batch_fast`: it releases the GIL while it works (so a server thread tokenizing a long
        prompt does not stall the event loop) and skips character offsets, which `encode` builds and then frees
        with the GIL held (~0.2 s for 400k tokens). Same ids."""
        return self.encode_bounded(text, add_special_tokens)

    def encode_bounded(self, text: str, add_special_tokens: bool = True, *, max_tokens: int | None = None) -> list[int]:
        """`encode`, but a text of more than `max_tokens` tokens raises TooManyTokensError(count) before its ids
        become a Python list: building (and later freeing) that list holds the GIL, ~0.2 s for 4M tokens, so
        an oversized prompt is refused at the cost of its (GIL-free) tokenization alone."""
        [encoding] = self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)
        if max_tokens is not None and len(encoding) > max_tokens:
            raise TooManyTokensError(len(encoding))
        return encoding.ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (a token may hold part of a UTF-8 character), as OpenAI's
        logprobs `bytes` field reports them."""
        cached = self._token_bytes_cache.get(token_id)
        if cached is None:
            cached = self._token_bytes_cache[token_id] = self._compute_token_bytes(token_id)
        return cached

    def _compute_token_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._special_id_set:
            return piece.encode()
        if self._byte_level:  # GPT-2 byte-level BPE: each character stands for one byte
            return bytes(_BYTE_DECODER.get(ch, 0) for ch in piece) if all(c in _BYTE_DECODER for c in piece) \
                else piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def apply_chat_template(
        self,
        messages: list[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for a conversation (encode it with add_special_tokens=False: the template writes BOS).

        Raises ValueError if the model has no chat template, ChatTemplateError (a ValueError) if it fails."""
        template = self.chat_templates.get("tool_use") if tools is not None else None
        template = template or self.chat_template
        if template is None:
            raise ValueError(
                "this model has no chat template, so chat requests cannot be formatted: use a completion request "
                "with a raw prompt, or load the model from files that include a chat template"
            )
        specials = {n: t for n in _NAMED_SPECIALS if (t := self._token_str(getattr(self, f"{n}_id"))) is not None}
        return render_chat_template(
            template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
            special_tokens=specials, **template_kwargs,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"eos_ids={sorted(self.eos_token_ids)}, chat_template={'yes' if self.chat_template else 'no'})"
        )


# ---------------------------------------------------------------- HF directory helpers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE vocabularies use it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = (b for b in range(256) if b not in printable)
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return mapping


_BYTE_DECODER = {ch: b for b, ch in _bytes_to_unicode().items()}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_templates(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named templates; chat_template.jinja (the newer, separate file) takes precedence for "default"."""
    raw = config.get("chat_template")
    if isinstance(raw, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        templates = {t["name"]: t["template"] for t in raw if isinstance(t, Mapping) and "name" in t}
    else:
        templates = {"default": raw} if isinstance(raw, str) else {}
    separate = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(separate, str):
        templates["default"] = separate
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if "default" not in templates and len(templates) == 1:
        templates["default"] = next(iter(templates.values()))
    return templates


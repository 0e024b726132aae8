"""Text side of a model: tokenizer (GGUF or HF files), sandboxed chat templates, streaming detokenization and
stop strings. Imports only the Rust `tokenizers` library and jinja2, never transformers."""

from pagoda.tokenizer.chat_template import ChatTemplateError, render_chat_template
from pagoda.tokenizer.detokenizer import IncrementalDetokenizer, StopStringMatcher
from pagoda.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "StopStringMatcher", "Tokenizer", "render_chat_template"]

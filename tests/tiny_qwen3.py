"""A tiny random-weight Qwen3 whose greedy output follows scripts: for testing reasoning output end to end.

The checkpoint is a real Qwen3 (transformers' Qwen3Config, random decoder layers), saved as a Hugging Face
directory with a byte-level BPE tokenizer.json that has `<think>` / `</think>` as added, non-special tokens (as
Qwen3's are) and a Qwen3-like chat template that honours `enable_thinking`.

Only the embedding and the LM head are set by hand, so that the model is a bigram machine: every script token
has its own orthonormal embedding direction (all other tokens live in the orthogonal complement), and the LM
head row of a token's successor points along it, strongly. The random layers add little to the residual stream,
so the greedy next token after a script token is its successor, whatever the context. After the prompt's last
token ("\n") the LM head favours the THINK script weakly, so a request without logit_bias follows it; a
logit_bias of +100 on another script's first token starts that one instead. Every script ends with <|im_end|>.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Script tokens in the byte-level alphabet ("Ġ" is a space, "Ċ" a newline). Each token occurs in one script only.
THINK = ["<think>", "ĊI", "Ġshould", "Ġplan.Ċ", "</think>", "ĊĊThe", "Ġanswer", "Ġis", "Ġ42."]
SPLIT_TAGS = ["<thi", "nk>", "Ġhm", "</t", "hin", "k>", "Ġok"]  # both tags spelled by pieces, one per step
PLAIN = ["Hello", "Ġthere!"]
TAG_IN_ANSWER = ["Tags", "Ġlike", "Ġ<think>", "Ġstay."]  # a start tag that does not begin the output
SCRIPTS = {"think": THINK, "split_tags": SPLIT_TAGS, "plain": PLAIN, "tag_in_answer": TAG_IN_ANSWER}
ADDED_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_PLAIN = ["<think>", "</think>"]

CHAT_TEMPLATE = """\
{%- for message in messages %}
{%- if message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content %}
{{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
{%- endif %}
{{- message.content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}
"""


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in printable)})
    return [mapping[b] for b in range(256)]


def _text(piece: str) -> str:
    """The text a byte-level piece stands for (all pieces here are ASCII)."""
    chars = _byte_chars()
    return "".join(chr(chars.index(c)) if c in chars else c for c in piece)


@dataclass
class TinyQwen3:
    directory: Path
    ids: dict[str, int]  # piece or added token -> id

    def first(self, script: str) -> int:
        return self.ids[SCRIPTS[script][0]]

    def texts(self, script: str) -> list[str]:
        """The text of each token of a script, as the stream delivers it."""
        return [_text(p) for p in SCRIPTS[script]]

    def text(self, script: str) -> str:
        return "".join(self.texts(script))


def build_tiny_qwen3(directory: Path, seed: int = 0) -> TinyQwen3:
    import torch
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    pieces = _byte_chars() + [p for script in SCRIPTS.values() for p in script if p not in ADDED_PLAIN]
    assert len(set(pieces)) == len(pieces), "a script token must not be a byte token or occur twice"
    vocab = {p: i for i, p in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: prompts encode to single bytes
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_SPECIAL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_PLAIN])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    ids = {p: tokenizer.token_to_id(p) for p in [*pieces, *ADDED_SPECIAL, *ADDED_PLAIN]}
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    torch.manual_seed(seed)
    hidden = 64
    config = transformers.Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    newline = ids[_byte_chars()[ord("\n")]]
    predecessors = [newline] + [ids[p] for script in SCRIPTS.values() for p in script[:-1]] + \
        [ids[script[-1]] for script in SCRIPTS.values()]
    basis, _ = torch.linalg.qr(torch.randn(hidden, hidden))
    direction = {token: basis[:, i] for i, token in enumerate(dict.fromkeys(predecessors))}
    complement = basis[:, len(direction):]
    embed = torch.empty(vocab_size, hidden)
    for token in range(vocab_size):
        if token in direction:
            embed[token] = direction[token]
        else:
            v = complement @ torch.randn(complement.shape[1])
            embed[token] = v / v.norm()
    head = torch.zeros(vocab_size, hidden)
    strong, weak = 50.0, 5.0  # final-norm output has norm 8 (= sqrt(hidden)): logits of about 400 and 40
    for script in SCRIPTS.values():
        for pred, succ in zip(script, script[1:]):
            head[ids[succ]] += strong * direction[ids[pred]]
        head[ids["<|im_end|>"]] += strong * direction[ids[script[-1]]]
    head[ids[THINK[0]]] += weak * direction[newline]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(10.0 * embed)
        model.lm_head.weight.copy_(head)
    model.save_pretrained(directory)

    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<|im_end|>"]}))
    return TinyQwen3(directory, ids)

"""The benchmark workload: which prompts are sent and how many tokens each asks for.

Prompts are either synthetic (random ordinary words that re-tokenize to exactly `input_len` tokens with the
model's own tokenizer, special tokens included, i.e. what a server's completions endpoint counts) or read from a
dataset: JSONL with `{"prompt": ..., "output_len": optional}` per line, or ShareGPT JSON (a list of
`{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}`).

Everything random is drawn from numpy generators seeded by (seed, purpose), one stream per purpose, so the same
seed gives the same workload and changing one option (e.g. the output lengths) does not reshuffle another
(e.g. the prompts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_INPUT_LEN = 128
DEFAULT_OUTPUT_LEN = 128

# One independent random stream per purpose (see the module docstring).
_RANDOM_STREAMS = {"prompts": 0, "output_lens": 1, "arrivals": 2, "dataset_sample": 3}

# Ordinary word tokens: a leading space and lowercase letters. Such a token starts a new pre-token, so a sequence of
# them usually re-tokenizes to itself; the fix-up loop in synthetic_prompt handles the cases where it does not.
_WORD_TOKEN = re.compile(rb" [a-z]{2,}")
_ANY_ALPHA_TOKEN = re.compile(rb" ?[A-Za-z]+")  # the fallback for vocabularies with few words of the first kind
_MIN_WORD_TOKENS = 64
_MAX_FIXUP_ROUNDS = 50


class BenchmarkError(ValueError):
    """A benchmark that cannot run as configured (a bad option, dataset or server); the CLI reports the message."""


@dataclass(frozen=True)
class WorkloadSpec:
    num_prompts: int
    input_len: int | None = None  # synthetic prompts of this many tokens; ignored when `dataset` is given
    dataset: Path | None = None
    output_len: int | None = None  # fixed output length for every request
    output_len_range: tuple[int, int] | None = None  # inclusive (min, max), drawn uniformly per request
    seed: int = 0


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_len: int  # tokens of `prompt` with the tokenizer's special tokens, as a completions endpoint counts them
    output_len: int  # max_tokens for this request


@dataclass(frozen=True)
class DatasetEntry:
    prompt: str
    output_len: int | None  # None when the dataset does not say


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, _RANDOM_STREAMS[purpose]])


def parse_length_range(text: str) -> tuple[int, int]:
    """"MIN:MAX" → (MIN, MAX), both inclusive, 1 <= MIN <= MAX."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise BenchmarkError(f"an output length range is MIN:MAX, e.g. 16:256; got {text!r}") from None
    if not 1 <= low <= high:
        raise BenchmarkError(f"an output length range needs 1 <= MIN <= MAX; got {text!r}")
    return low, high


def load_tokenizer(name_or_path: str):
    """The Tokenizer the engine would use for a registry model name, GGUF file or HF model directory."""
    from pagoda.loader import open_checkpoint
    from pagoda.model_store import resolve_model

    return open_checkpoint(resolve_model(name_or_path, progress=True)).tokenizer


# ---------------------------------------------------------------- synthetic prompts


class SyntheticPrompts:
    """Random prompts of an exact token count, from one tokenizer's ordinary word tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.word_ids = _word_token_ids(tokenizer)
        # Special tokens (e.g. BOS) the tokenizer adds around any text; counted in the prompt length.
        self.num_special = len(tokenizer.encode(" hello")) - len(tokenizer.encode(" hello", add_special_tokens=False))

    def prompt(self, input_len: int, rng: np.random.Generator) -> str:
        """A text that encodes to exactly `input_len` tokens (special tokens included)."""
        target = input_len - self.num_special  # tokens of the text itself
        if target < 1:
            raise BenchmarkError(f"--input-len {input_len} leaves no room for text after {self.num_special} "
                                 "special token(s)")
        ids = [int(i) for i in rng.choice(self.word_ids, size=target)]
        for _ in range(_MAX_FIXUP_ROUNDS):
            text = self._text_of(ids)
            actual = self.tokenizer.encode(text, add_special_tokens=False)
            if len(actual) == target and len(self.tokenizer.encode(text)) == input_len:
                return text
            # Neighbouring words merged or split on re-encoding: cut the surplus or append fresh words, then
            # check again (the text is ASCII, so every re-encoded token is a whole run of its bytes).
            if len(actual) > target:
                ids = actual[:target]
            else:
                ids = actual + [int(i) for i in rng.choice(self.word_ids, size=target - len(actual))]
        raise BenchmarkError(f"could not build a prompt of exactly {input_len} tokens with this tokenizer")

    def _text_of(self, ids: Sequence[int]) -> str:
        return b"".join(self.tokenizer.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def _word_token_ids(tokenizer) -> np.ndarray:
    """Ids of ordinary word tokens that encode back to themselves when alone, in id order."""
    special = set(tokenizer.all_special_ids)
    pieces = {i: tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size) if i not in special}
    for pattern in (_WORD_TOKEN, _ANY_ALPHA_TOKEN):
        candidates = [i for i, piece in pieces.items() if pattern.fullmatch(piece)]
        texts = [pieces[i].decode("ascii") for i in candidates]
        encodings = tokenizer.hf_tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        words = [i for i, enc in zip(candidates, encodings) if enc.ids == [i]]
        if len(words) >= _MIN_WORD_TOKENS:
            return np.array(words, dtype=np.int64)
    raise BenchmarkError("this tokenizer has too few plain word tokens to build synthetic prompts; use --dataset")


# ---------------------------------------------------------------- datasets


def read_dataset(path: Path, tokenizer) -> list[DatasetEntry]:
    """Entries of a JSONL or ShareGPT JSON file, in file order; entries without a usable prompt are skipped."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return _read_sharegpt(json.loads(text), tokenizer)
    return _read_jsonl(text, path)


def _read_jsonl(text: str, path: Path) -> list[DatasetEntry]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}:{number}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise BenchmarkError(f'{path}:{number}: each line must be an object with a string "prompt"')
        output_len = row.get("output_len")
        if output_len is not None and (not isinstance(output_len, int) or output_len < 1):
            raise BenchmarkError(f'{path}:{number}: "output_len" must be a positive integer')
        if row["prompt"]:
            entries.append(DatasetEntry(row["prompt"], output_len))
    return entries


def _read_sharegpt(rows: list, tokenizer) -> list[DatasetEntry]:
    """The first human turn is the prompt; the gpt turn that answers it gives the output length in tokens."""
    entries = []
    for row in rows:
        turns = row.get("conversations") if isinstance(row, dict) else None
        if not isinstance(turns, list):
            continue
        first_human = next((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("from") == "human"), None)
        if first_human is None or first_human + 1 >= len(turns):
            continue
        prompt, answer = turns[first_human].get("value"), turns[first_human + 1]
        if not isinstance(prompt, str) or not prompt or not isinstance(answer, dict) or answer.get("from") != "gpt":
            continue
        answer_len = len(tokenizer.encode(str(answer.get("value") or ""), add_special_tokens=False))
        if answer_len >= 1:
            entries.append(DatasetEntry(prompt, answer_len))
    return entries


# ---------------------------------------------------------------- the workload


def build_workload(spec: WorkloadSpec, tokenizer) -> list[BenchRequest]:
    """`spec.num_prompts` requests. Output length per request: a draw from `output_len_range` if given, else
    `output_len`, else the dataset's own, else DEFAULT_OUTPUT_LEN."""
    if spec.num_prompts < 1:
        raise BenchmarkError("--num-prompts must be at least 1")
    if spec.output_len is not None and spec.output_len < 1:
        raise BenchmarkError("--output-len must be at least 1")
    if spec.dataset is not None:
        entries = _sample_dataset(read_dataset(spec.dataset, tokenizer), spec)
        prompts = [e.prompt for e in entries]
        lengths = [len(tokenizer.encode(p)) for p in prompts]
        dataset_output_lens = [e.output_len for e in entries]
    else:
        if spec.input_len is None:
            raise BenchmarkError("give --input-len for synthetic prompts, or --dataset")
        synthetic, rng = SyntheticPrompts(tokenizer), rng_for(spec.seed, "prompts")
        prompts = [synthetic.prompt(spec.input_len, rng) for _ in range(spec.num_prompts)]
        lengths = [spec.input_len] * spec.num_prompts
        dataset_output_lens = [None] * spec.num_prompts
    output_lens = _output_lens(spec, dataset_output_lens)
    return [BenchRequest(p, n, o) for p, n, o in zip(prompts, lengths, output_lens)]


def _sample_dataset(entries: list[DatasetEntry], spec: WorkloadSpec) -> list[DatasetEntry]:
    """`num_prompts` entries drawn without replacement (seeded), in the order drawn."""
    if len(entries) < spec.num_prompts:
        raise BenchmarkError(f"{spec.dataset} has {len(entries)} usable entries, fewer than --num-prompts "
                             f"{spec.num_prompts}")
    order = rng_for(spec.seed, "dataset_sample").permutation(len(entries))[:spec.num_prompts]
    return [entries[i] for i in order]


def _output_lens(spec: WorkloadSpec, dataset_output_lens: list[int | None]) -> list[int]:
    if spec.output_len_range is not None:
        low, high = spec.output_len_range
        draws = rng_for(spec.seed, "output_lens").integers(low, high, size=len(dataset_output_lens), endpoint=True)
        return [int(n) for n in draws]
    if spec.output_len is not None:
        return [spec.output_len] * len(dataset_output_lens)
    return [n if n is not None else DEFAULT_OUTPUT_LEN for n in dataset_output_lens]

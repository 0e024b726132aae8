"""SamplingParams: how one request chooses its tokens and when it stops. Validated on creation; no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

# OpenAI's documented limits, which we keep so clients meet the same errors everywhere.
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20


class SamplingParamsError(ValueError):
    """An invalid sampling parameter. `param` names the field, as the OpenAI error shape expects."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (HF semantics)
    presence_penalty: float = 0.0  # OpenAI semantics: over generated tokens only
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's logprob plus the top k
    # None: off; k >= 0: each prompt token's logprob (given the tokens before it) plus the top k alternatives,
    # computed during prefill. With it, max_tokens may be 0: the request ends after its prompt.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise SamplingParamsError(message, param)

        check(isinstance(self.n, int) and 1 <= self.n <= 128, "n", f"n must be an integer in [1, 128], got {self.n}")
        check(0.0 <= self.temperature <= 2.0, "temperature", f"temperature must be in [0, 2], got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
              f"top_k must be -1, 0 or positive, got {self.top_k}")
        check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        check(0.0 < self.repetition_penalty <= 2.0 or self.repetition_penalty == 1.0, "repetition_penalty",
              f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.logit_bias:
            for bias in self.logit_bias.values():
                check(-100.0 <= bias <= 100.0, "logit_bias", f"logit_bias values must be in [-100, 100], got {bias}")
        prompt_only = self.max_tokens == 0 and self.prompt_logprobs is not None  # prompt logprobs, no sampling
        check(self.max_tokens is None or self.max_tokens >= 1 or prompt_only, "max_tokens",
              f"max_tokens must be at least 1, got {self.max_tokens} (0 is allowed only for prompt logprobs: "
              "with prompt_logprobs, or with echo on /v1/completions)")
        check(self.min_tokens >= 0, "min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        check(len(self.stop) <= MAX_STOP_SEQUENCES, "stop", f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop sequences must be non-empty strings")
        check(self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS, "logprobs",
              f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                                and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS),
              "prompt_logprobs", f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}")
        check(self.seed is None or isinstance(self.seed, int), "seed", "seed must be an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    def validate_token_ids(self, vocab_size: int) -> None:
        """Token ids named by the request must exist in the model's vocabulary."""
        for token in list(self.stop_token_ids) + list((self.logit_bias or {}).keys()):
            if not 0 <= int(token) < vocab_size:
                param = "stop_token_ids" if token in self.stop_token_ids else "logit_bias"
                raise SamplingParamsError(f"token id {token} is outside the vocabulary [0, {vocab_size})", param)

    def child(self, index: int) -> SamplingParams:
        """Params of the index-th of n samples: one sample each, distinct but reproducible seeds.

        The prompt is the same for every sample, so only the first computes its logprobs (the others may then
        use the prefix cache) — unless max_tokens is 0, where prompt logprobs are all a sample does."""
        from dataclasses import replace

        prompt_logprobs = self.prompt_logprobs if index == 0 or self.max_tokens == 0 else None
        return replace(self, n=1, seed=None if self.seed is None else self.seed + index,
                       prompt_logprobs=prompt_logprobs)

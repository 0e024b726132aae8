"""Shared fixtures. Model files come from the model store (`pagoda pull`, run by `make test`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"


def _store_home() -> Path:
    return Path(os.environ.get("PAGODA_HOME", Path.home() / ".cache" / "pagoda"))


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """Path of the default model's GGUF file (SmolLM2-135M-Instruct, Q4_1)."""
    found = sorted((_store_home() / "models" / DEFAULT_MODEL).glob("*.gguf"))
    if not found:
        pytest.fail(f"default model missing: run `pagoda pull {DEFAULT_MODEL}` (make test does)")
    return found[0]

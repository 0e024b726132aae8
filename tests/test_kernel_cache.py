"""The kernel cache never loads a library built for another CPU target or ABI, and the structs shared with
Python match their ctypes mirrors."""

from __future__ import annotations

import ctypes
import logging
import os

import pytest

from pagoda import kernels
from pagoda.models import native_stack


@pytest.fixture()
def kernel_home(tmp_path, monkeypatch):
    """An empty kernel cache, and a fresh table of loaded libraries (restored afterwards)."""
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", {})
    return tmp_path / "kernels"


def _replace(path, data: bytes) -> None:
    """Put `data` at `path` as a new file: a library already loaded from `path` is mapped from the old inode, and
    writing into that one in place would change the code under the running process."""
    staged = path.with_name(path.name + ".staged")
    staged.write_bytes(data)
    os.replace(staged, path)


def _built(home, name):
    (path,) = home.glob(f"{name}-*.so")
    return path


@pytest.mark.parametrize("name", sorted(path.stem for path in kernels.SOURCE_DIR.glob("*.cpp")))
def test_every_library_carries_its_target_and_abi(kernel_home, name):
    kernels.load(name)
    cxx = kernels._compiler()
    assert kernels.library_marker(_built(kernel_home, name)) == (kernels.native_target(cxx), kernels.ABI_VERSION)


def test_a_library_built_for_another_target_is_rebuilt_not_loaded(kernel_home, monkeypatch, caplog):
    cxx = kernels._compiler()
    here = kernels.native_target(cxx)
    # Build as if on another CPU: the library is marked with that target and cached under that target's key.
    monkeypatch.setitem(kernels._target_cache, cxx, "0123456789abcdef")
    kernels.load("shm_allreduce")
    foreign = _built(kernel_home, "shm_allreduce")
    assert kernels.library_marker(foreign) == ("0123456789abcdef", kernels.ABI_VERSION)
    # Back on this CPU, with the foreign file where this CPU's key points (a shared store where two machines'
    # keys collide, or a file copied by hand): it must be rebuilt before anything loads it.
    monkeypatch.setitem(kernels._target_cache, cxx, here)
    monkeypatch.setattr(kernels, "_loaded", {})
    foreign_bytes = foreign.read_bytes()
    foreign.unlink()
    kernels.load("shm_allreduce")
    ours = _built(kernel_home, "shm_allreduce")
    assert ours != foreign
    _replace(ours, foreign_bytes)
    assert kernels.library_marker(ours)[0] == "0123456789abcdef"
    monkeypatch.setattr(kernels, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="pagoda"):
        kernels.load("shm_allreduce")
    assert "built for another target" in caplog.text
    assert kernels.library_marker(ours) == (here, kernels.ABI_VERSION)


def test_a_library_of_another_abi_or_without_a_marker_is_rebuilt(kernel_home, monkeypatch):
    kernels.load("shm_allreduce")
    path = _built(kernel_home, "shm_allreduce")
    good = path.read_bytes()
    for data in (good.replace(f";abi={kernels.ABI_VERSION}]".encode(), b";abi=0]"), b"not a library at all"):
        _replace(path, data)
        monkeypatch.setattr(kernels, "_loaded", {})
        kernels.load("shm_allreduce")
        assert kernels.library_marker(path) == (kernels.native_target(kernels._compiler()), kernels.ABI_VERSION)


def test_the_native_stack_checks_its_struct_mirrors(kernel_home, monkeypatch):
    native_stack._load_kernel()  # the real mirrors match

    class _WrongBatch(ctypes.Structure):
        _fields_ = [*native_stack._Batch._fields_, ("extra", ctypes.c_int64)]

    structs = list(native_stack._MIRRORED_STRUCTS)
    structs[3] = _WrongBatch
    monkeypatch.setattr(native_stack, "_MIRRORED_STRUCTS", tuple(structs))
    with pytest.raises(kernels.KernelBuildError, match="do not match"):
        native_stack._load_kernel()

"""Checkpoint integrity: what a checkpoint file can prove about itself, verified on load (checkpoint.read_state_dict,
load_model) once per version of the file, and remembered for the files we write ourselves.

    check_integrity(path, state)     # the zip's CRC-32s and finite weights; ValueError naming the file if not
    save_checkpoint(state, path)     # finite weights written (writing.atomic_save), remembered as verified

torch.save's zip stores a CRC-32 of each tensor that torch.load never checks; safetensors has no checksum (the
library checks its header and sizes). A file verified before (the same inode, size, mtime and ctime) is not again:
the table is $XDG_CACHE_HOME/llama-fast/verified.json.
"""
import ctypes
import json
import mmap
import os
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from zlib_ng import zlib_ng

from llama_fast.writing import atomic_save, write_json, written_in_place


def check_integrity(path: Path, state: dict):
    """The CRCs of a torch.save zip, and no NaN or infinite weight, once per version of the file: a file verified
    before (same inode, size, mtime and ctime: any write changes ctime) is not again. The two passes run side by
    side, the CRCs on a thread of their own (zlib-ng's CRC-32 lets go of Python's lock), and load_model runs them
    while it builds the model (scripts/bench_load.py measures what is left: README, Errors)."""
    if read_json(verified_path(), {}).get(str(path.resolve())) == file_stamp(path):
        return
    with ThreadPoolExecutor(1) as pool:
        crcs = pool.submit(check_zip_crcs, path, state) if zipfile.is_zipfile(path) else None
        try:
            check_finite(state, path)
        finally:
            if crcs is not None:
                crcs.result()  # its error first if both fail: a damaged file is what explains the NaN
    remember_verified(path)


def save_checkpoint(state: dict, path: Path, save=torch.save):
    """Write a checkpoint (atomic_save), its weights checked finite first, and remember it as verified: its CRCs
    are the writer's, computed from these very tensors, and reading it back now would read the same page cache. So
    the first load of a file we wrote pays no verification; any later change to it makes a new version, verified
    on its next load, as is a copy."""
    check_finite(state, path)
    atomic_save(state, path, save)
    if not written_in_place(path):
        remember_verified(path)


def remember_verified(path: Path):
    key, table = str(path.resolve()), read_json(verified_path(), {})
    table.pop(key, None)
    table[key] = file_stamp(path)
    try:  # a read-only home only costs the verification next time
        verified_path().parent.mkdir(parents=True, exist_ok=True)
        write_json(verified_path(), dict(list(table.items())[-VERIFIED_KEPT:]))
    except OSError:
        pass


VERIFIED_KEPT = 256  # files remembered as verified (the oldest forgotten first)


def verified_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-fast" / "verified.json"


def file_stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def check_zip_crcs(path: Path, state: dict | None = None):
    """torch.save's zip stores each tensor's bytes with a CRC-32 that torch.load never checks: a damaged copy would
    load as garbage. zlib-ng's CRC-32 (carry-less multiplication) ran at 32 GB/s where zlib's ran at 7 (2-core AMD
    EPYC). A member is read where torch.load mapped it (state's storages), so that its pages are brought in once
    for the CRC and the model both; else through a mapping of our own."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as data:
        members = []
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:  # not torch.save's: zipfile decompresses and checks it
                archive.read(info)
                continue
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
            members.append((info, info.header_offset + 30 + name_len + extra_len))  # after its local header
        loaded = loaded_members(members, state or {})
        for info, start in members:
            if zlib_ng.crc32(loaded.get(info.filename, data[start:start + info.file_size])) != info.CRC:
                raise ValueError(f"checkpoint {path} is damaged: {info.filename} does not match its CRC-32 (changed "
                                 "after it was written: a bad copy or disk?)")


def loaded_members(members: list, state: dict) -> dict:
    """{member name: its bytes in torch.load's mapping}: the state's storages paired with the tensor members (both
    in file order) when every pair is one distance apart, as they are in a single mapping of the file; else {}."""
    storages = sorted({(s.data_ptr(), s.nbytes()) for s in (t.untyped_storage() for _, t in named_tensors(state))
                       if s.nbytes() and s.device.type == "cpu"})
    tensors = [(start, info) for info, start in members if "/data/" in info.filename and info.file_size]
    if len(storages) != len(tensors) or not storages:
        return {}
    pairs = list(zip(storages, sorted(tensors, key=lambda m: m[0])))
    if any(size != info.file_size for (_, size), (_, info) in pairs) or \
            len({address - start for (address, _), (start, _) in pairs}) != 1:
        return {}
    return {info.filename: (ctypes.c_ubyte * size).from_address(address) for (address, size), (_, info) in pairs}


def named_tensors(state: dict, prefix: str = ""):
    """(name, tensor) of every tensor in a state dict, nested ones too (quantize.py's "state_dict"), dotted."""
    for name, value in state.items():
        if isinstance(value, dict):
            yield from named_tensors(value, f"{prefix}{name}.")
        elif isinstance(value, torch.Tensor):
            yield f"{prefix}{name}", value


def check_finite(state: dict, path: Path):
    """No weight is NaN or infinite (a damaged file, a training run that diverged): a tensor's smallest and largest
    values (one pass in its own dtype, no copy; NaN propagates) are finite exactly when all its values are."""
    for name, t in named_tensors(state):
        if t.is_floating_point() and t.numel() and not torch.isfinite(torch.stack(torch.aminmax(t))).all():
            raise ValueError(f"checkpoint {path}: tensor {name} holds NaN or infinite values (a damaged file, "
                             "or weights that diverged in training)")

"""Writing files so that a crash never leaves a half-written one: a temporary file beside, then a rename; a device,
a FIFO or /dev/stdout written through, never renamed over; a full disk or a failed write said in one line that names
the file the user asked for.

    atomic_save(state_dict, path)                       # torch.save, or any save(obj, path)
    write_json(path, obj)
    save_trace(profiler, path)                          # the profiler's own writer, checked
"""
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


def atomic_save(obj, path: Path, save=torch.save):
    """Write to a temporary file beside `path`, then rename: a crash never leaves a half-written file there, and a
    failed write leaves no temporary file. A symlink stays one (its target is replaced); a device, a FIFO or
    /dev/stdout is written in place (renaming over it would replace the device node with a file). A full disk is
    reported as such (torch.save says "unexpected pos"); any other failure names `path` and its cause."""
    path = Path(path)
    if written_in_place(path):
        return save(obj, path)
    target = path.resolve()  # through a symlink: the file it points to is replaced, the link kept
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        save(obj, tmp)
        if not tmp.is_file() or tmp.stat().st_size == 0:  # a silent writer (the profiler's) that wrote nothing
            raise OSError(errno.EIO, "the writer produced no data", str(path))
        os.replace(tmp, target)
    except Exception as e:
        if disk_full(e, tmp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        if isinstance(e, OSError) and e.errno:  # named by the file the user asked for, not the temporary one
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def written_in_place(path: Path) -> bool:
    """A path that is not a regular file to replace: a device, a FIFO, a socket, or anything under /dev or /proc
    (/dev/stdout, /proc/self/fd/1), whatever it points to."""
    if Path(os.path.abspath(path)).parts[1:2] in (("dev",), ("proc",)):
        return True
    return path.exists() and not path.is_file() and not path.is_dir()


def disk_full(e: Exception, written: Path) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
        return True
    if isinstance(e, OSError) and e.errno == errno.EIO:  # a writer that failed silently: was it the disk?
        return shutil.disk_usage(written.parent).free < 1 << 20
    # torch.save's own writer reports only a position mismatch: look at the disk while the partial file is there
    return isinstance(e, RuntimeError) and written.exists() and shutil.disk_usage(written.parent).free < 1 << 20


def write_json(path: Path, obj):
    atomic_save(obj, path, save=lambda o, p: Path(p).write_text(json.dumps(o, indent=2) + "\n"))


def save_trace(prof, path):
    """The profiler's trace. Kineto writes PATH.tmp, then renames it to PATH (over a device too) and leaves it
    behind when the write fails; it reports no error (a full disk leaves a short file), so the end is checked."""
    if written_in_place(Path(path)):  # /dev/null, /dev/stdout: written through, never renamed over
        with tempfile.TemporaryDirectory() as tmp:
            save_trace(prof, Path(tmp) / "trace.json")
            with open(Path(tmp) / "trace.json", "rb") as trace, open(path, "wb") as out:
                shutil.copyfileobj(trace, out)
        return
    try:
        prof.export_chrome_trace(str(path))
    finally:
        Path(f"{path}.tmp").unlink(missing_ok=True)
    if Path(path).is_file():
        with open(path, "rb") as f:
            f.seek(max(0, Path(path).stat().st_size - 64))
            if not f.read().rstrip().endswith(b"}"):
                raise OSError(errno.EIO, "the profiler's trace was cut short", str(path))

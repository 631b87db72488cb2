"""Placing output files safely: what may be replaced, where data goes first, how it is published.

Every file tdxtrace writes (``record``'s trace, ``report``'s HTML, ``capsule``'s JSON, the
``schema --export`` files) goes through here, so the rules are the same everywhere:

* An output path that exists but is not a regular file (a symbolic link, a folder, a device,
  a FIFO, a socket) is refused, even with ``--force``. Renaming over it would not write *to*
  it: it would swap ``/dev/null`` (as root) or the link itself for a regular file.
* An output that is the same file as one of the command's inputs is refused, even with
  ``--force``: writing it would destroy what the command is reading.
* Data goes to a temporary file ``.NAME.<random>.partial`` created exclusively in the output's
  folder (same filesystem, so publishing is a rename), unique per run: concurrent runs never
  share one, and a user's own ``NAME.partial`` is never touched. ``NAME`` there is shortened
  when the whole would exceed the file system's limit on a name (255 bytes), and its bytes that
  are not UTF-8 are spelled ``\xff``, so any tool can show the temporary name.
* Without ``--force`` the name is claimed atomically with a hard link, which fails if the name
  appeared since the first check; with ``--force`` the file is renamed over the old one.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tdxtrace.errors import OutputError
from tdxtrace.signals import signals_held

EXISTS = "already exists (use --force to overwrite it)"
CANNOT_WRITE = "cannot write: {reason}"  # callers may word it their own way, with {reason}
TEMP_SUFFIX = ".partial"


def _new_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the umask. mkstemp makes files
    private (0o600) whatever the umask; an output should honour the user's choice."""
    mask = os.umask(0)  # the only way to read it; set back at once (no threads create files)
    os.umask(mask)
    return 0o666 & ~mask

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
}


def os_reason(err: OSError) -> str:
    """The system's words for an OSError (Arrow's I/O errors wrap them in longer text)."""
    if err.errno:
        return os.strerror(err.errno)
    found = re.search(r"\[errno (\d+)\]", str(err))
    if found:
        return os.strerror(int(found.group(1)))
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def check_output(path: Path, *, force: bool, inputs: Sequence[Path | None] = ()) -> None:
    """Refuse ``path`` if it is not a regular file, is one of ``inputs``, or exists unforced.

    A path that cannot be examined (missing, under a missing or non-folder parent, no search
    permission) counts as absent: the caller's folder checks or the write itself say why.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{path}: is a symbolic link; refusing to replace it (remove the "
                          "link, or name the file it points to)")
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise OutputError(f"{path}: is {kind}, not a regular file; refusing to replace it")
    for source in inputs:
        if source is not None and _same_file(source, st):
            which = ("the input" if str(source) == str(path)
                     else f"the same file as the input {source}")
            raise OutputError(f"{path}: is {which}; refusing to overwrite it (even with --force)")
    if not force:
        raise OutputError(f"{path}: {EXISTS}")


def _same_file(source: Path, target: os.stat_result) -> bool:
    try:
        st = os.stat(source)  # follows links: an input given as a link to the output counts
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)


# mkstemp's random part: 8 characters today; room for more, so a longer one never overflows.
_RANDOM_ROOM = 16
NAME_MAX = 255  # bytes in one file name, on every file system tdxtrace is used on


def temp_stem(name: str) -> str:
    """The ``NAME`` of ``.NAME.<random>.partial``: ``name`` spelled in UTF-8 (a byte that is not
    shows as ``\\xff``) and cut so that the whole temporary name fits in :data:`NAME_MAX`."""
    raw = os.fsencode(name)
    spelled = raw.decode("utf-8", "backslashreplace").encode("utf-8")
    room = NAME_MAX - len(b"..") - len(TEMP_SUFFIX) - _RANDOM_ROOM
    # Cut on bytes; "ignore" drops a character the cut split in half.
    return spelled[:room].decode("utf-8", "ignore")


def create_temp(path: Path, *, failure: str = CANNOT_WRITE) -> tuple[int, Path]:
    """Create a new, empty, uniquely named temporary file beside ``path``; its fd and name."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{temp_stem(path.name)}.", suffix=TEMP_SUFFIX,
                                    dir=path.parent)
    except OSError as err:
        raise OutputError(f"{path}: {failure.format(reason=os_reason(err))}") from None
    try:
        os.chmod(name, _new_file_mode())
    except OSError as err:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
        raise OutputError(f"{path}: {failure.format(reason=os_reason(err))}") from None
    return fd, Path(name)


def publish(temp: Path, path: Path, *, force: bool, inputs: Sequence[Path | None] = (),
            failure: str = CANNOT_WRITE) -> None:
    """Give the finished ``temp`` (already fsynced) the name ``path``; ``temp`` is gone after.

    Checks ``path`` again first: minutes may have passed since the caller's first check.
    Without ``force``, an existing ``path`` is an :class:`OutputError` and is left untouched.
    """
    try:
        check_output(path, force=force, inputs=inputs)
        if force:
            os.replace(temp, path)
        else:
            _link_no_clobber(temp, path)
    except FileExistsError:
        temp.unlink(missing_ok=True)
        raise OutputError(f"{path}: {EXISTS}") from None
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise OutputError(f"{path}: {failure.format(reason=os_reason(err))}") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def _link_no_clobber(temp: Path, path: Path) -> None:
    """Publish ``temp`` as ``path`` only if ``path`` does not exist, atomically."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError:
        # No hard links here (FAT and exFAT say EPERM; some FUSE and SMB mounts ENOTSUP or
        # ENOSYS). Claim the name with an exclusive create, then rename over the placeholder:
        # a reader may see an empty file for a moment, but no other file is ever overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        placeholder = os.fstat(fd)
        os.close(fd)
        try:
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == placeholder.st_ino:  # still ours: take it back
                    path.unlink()
            raise
        return
    with contextlib.suppress(OSError):  # published already; a stray second name is harmless
        temp.unlink()


def write_output(path: Path, data: bytes, *, force: bool, inputs: Sequence[Path | None] = (),
                 failure: str = CANNOT_WRITE) -> Path:
    """Write ``data`` to ``path`` whole or not at all; ``path``'s folder must exist."""
    check_output(path, force=force, inputs=inputs)
    fd, temp = create_temp(path, failure=failure)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise OutputError(f"{path}: {failure.format(reason=os_reason(err))}") from None
    except BaseException:  # Ctrl-C included: no temporary file is left behind
        temp.unlink(missing_ok=True)
        raise
    # Held so that Ctrl-C cannot land between the link and the unlink and leave both names.
    with signals_held():
        publish(temp, path, force=force, inputs=inputs, failure=failure)
    return path


def make_folder(path: Path, *, failure: str = CANNOT_WRITE) -> None:
    """Create the folder ``path`` goes in, and its parents, if missing (every command output).

    One :class:`OutputError` naming ``path`` if that cannot be: a parent that is a file or a
    device, a read-only or special file system, no permission.
    """
    try:
        for parent in path.parents:
            if parent.exists():  # raises PermissionError for a folder it may not look into
                if not parent.is_dir():
                    reason = f"folder {parent} is not a folder"
                    raise OutputError(f"{path}: {failure.format(reason=reason)}")
                break
        os.makedirs(path.parent, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{path}: {failure.format(reason=os_reason(err))}") from None


def fsync_folder(folder: Path) -> None:
    """Make a rename durable; best effort (not every platform can fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

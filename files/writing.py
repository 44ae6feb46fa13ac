"""Files the command line writes: an existing file (an input of the same command above all) is replaced only
with ``force``, and every write goes to a temporary file in the target's folder that is renamed into place,
so an interrupted or failed write leaves the old file (or nothing) and never half a file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence


class OutputFileError(ValueError):
    """An output path the command will not write; the message names it and says what to pass."""


def check_output(path: str | os.PathLike[str], *, force: bool = False,
                 inputs: Sequence[str | os.PathLike[str]] = (), flag: str = "--out") -> str:
    """``path`` if the command may write it: not one of ``inputs`` (ever), not an existing file (unless
    ``force``), not a folder, and its folder exists. Raises :class:`OutputFileError`."""
    shown = os.fspath(path)
    real = os.path.realpath(shown)
    for source in inputs:
        if os.path.exists(source) and os.path.realpath(source) == real:
            raise OutputFileError(f"{flag} {shown} is also this command's input; write the result elsewhere")
    if os.path.isdir(real):
        raise OutputFileError(f"{flag} {shown} is a folder; give a file name")
    if os.path.lexists(shown) and not force:
        raise OutputFileError(f"{flag} {shown} already exists; pass --force to replace it")
    folder = os.path.dirname(os.path.abspath(shown))
    if not os.path.isdir(folder):
        raise OutputFileError(f"{flag} {shown}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputFileError(f"{flag} {shown}: folder {folder} is not writable")
    return shown


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path next to ``path``; when the block ends without error it is renamed onto
    ``path`` (atomic on one file system), otherwise removed."""
    target = os.path.abspath(os.fspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".partial",
                                         dir=os.path.dirname(target))
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode a new file gets
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(path: str | os.PathLike[str], write: Callable[[str], None], *, force: bool = False,
               inputs: Sequence[str | os.PathLike[str]] = (), flag: str = "--out") -> str:
    """Check ``path`` (:func:`check_output`), then ``write(temporary_path)`` and rename it into place."""
    shown = check_output(path, force=force, inputs=inputs, flag=flag)
    with replaced_atomically(shown) as temporary:
        write(temporary)
    return shown

"""The errors tdxtrace reports to a user as one line (never a traceback), and that line's text."""

from __future__ import annotations

import codecs
import re


class TdxtraceError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The message must name the file, key or field at fault. The CLI prints it as
    ``tdxtrace: error: <message>`` on stderr and exits with :attr:`exit_code`.
    """

    exit_code = 2


class TraceFormatError(TdxtraceError):
    """A file is not a readable tdxtrace trace (not Arrow, wrong schema, unknown version)."""


class ScenarioError(TdxtraceError):
    """A scenario file or ``--set`` override is invalid."""


class OutputError(TdxtraceError):
    """An output cannot be written (exists, unwritable folder, disk full)."""


# What could break a line or make a terminal misbehave: C0 and C1 controls, DEL, the Unicode
# line and paragraph separators (str.splitlines splits there too), and lone surrogates (what
# Python makes of bytes in a file name that are not UTF-8; they cannot be encoded at all).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A message that quotes a value with repr() (an unknown scenario, analyzer or --set value)
# already spells such a byte \udcff: shown as \xff too, like everywhere else. A backslash
# that repr() doubled (an even run before "udc") is text, not an escape, and stays.
_REPR_BYTE = re.compile(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")


def _escape(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def one_line(text: str) -> str:
    """``text`` as one printable line: controls escaped (``\\n``, ``\\x1b``), and a file name's
    bytes that are not UTF-8 shown as ``\\xff``, as they are on disk.

    Messages quote file names and metadata, and either may hold a newline: without this, one
    error would print as two lines, the second looking like tdxtrace's own output.
    """
    return _REPR_BYTE.sub(r"\1\\x\2", _UNPRINTABLE.sub(lambda m: _escape(m.group()), text))


def shown(path: object) -> str:
    """A path (or any text) as it may be printed: see :func:`one_line`."""
    return one_line(str(path))


def _escape_unencodable(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeEncodeError):
        raise err
    # ASCII whatever the character, so the stream can always encode the replacement.
    return "".join(_escape(c) for c in err.object[err.start:err.end]), err.end


# For output streams (see tdxtrace.cli): a character the stream cannot encode, such as a file
# name's undecodable byte, is written escaped instead of stopping the command with a traceback.
ESCAPE_ERRORS = "tdxtrace-escape"
codecs.register_error(ESCAPE_ERRORS, _escape_unencodable)

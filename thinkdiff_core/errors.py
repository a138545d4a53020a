"""Errors a user can cause. Each message says what was found, what was expected and what to do."""

from __future__ import annotations


class ThinkDiffError(Exception):
    """Base class: every error this package raises on purpose."""


class CheckpointError(ThinkDiffError):
    """A file is missing, unreadable, corrupt or not an aligner."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle file would need to run code to load; it was refused without running it."""


class AlignerMismatchError(ThinkDiffError):
    """An aligner does not fit the features it was given (width or variant)."""


class ModelFolderError(ThinkDiffError):
    """A model folder is missing, or lacks its config or weights."""


class MissingDependencyError(ThinkDiffError):
    """An optional library, or a class inside it, is not installed in a usable version."""


class PromptError(ThinkDiffError):
    """The text and images of a prompt do not fit together."""


class FeatureError(ThinkDiffError):
    """Features are malformed (wrong rank, NaN or inf)."""


class OutputPathError(ThinkDiffError):
    """An output path cannot be written (not writable, unknown extension, or the input itself)."""


class NonFiniteError(FeatureError):
    """NaN or inf met in training (features, loss or gradients): the run stops and exports nothing."""


class ChangedSettingsError(ThinkDiffError):
    """A run or an extraction is continued with settings that change its result."""


def first_line(error: BaseException) -> str:
    """'Type: the first line of the message' (at most 200 characters): how a library's error is quoted inside a
    one-line ThinkDiffError."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def library_error_message(error: BaseException, doing: str = "") -> str:
    """One line naming the cause and a fix for an error a library raised (OSError and its disk-full and permission
    cases, a damaged JSON/YAML/safetensors file, a library's ValueError): what the command lines print instead of a
    traceback. `doing` says what was under way ("writing checkpoint-10", ...)."""
    import errno
    import json

    where = f" while {doing}" if doing else ""
    if isinstance(error, OSError):
        name = f" '{error.filename}'" if getattr(error, "filename", None) else ""
        if error.errno == errno.ENOSPC or error.errno == errno.EDQUOT:
            return f"no space left on the disk{where}{name}: free disk space or write to another folder, then rerun."
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return (
                f"permission denied{where}{name} ({error.strerror}): fix the folder's permissions or choose a "
                f"writable folder, then rerun."
            )
        if error.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
            return f"{error.strerror}{where}{name}: a part of the path is a file where a folder is needed (or the reverse); choose another path."
        if error.errno == errno.ENOENT:
            return f"file or folder not found{where}{name}: check the path."
        return f"{type(error).__name__}{where}{name}: {error.strerror or error}. Check the path and the disk."
    if isinstance(error, json.JSONDecodeError):
        return f"a JSON file is damaged{where} ({error}): restore or delete it (it is rewritten where possible)."
    module = type(error).__module__.split(".")[0]
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    if module == "yaml":
        return f"the YAML config could not be read{where} ({text}): fix its syntax."
    if type(error).__name__ == "SafetensorError":
        return f"a .safetensors file is truncated or corrupt{where} ({text}): write or download it again."
    return f"{type(error).__name__}{where}: {text}. Check the inputs this names; report a bug if they are right."


def report_cli_error(error: BaseException) -> int:
    """What every command line does with an error: one line on stderr, exit status 2. A ThinkDiffError carries its
    own message; any other (a library's) is described by library_error_message. THINKDIFF_DEBUG=1 re-raises, for a
    traceback."""
    import os
    import sys

    if os.environ.get("THINKDIFF_DEBUG") and not isinstance(error, ThinkDiffError):
        raise error
    message = str(error) if isinstance(error, ThinkDiffError) else library_error_message(error)
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: the cause is the last line
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2

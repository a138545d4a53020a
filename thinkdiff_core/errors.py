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

"""The library's exceptions, in one place and without heavy imports (pages import them before any model).

Each one is a `ValueError` whose message says what is wrong and what to do; pages show it as one line, the
CLIs print it as `error: <message>`.
"""

from __future__ import annotations


class RisError(ValueError):
    """Base of the errors below: bad input the user can fix, never a bug."""


class DataError(RisError):
    """The data folder or its styles.csv cannot be used."""


class RunError(RisError):
    """A run folder is missing something or is inconsistent."""


class CheckpointError(RisError):
    """A model folder is missing, incomplete, too large or from another architecture."""


class ImageError(RisError):
    """The bytes are not an image we can use."""


class HubUnavailable(RuntimeError):
    """Pretrained weights had to come from the Hugging Face Hub and it could not be reached."""

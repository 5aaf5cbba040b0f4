"""One exception type for problems the user can fix.

The CLI prints these as a single line (no traceback) and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class MergeQuantError(Exception):
    """A user-facing error: bad recipe, bad checkpoint, bad option. The message names the file/key/tensor."""


class RecipeError(MergeQuantError):
    """The recipe YAML is invalid. Raised before any tensor is read."""


class CheckpointError(MergeQuantError):
    """A model directory or weight file is missing, corrupt or inconsistent."""

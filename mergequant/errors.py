"""One exception type for problems the user can fix.

The CLI prints these as a single line (no traceback) and exits with status 2; anything
else is a bug and keeps its traceback.
"""

import difflib


class MergeQuantError(Exception):
    """A user-facing error: bad recipe, bad checkpoint, bad option. The message names the file/key/tensor."""


class RecipeError(MergeQuantError):
    """The recipe YAML is invalid. Raised before any tensor is read."""


class CheckpointError(MergeQuantError):
    """A model directory or weight file is missing, corrupt or inconsistent."""


def suggestion(key: str, allowed) -> str:
    """" (did you mean 'x'?)" for the allowed name closest to ``key``, else " (allowed: a, b, ...)"."""
    hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else f" (allowed: {', '.join(sorted(allowed))})"

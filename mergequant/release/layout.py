"""What a release workdir holds, by name, and the one error type of `mergequant run`.

These names are read by every other module of the package: the release-file parser reserves them (no
output may be called ``manifest.json``), the manifest checks recorded outputs against :data:`NAME_RE`,
the steps write them and the safety rules protect them. Keeping them here means a renamed file is
one edit, and no module has to import the runner (or the parser) for a constant.
"""

from __future__ import annotations

import re

from mergequant.errors import MergeQuantError

MANIFEST = "manifest.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"  # written by the eval step when matplotlib is installed; attached to every push
LOCK = ".lock"
# an output name: a plain directory name directly under the workdir
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ReleaseError(MergeQuantError):
    """The release file is invalid, or the workdir cannot be used."""

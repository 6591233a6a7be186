"""Is this checkout installed, with every dependency satisfied? (used by shell/demo.sh)

    python shell/install_check.py [EXTRA ...]    # exit 0: nothing to install; 1: pip needed

Reads the requirements from setup.py itself (install_requires plus the named extras), so a
dependency added there is noticed at once, and checks each against the installed version with
`packaging`; also checks that `mindspeed_vita` resolves to THIS checkout (an editable install of
another clone would run other code) and that the `mindspeed-vita` command is on PATH. Prints one
line per thing missing. Standard library plus `packaging` (pip's own dependency) only.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import sys
from importlib import metadata
from typing import Dict, Iterable, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def declared_requirements(setup_py: str, extras: Iterable[str]) -> List[str]:
    """install_requires plus extras_require[extra] for each extra, read from `setup_py`."""
    with open(setup_py, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    found: Dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require"):
            found[node.arg] = ast.literal_eval(node.value)
    requirements = list(found.get("install_requires", []))
    optional = found.get("extras_require", {})
    for extra in extras:
        requirements += list(optional.get(extra, []))  # type: ignore[union-attr]
    return requirements


def unmet(requirements: Iterable[str]) -> List[str]:
    """The requirements that are not installed, or installed at a version outside the range."""
    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(f"{requirement.name}: not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(
                f"{requirement.name}: {installed} installed, {requirement.specifier} needed"
            )
    return missing


def installed_from(repo: str) -> List[str]:
    """Problems with the installed package itself: absent, from another checkout, no command."""
    try:
        metadata.version("mindspeed-vita")
    except metadata.PackageNotFoundError:
        return ["mindspeed-vita: not installed"]
    spec = importlib.util.find_spec("mindspeed_vita")
    origin = os.path.realpath(spec.origin) if spec and spec.origin else ""
    if not origin.startswith(os.path.realpath(repo) + os.sep):
        return [
            f"mindspeed-vita: installed from {os.path.dirname(os.path.dirname(origin)) or '?'}, "
            f"not from {repo}"
        ]
    if shutil.which("mindspeed-vita") is None:
        return ["mindspeed-vita: the command is not on PATH"]
    return []


def main(extras: List[str]) -> int:
    """Print what is missing; 0 when nothing is."""
    try:
        problems = installed_from(REPO) + unmet(
            declared_requirements(os.path.join(REPO, "setup.py"), extras)
        )
    except ImportError as error:  # no `packaging`: let pip decide
        problems = [f"cannot check the installation ({error})"]
    for problem in problems:
        print(f"[install] {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

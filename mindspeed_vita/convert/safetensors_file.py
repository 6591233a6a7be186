"""Writing a safetensors file with the permissions every other file of the run gets.

safetensors writes through a private temporary file that it renames into place, so the file
ends up with mode 0600 whatever the umask: a checkpoint readable by its owner only, inside a
run directory that the umask (usually 0022) makes readable by the group. `save_safetensors`
writes the file, then gives it the mode a plain `open(path, "w")` would have (0666 & ~umask).
"""

from __future__ import annotations

import os
from typing import Dict, Optional


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(tensors: Dict, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """`safetensors.torch.save_file`, then mode 0666 & ~umask like any newly created file."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())

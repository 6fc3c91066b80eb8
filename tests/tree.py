"""A hash of a folder's names and bytes, to show that a refused command changed nothing."""

import hashlib
from pathlib import Path


def tree_hash(root: Path) -> str:
    """Names, sizes and bytes of everything under ``root``."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()

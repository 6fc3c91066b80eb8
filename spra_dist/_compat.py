"""Import paths of the flat layout before the package was split by concern, kept working with a warning.

    from spra_dist.hf import SpraAdapterCallback      # DeprecationWarning: now spra_dist.integrations.hf

Each old module name resolves to the module that holds its code now (the same module object), so every name it
defined is still there. Installed once by ``spra_dist/__init__.py``; it only answers names nothing else finds.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "spra_dist.adapter": "spra_dist.adapters.files",
    "spra_dist.atomic": "spra_dist.utils.atomic",
    "spra_dist.base_model": "spra_dist.adapters.base",
    "spra_dist.checkpoint": "spra_dist.train.checkpoint",
    "spra_dist.comm": "spra_dist.distributed.comm",
    "spra_dist.config": "spra_dist.core.config",
    "spra_dist.devices": "spra_dist.distributed.devices",
    "spra_dist.engines": "spra_dist.distributed.engines",
    "spra_dist.faults": "spra_dist.distributed.faults",
    "spra_dist.fsdp": "spra_dist.distributed.fsdp",
    "spra_dist.generate": "spra_dist.cli.generate",
    "spra_dist.hf": "spra_dist.integrations.hf",
    "spra_dist.kernels": "spra_dist.core.kernels",
    "spra_dist.layer": "spra_dist.core.layer",
    "spra_dist.masks": "spra_dist.core.masks",
    "spra_dist.merge": "spra_dist.adapters.export",
    "spra_dist.model": "spra_dist.core.model",
    "spra_dist.packaged": "spra_dist.demos.packaged",
    "spra_dist.data.demo_dates": "spra_dist.demos.dates",
    "spra_dist.data.demo_reviews": "spra_dist.demos.reviews",
}
"""Old module path -> where its code lives now."""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        new = MOVED[spec.name]
        # stacklevel 2: warnings skips the import machinery's frames, so this names the importing file.
        warnings.warn(f"{spec.name} is now {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        """The module is the new one, already executed."""


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())

"""pluggy hook specifications. A plugin module (or object) implements::

    from lqframe import hookimpl

    @hookimpl
    def lqframe_register(registry):
        registry.add_quantizer("my-quant", MyQuantizer)

and declares itself in its distribution's ``pyproject.toml``::

    [project.entry-points.lqframe]
    my-quant = "my_package.my_module"
"""

from __future__ import annotations

import pluggy

PROJECT = "lqframe"
ENTRY_POINT_GROUP = "lqframe"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def lqframe_register(registry):  # type: ignore[no-untyped-def]
    """Add quantizers, reconstructors, allocators and objectives to ``registry`` through its
    ``add_quantizer``, ``add_reconstructor``, ``add_allocator`` and ``add_objective`` methods."""

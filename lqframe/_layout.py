"""Where the sub-packages ``lqframe.kernels`` and ``lqframe.plugins`` find their modules.

Their source folders sit at the top of the repository (``kernels/``, ``plugins/``) without an
``__init__.py``: a top-level regular package would be imported instead of any installed distribution
of the same name by every Python started in the repository root (it puts the root first on
``sys.path``), and ``kernels`` is the import name of a Hugging Face package that transformers loads.
A folder without ``__init__.py`` can only be a namespace package at the top level, and a regular
package elsewhere on ``sys.path`` always wins over one (PEP 420; transformers also ignores such a
namespace package as "not installed").

``lqframe/kernels.py`` and ``lqframe/plugins.py`` are the packages' ``__init__`` modules: a module
with a ``__path__`` is a package. ``__path__`` is the folder an installed wheel puts beside this
file (``lqframe/kernels/``), or the repository's top-level folder in an editable install or a source
checkout.
"""

from __future__ import annotations

from pathlib import Path


def source_folder(init_file: str, name: str, marker: str) -> str:
    """The folder holding the modules of ``lqframe.<name>``, recognised by its ``marker`` module."""
    here = Path(init_file).resolve().parent  # the lqframe package folder
    for folder in (here / name, here.parent / name):
        if (folder / marker).is_file():
            return str(folder)
    raise ImportError(f"lqframe.{name}: its modules are missing (looked for {marker} in {here / name} and "
                      f"{here.parent / name}); reinstall lqframe")

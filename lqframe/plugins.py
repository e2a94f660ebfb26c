"""lqframe's built-in methods, one plugin per module, registered through the ``lqframe``
entry-point group exactly like third-party plugins. Nothing in the core imports these by name.

The modules live in the repository's top-level ``plugins/`` folder, which is not a regular package
(no ``__init__.py``), so that nothing started in the repository root can import it by the top-level
name ``plugins``; this module is the package ``lqframe.plugins`` (see :mod:`lqframe._layout`).
"""

from lqframe._layout import source_folder

__path__ = [source_folder(__file__, "plugins", "gptq.py")]

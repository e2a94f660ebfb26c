"""lqframe's built-in methods, one plugin per module, registered through the ``lqframe``
entry-point group exactly like third-party plugins. Nothing in the core imports these by name."""

"""Moved: the plugin authors' test kit is :mod:`sft.testing` (``-p sft.testing``).

This alias keeps ``-p sft.core.testing`` and ``from sft.core.testing import ...`` working for
one release, with a warning that says where the kit went. It is the one module of ``core/``
that imports outside the core (``tests/test_layout.py`` names it as the only exception).
"""

import warnings

import sft.testing as _kit

warnings.warn("sft.core.testing moved to sft.testing: write `-p sft.testing` and `from sft.testing import ...` "
              "(this alias goes in the next release)", FutureWarning, stacklevel=2)

# Every name of the kit, its fixtures and pytest hooks included, so pytest finds them here too.
globals().update({name: value for name, value in vars(_kit).items() if not name.startswith("__")})
__all__ = list(getattr(_kit, "__all__", ()))

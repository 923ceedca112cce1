"""kdbook_utils: the package behind the kdbook knowledge-distillation notebooks.

Shared plumbing lives in its own modules (``data``, ``models``, ``features``, ``train``, ``checkpoints``,
``metrics``, ``plots``, ``widgets``, ``presets``); each lesson's method is one module in ``methods``.
Import from the submodules, e.g. ``from kdbook_utils.data import load_dataset``.
"""

__version__ = "0.1.0"

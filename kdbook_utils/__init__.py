"""kdbook_utils: the package behind the kdbook knowledge-distillation notebooks.

Shared plumbing lives in its own modules (``data``, ``models``, ``features``, ``train``, ``checkpoints``,
``metrics``, ``plots``, ``widgets``, ``presets``, ``cpus``); each lesson's method is one module in
``methods``. Import from the submodules, e.g. ``from kdbook_utils.data import load_dataset``.

Importing the package fits torch's thread count to the CPUs this process may really use (a container's
CPU quota, the CPU affinity), unless ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set: see
:mod:`kdbook_utils.cpus`. ``THREADS`` says what it found and did.
"""

from kdbook_utils.cpus import fit_torch_threads

__version__ = "0.2.0"

THREADS = fit_torch_threads()

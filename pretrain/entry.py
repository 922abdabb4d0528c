"""Running an entry module given as a file path, the way the project's card shows it:

    deepspeed pretrain/main.py --deepspeed_config ...      (the launcher runs `python -u pretrain/main.py`)
    python pretrain/main.py ...

Python then runs the file as ``__main__`` with ``pretrain/`` first on ``sys.path``. Two things go
wrong unless the entry hands over at once (``run_installed_module``, called from the module's
``if __name__ == "__main__"`` block at its top, before anything else runs):

- ``pretrain/``'s own modules (``config``, ``data``, ``evaluate``, ...) would shadow top-level
  packages of the same names for every import that follows (``evaluate`` is a Hugging Face
  package transformers looks for); the folder is taken off ``sys.path``;
- the module would exist twice, as ``__main__`` and as ``pretrain.main`` once anything imports it
  (``pretrain.main.launch``, a test), with two sets of classes and module state. The entry
  therefore runs the installed module, ``pretrain.main``, and ``__main__`` defines nothing; the
  same holds for ``python -m pretrain.main``, which also arrives as ``__main__``.

``pretrain`` itself resolves through the installed project (``pip install -e .``, done by
``./run.sh setup``), so this needs no path of the repository.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import NoReturn


def run_installed_module(module: str, script: str) -> NoReturn:
    """Drop ``script``'s folder from ``sys.path``, import ``module`` and exit with its ``main()``."""
    script_dir = os.path.dirname(os.path.abspath(script))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != script_dir]
    installed = importlib.import_module(module)
    if os.path.realpath(installed.__file__) != os.path.realpath(script):
        # another checkout is the installed one: running it instead of the file named would be a surprise
        sys.exit(f"error: {script} is not the installed {module} ({installed.__file__}): run that checkout's "
                 f"file, or install this one with ./run.sh setup (pip install -e .)")
    sys.exit(installed.main())

"""Start-up shim of inseq-semiring, imported by ``inseq_semiring_autoload.pth`` when the interpreter starts.

It must stay tiny and never import torch, Inseq or the ``inseq_semiring`` package: it only finds
``inseq_semiring/integrations/_autoload.py`` (asking the import system's finders, which import nothing) and runs its
``install_cli_hook()``, which registers the plugin's Inseq methods just before Inseq's CLI is imported (so
``inseq attribute -a semiring_maxpath`` works with no import by the user). ``INSEQ_SEMIRING_NO_AUTOLOAD=1`` turns it
off.
"""

import os
import sys


def _install() -> None:
    if os.environ.get("INSEQ_SEMIRING_NO_AUTOLOAD", "").strip().lower() in ("1", "true", "yes"):
        return
    try:
        for finder in list(sys.meta_path):
            spec = finder.find_spec("inseq_semiring", None) if hasattr(finder, "find_spec") else None
            if spec is None:
                continue
            for base in spec.submodule_search_locations or ():
                path = os.path.join(base, "integrations", "_autoload.py")
                if os.path.isfile(path):
                    from importlib.machinery import SourceFileLoader  # light: the loaders are already loaded

                    module = type(sys)("_inseq_semiring_autoload")
                    module.__file__ = path
                    SourceFileLoader(module.__name__, path).exec_module(module)
                    module.install_cli_hook()
            return
    except Exception:  # interpreter start-up must never fail because of us
        pass


_install()

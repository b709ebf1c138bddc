"""Import hooks that register the Inseq plugin with no import by the user.

This file is standalone on purpose: it imports nothing from ``inseq_semiring`` (nor torch, nor Inseq) at module
level, because the start-up shim ``inseq_semiring_autoload`` (run by ``inseq_semiring_autoload.pth`` at every
interpreter start) loads it *by path*, without importing the package. Everything heavy happens only when a hook fires.

Two hooks, both ``sys.meta_path`` finders that never find anything themselves:

* :func:`install_cli_hook` (the ``.pth`` shim): fires just *before* the first ``inseq.commands...`` module is imported.
  Inseq's CLI freezes ``choices=list_feature_attribution_methods()`` when ``inseq.commands.attribute.attribute_args``
  is imported, so the plugin methods must be registered before that; ``inseq attribute -a semiring_maxpath`` then
  works out of the box. Until then the cost is one ``str.startswith`` per import. Disable with the environment
  variable ``INSEQ_SEMIRING_NO_AUTOLOAD=1``.
* :func:`register_with_inseq` (``import inseq_semiring``): registers now if Inseq is already imported, otherwise right
  *after* the ``inseq`` package finishes importing (the finder wraps the loader of ``inseq`` for that one call and
  restores the real loader on the module). So importing ``inseq_semiring`` never imports Inseq itself (~3 s) and the
  core API works without Inseq installed.

A hook removes itself once it has fired; a failing registration is reported as a warning, never raised into the
import that triggered it.
"""

import sys  # nothing else at module level: this file is loaded at interpreter start-up

__all__ = ["install_cli_hook", "register_with_inseq", "installed_hooks", "remove_hooks", "ENV_DISABLE"]

ENV_DISABLE = "INSEQ_SEMIRING_NO_AUTOLOAD"
_CLI_PACKAGE = "inseq.commands"
_PLUGIN = "inseq_semiring.integrations.inseq"
_MARK = "_inseq_semiring_hook"
#: set in the plugin module when a hook fires while that module is still being imported (it imports Inseq itself);
#: the module then registers at the end of its own import
PENDING_FLAG = "_register_when_imported"


def _register() -> None:
    plugin = sys.modules.get(_PLUGIN)
    if plugin is not None and getattr(getattr(plugin, "__spec__", None), "_initializing", False):
        setattr(plugin, PENDING_FLAG, True)
        return
    import importlib

    importlib.import_module(_PLUGIN).register()


def _register_quietly() -> None:
    try:
        _register()
    except Exception as e:  # never break the import that triggered us
        import warnings

        warnings.warn(f"inseq-semiring could not register its Inseq methods: {type(e).__name__}: {e}", stacklevel=3)


def _inseq_ready() -> bool:
    mod = sys.modules.get("inseq")
    spec = getattr(mod, "__spec__", None)
    return mod is not None and not getattr(spec, "_initializing", False)


class _PostImportLoader:
    """Wraps the loader of one module; runs ``callback`` after the module executed successfully."""

    def __init__(self, loader, callback) -> None:
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader  # the module must not keep seeing the wrapper
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Hook:
    """``kind="before"``: fire before ``inseq.commands`` is imported; ``kind="after"``: after ``inseq`` is."""

    _inseq_semiring_hook = True

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.fired = False

    def __repr__(self) -> str:
        return f"<inseq_semiring autoload hook ({self.kind})>"

    def find_spec(self, fullname: str, path=None, target=None):
        if self.fired or not fullname.startswith("inseq"):
            return None  # the fast path: every other import pays one startswith
        if self.kind == "before":
            if fullname == _CLI_PACKAGE or fullname.startswith(_CLI_PACKAGE + "."):
                self._fire()
            return None
        if fullname != "inseq":
            return None
        spec = self._real_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PostImportLoader(spec.loader, self._fire)
        return spec

    def _real_spec(self, fullname, path, target):
        for finder in list(sys.meta_path):
            if getattr(finder, _MARK, False):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def _fire(self) -> None:
        if self.fired:
            return
        self.fired = True
        _remove(self)
        if _inseq_ready() or self.kind == "after":
            _register_quietly()


def _remove(hook) -> None:
    try:
        sys.meta_path.remove(hook)
    except ValueError:
        pass


def installed_hooks() -> list:
    """The autoload hooks currently on ``sys.meta_path`` (from any copy of this module)."""
    return [f for f in sys.meta_path if getattr(f, _MARK, False)]


def remove_hooks() -> None:
    for hook in installed_hooks():
        _remove(hook)


def _install(kind: str) -> None:
    if any(getattr(f, "kind", None) == kind for f in installed_hooks()):
        return
    sys.meta_path.insert(0, _Hook(kind))


def install_cli_hook() -> None:
    """Register the plugin just before Inseq's CLI modules are imported (idempotent; used by the ``.pth`` shim)."""
    if "inseq.commands" in sys.modules:
        if _inseq_ready():
            _register_quietly()
        return
    _install("before")


def register_with_inseq() -> None:
    """Register the plugin now if Inseq is imported, else as soon as ``inseq`` finishes importing (idempotent)."""
    if "inseq" in sys.modules:
        if _inseq_ready():
            _register_quietly()
        return
    _install("after")

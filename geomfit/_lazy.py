"""Lazy re-exports for a package's ``__init__``: a table ``{module: (names, ...)}`` becomes the
package's ``__all__``, ``__getattr__`` and ``__dir__`` (PEP 562), so a name's module (and what it
imports, e.g. torch) loads on first access only."""
from importlib import import_module


def lazy_exports(package: str, modules: dict, namespace: dict, extra_all=()):
    """Install lazy attribute access on ``namespace`` (a package's ``globals()``).

    Parameters
    ----------
    package : str
        The package's name, for error messages.
    modules : dict
        Defining module -> tuple of public names it exports. A name must appear in one row only.
    namespace : dict
        The package's ``globals()``; resolved names are cached there.
    extra_all : sequence of str
        Names defined in the package itself that belong in ``__all__``.

    Returns
    -------
    exports : dict
        Name -> defining module.
    """
    exports = {}
    for mod, names in modules.items():
        for name in names:
            if name in exports:
                raise ValueError(f"{package}: {name!r} is exported by both {exports[name]} and {mod}")
            exports[name] = mod

    def __getattr__(name):
        mod = exports.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(mod), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    namespace["__all__"] = sorted(exports) + list(extra_all)
    namespace["__getattr__"] = __getattr__
    namespace["__dir__"] = __dir__
    return exports

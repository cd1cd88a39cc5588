"""The extension points: one registry per kind of plugin (methods, adapter kinds, datasets, runtimes).

A plugin declares, on itself, everything the rest of fedlora needs to know about it:

* ``name`` and a one-line ``description`` (``fedlora methods``, ``fedlora config --keys``, the docs tables);
* ``options``: its own config keys (:class:`Option`, in its section: ``method.na_estimator`` belongs to
  flora-na), with default, meaning and allowed values, validated like every other key;
* ``needs`` and ``provides``: capabilities, named in :data:`CAPABILITIES`. A configuration is valid when every
  capability some chosen plugin needs is provided by another chosen plugin (or by the model family). That one
  rule, :func:`check_compatible`, is the only compatibility rule in fedlora: config validation, ``fedlora compare``
  and the docs all ask it; nobody else names a method or an adapter kind to decide what fits.

This module is light (no torch): it imports the built-in plugins lazily, on the first question asked of a
registry, so that ``fedlora methods`` and ``fedlora config --keys`` answer at once.

User plugins: :func:`load_plugin` imports a Python file whose top level registers what it defines
(``fedlora.registry.METHODS.register(MyMethod)``); ``fedlora run --plugin FILE`` does this before reading the
config. A file that fails to import, or registers a name that is taken, is a :class:`PluginError` (one line,
exit 2). docs/extending.md is the guide.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterator, Sequence, TypeVar

from fedlora.errors import ConfigError, FedloraError

if TYPE_CHECKING:
    from fedlora.config import Config

# Every capability a plugin may need or provide, with the words an error message uses for it.
CAPABILITIES: dict[str, str] = {
    "factors": "low-rank factors B, A with ΔW = s·B·A (the server combines or merges products of factors)",
    "magnitude-free": "an update that is exactly s·B·A, with no per-column magnitude re-normalisation (DoRA's "
                      "magnitude makes ΔW depend on W0 + s·B·A as a whole)",
    "per-client-ranks": "clients with adapters of different ranks",
    "core-factor": "an r×r trainable core R between fixed factors, ΔW = s·B·(R − I)·A (LoRA-SB)",
    "core-sharing": "a method that uploads and averages LoRA-SB's r×r core R (its fixed B and A are never sent)",
    "per-example-gradients": "per-example gradients from Opacus (its grad samplers cover nn.Linear: LoRA's A and B, "
                             "heads; not VeRA's scaling vectors or DoRA's magnitude)",
    "generation": "a generation task on a causal language model",
    "classification": "a classification task on an encoder",
}


class PluginError(FedloraError):
    """A plugin file could not be loaded, or a plugin is malformed or clashes with a registered name."""


@dataclass(frozen=True)
class Option:
    """A config key a plugin declares in its section (``section.key``), validated like the built-in keys."""

    key: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def rules(self) -> dict[str, Any]:
        return {k: v for k, v in (("choices", self.choices), ("ge", self.ge), ("gt", self.gt), ("le", self.le),
                                  ("lt", self.lt)) if v is not None}


T = TypeVar("T")


class Registry(Mapping[str, T]):
    """``name -> plugin`` for one extension point (a read-only mapping, plus :meth:`register`). ``section`` is the
    config section its plugins' options live in and ``key`` the key that names the chosen plugin (``method.name``)."""

    def __init__(self, kind: str, section: str, key: str, builtins: tuple[str, ...]) -> None:
        self.kind, self.section, self.key = kind, section, key
        self._builtins = builtins  # modules whose import registers the built-in plugins
        self._items: dict[str, T] = {}
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtins:
                if module.endswith(".*"):  # every module of a package but its shared ones: one file, one plugin
                    package = importlib.import_module(module[:-2])
                    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
                        if info.name not in getattr(package, "SHARED_MODULES", ()):
                            importlib.import_module(f"{module[:-2]}.{info.name}")
                else:
                    importlib.import_module(module)

    def register(self, plugin: T) -> T:
        """Add ``plugin`` under its ``name``; a name that is taken is a :class:`PluginError`. Returns the plugin,
        so that it can be used as a class decorator."""
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"a {self.kind} plugin must have a non-empty string attribute 'name', got {name!r}")
        if not isinstance(getattr(plugin, "description", None), str):
            raise PluginError(f"{self.kind} plugin {name!r} must have a string attribute 'description'")
        for attr in ("needs", "provides"):
            unknown = sorted(set(getattr(plugin, attr, ())) - set(CAPABILITIES))
            if unknown:
                raise PluginError(f"{self.kind} plugin {name!r}: {attr} names unknown capabilities {unknown}; known: "
                                  f"{', '.join(CAPABILITIES)}")
        current = self._items.get(name)
        if current is not None and current is not plugin:
            raise PluginError(f"{self.kind} name {name!r} is already registered (by {_origin(current)}); choose "
                              "another name")
        self._items[name] = plugin
        return plugin

    def unregister(self, name: str) -> None:
        """Remove a plugin (tests and interactive sessions that load a plugin file twice)."""
        self._items.pop(name, None)

    def lookup(self, name: str) -> T:
        """The plugin called ``name``, or a :class:`ConfigError` that lists the choices."""
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"{self.section}.{self.key} = {name!r} is not allowed; choose one of: "
                              f"{', '.join(self._items)}") from None

    def __getitem__(self, name: str) -> T:
        self._load()
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._items))

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._items)

    def options(self) -> dict[str, tuple[Option, list[str]]]:
        """Every option declared by a plugin of this registry: ``key -> (option, names of the plugins that declare
        it)``. Two plugins may share an option key only with the same declaration."""
        out: dict[str, tuple[Option, list[str]]] = {}
        for name, plugin in self.items():
            for opt in getattr(plugin, "options", ()):
                if opt.key in out and out[opt.key][0] != opt:
                    raise PluginError(f"{self.kind} {name!r} declares option {self.section}.{opt.key} differently "
                                      f"from {', '.join(out[opt.key][1])}")
                out.setdefault(opt.key, (opt, []))[1].append(name)
        return out


def _origin(plugin: Any) -> str:
    module = getattr(plugin, "__module__", None) or type(plugin).__module__
    return f"module {module}"


METHODS: Registry[Any] = Registry("method", "method", "name", ("fedlora.methods.*",))
ADAPTERS: Registry[Any] = Registry("adapter kind", "adapter", "kind", ("fedlora.adapters.*",))
DATASETS: Registry[Any] = Registry("dataset", "data", "dataset", ("fedlora.data.sources",))
RUNTIMES: Registry[Any] = Registry("runtime", "runtime", "kind", ("fedlora.runtime.kinds",))
REGISTRIES: tuple[Registry[Any], ...] = (METHODS, ADAPTERS, DATASETS, RUNTIMES)


def chosen(config: Config) -> list[tuple[str, Any]]:
    """``(config key, plugin)`` of every plugin a config chooses."""
    return [(f"{r.section}.{r.key}", r.lookup(getattr(getattr(config, r.section), r.key))) for r in REGISTRIES]


def unmet(picks: list[tuple[str, Any]], extra_needs: Sequence[tuple[str, Any, str]] = ()) -> list[tuple[str, Any, str]]:
    """``(config key, plugin or value, capability)`` for every capability some pick needs that no pick provides."""
    provided: set[str] = set()
    for _, plugin in picks:
        provided |= set(getattr(plugin, "provides", ()))
    needs = [(key, plugin, cap) for key, plugin in picks for cap in sorted(getattr(plugin, "needs", ()))]
    return [n for n in needs + list(extra_needs) if n[2] not in provided]


def check_compatible(config: Config) -> None:
    """The one compatibility rule: every capability a chosen plugin needs is provided by another chosen plugin (a
    per-client rank list needs 'per-client-ranks', which a method provides). Raises a ConfigError with the reason."""
    extra: list[tuple[str, Any, str]] = []
    if isinstance(config.adapter.rank, tuple):
        extra.append(("adapter.rank", list(config.adapter.rank), "per-client-ranks"))
    for key, plugin, cap in unmet(chosen(config), extra):
        who = plugin.name if hasattr(plugin, "name") else plugin
        providers = [f"{r.section}.{r.key} = {n!r}" for r in REGISTRIES for n, p in r.items()
                     if cap in getattr(p, "provides", ())]
        hint = f"; it is provided by: {', '.join(providers)}" if providers else ""
        raise ConfigError(f"{key} = {who!r} needs {CAPABILITIES.get(cap, cap)}, which this configuration does not "
                          f"provide{hint}")
    quantization = config.model.quantization
    for key, plugin in chosen(config):
        if quantization != "none" and getattr(plugin, "changes_base", False):
            # Merging into a k-bit weight rounds each merge to the quantization grid (NF4's step is ~1/8 of a
            # block's largest weight), which erases updates of adapter size; a float32 master of every merged layer
            # would hold the float32 weights the quantization exists to avoid.
            raise ConfigError(f"{key} = {plugin.name!r} changes the frozen base weights every round, which "
                              f"model.quantization = {quantization!r} stores in k-bit form where the merges would be "
                              "rounded away; use model.quantization = 'none', or a method that leaves the base "
                              "unchanged")
    for key, plugin in chosen(config):  # a plugin's own rule about the rest of the configuration
        check = getattr(plugin, "check_config", None)
        reason = check(config) if callable(check) else None
        if reason:
            raise ConfigError(f"{key} = {plugin.name!r}: {reason}")


def fitting_adapters(method: Any) -> list[str]:
    """The adapter kinds a method fits, by the same rule (for listings)."""
    return [name for name, kind in ADAPTERS.items()
            if not unmet([("method.name", method), ("adapter.kind", kind)])]


def load_plugin(path: str | Path) -> None:
    """Import a user's plugin file; its top level registers what it defines. Errors are :class:`PluginError`."""
    p = Path(path)
    if not p.is_file():
        raise PluginError(f"--plugin {str(p)!r}: no such file")
    name = f"fedlora_plugin_{abs(hash(str(p.resolve())))}"
    if name in sys.modules:  # the same file twice in one process: already registered
        return
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise PluginError(f"--plugin {str(p)!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        for r in REGISTRIES:  # built-ins first, so that a clash with them is detected
            r._load()
        spec.loader.exec_module(module)
    except PluginError as e:
        del sys.modules[name]
        raise PluginError(f"--plugin {str(p)!r}: {e}") from None
    except Exception as e:  # a user's file: any error it raises is reported in one line
        del sys.modules[name]
        raise PluginError(f"--plugin {str(p)!r} failed to import: {type(e).__name__}: {e}") from None


def describe_plugins() -> Iterator[tuple[str, str, str, str]]:
    """``(kind, name, description, needs)`` of every registered plugin, for listings and docs."""
    for r in REGISTRIES:
        for name, plugin in r.items():
            needs = ", ".join(sorted(getattr(plugin, "needs", ())))
            yield r.kind, name, plugin.description, needs


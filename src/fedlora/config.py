"""Experiment configuration: one frozen dataclass per TOML section, validated at construction.

The section and key names are a contract (scripts and users depend on them). Every key can be overridden from
the command line with ``--set section.key=value``; values there are parsed as TOML (``3``, ``0.5``, ``true``,
``["query", "value"]``) and fall back to a plain string. Unknown keys, wrong types and bad values raise
:class:`~fedlora.errors.ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from fedlora import hub, registry
from fedlora.config_fields import (  # noqa: F401  (the bounds are part of this module's interface)
    MAX_BATCH, MAX_COUNT, MAX_SECONDS, MAX_THREADS, MAX_TOKENS, _check_value, _closest, _coerce, _opt, _Section)
from fedlora.config_data import (CAUSAL_MODEL_NAMES, METRICS, MODEL_NAMES, PARTITIONS,  # noqa: F401 (re-exported)
                                 TASKS, DataConfig, ModelConfig)
from fedlora.config_guard import FaultsConfig, PrivacyConfig
from fedlora.config_train import LR_SCHEDULES, TrainConfig  # noqa: F401 (re-exported)
from fedlora.errors import ConfigError

# Sections whose chosen plugin may declare options of its own (fedlora.registry.Option), kept in the section's
# ``extra`` field and read as attributes (``config.method.na_estimator``).
PLUGIN_SECTIONS: dict[str, registry.Registry[Any]] = {"method": registry.METHODS, "adapter": registry.ADAPTERS}


class _PluginOptions(_Section):
    """Mixin of a section whose plugins declare options: ``section.<option>`` reads the value given in the config
    (``extra``), else the option's declared default."""

    def __getattr__(self, name: str) -> Any:  # only reached when the normal attribute lookup fails
        if name.startswith("_") or name == "extra":
            raise AttributeError(name)
        extra = dict(object.__getattribute__(self, "extra"))
        if name in extra:
            return extra[name]
        options = PLUGIN_SECTIONS[self.SECTION].options()
        if name in options:
            return options[name][0].default
        raise AttributeError(f"[{self.SECTION}] has no key or plugin option {name!r}")


def _extra_field() -> Any:
    return field(default=(), metadata={"help": "options declared by plugins (fedlora.registry.Option)"})


@dataclass(frozen=True)
class AdapterConfig(_PluginOptions):
    SECTION = "adapter"
    kind: str = _opt("lora", "adapter family", choices=registry.ADAPTERS)
    rank: int | tuple[int, ...] = _opt(8, "rank r of every client's adapter, or one rank per client "
                                                 "(method flora only)", ge=1)
    alpha: float = _opt(16.0, "LoRA alpha: scaling s = alpha/r (lora, dora) or alpha/sqrt(r) (rslora); unused by vera",
                        gt=0)
    dropout: float = _opt(0.0, "dropout on the adapter input", ge=0.0, lt=1.0)
    targets: tuple[str, ...] | None = _opt(None, "names of the linear modules to adapt (unset: query, value for "
                                                 "encoders; q_proj, v_proj for causal LMs)")
    seed: int = _opt(0, "seed of the adapter initialisation shared by every client (and of VeRA's projections)")
    extra: tuple[tuple[str, Any], ...] = _extra_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets is not None and not self.targets:
            raise ConfigError("adapter.targets = [] is empty; name at least one module, e.g. [\"query\", \"value\"]")

    @property
    def max_rank(self) -> int:
        return max(self.rank) if isinstance(self.rank, tuple) else self.rank

    def rank_of(self, client: int) -> int:
        """Client ``client``'s rank: its entry of a per-client list, else the one rank."""
        return self.rank[client] if isinstance(self.rank, tuple) else self.rank


@dataclass(frozen=True)
class MethodConfig(_PluginOptions):
    SECTION = "method"
    name: str = _opt("fedsa", "aggregation method", choices=registry.METHODS)
    share_head: bool | None = _opt(None, "share the classification head (unset: the method's documented default)")
    weighting: str = _opt("samples", "client weights p_u", choices=("samples", "uniform"))
    extra: tuple[tuple[str, Any], ...] = _extra_field()


@dataclass(frozen=True)
class RuntimeConfig(_Section):
    SECTION = "runtime"
    kind: str = _opt("simulation", "where the clients run (fedlora methods lists the runtimes)", choices=registry.RUNTIMES)


@dataclass(frozen=True)
class Config:
    """A whole experiment. ``Config()`` is the default demo."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        a, d, t = self.adapter, self.data, self.train
        if isinstance(a.rank, tuple):
            # Per-client ranks (which methods take them is the registry's rule): one rank per client.
            if len(a.rank) != d.num_clients:
                raise ConfigError(f"adapter.rank has {len(a.rank)} entries but data.num_clients = {d.num_clients}; "
                                  "give one rank per client, or one integer for all")
        registry.check_compatible(self)  # the one compatibility rule: what each chosen plugin needs is provided
        if t.clients_per_round > d.num_clients:
            raise ConfigError(f"train.clients_per_round = {t.clients_per_round} exceeds data.num_clients = {d.num_clients}")
        if t.eval_clients > d.num_clients:
            raise ConfigError(f"train.eval_clients = {t.eval_clients} exceeds data.num_clients = {d.num_clients}; "
                              f"use 0 (all) to {d.num_clients}")
        if t.min_clients > self.clients_per_round:
            raise ConfigError(f"train.min_clients = {t.min_clients} exceeds the clients per round ({self.clients_per_round})")
        if registry.DATASETS.lookup(d.dataset).path == "required" and not d.path:
            raise ConfigError(f"data.dataset = {d.dataset!r} needs data.path (the file to read)")
        if self.faults.straggler > 0 and t.round_timeout <= 0:
            raise ConfigError("faults.straggler > 0 needs train.round_timeout > 0 (the deadline a straggler misses)")
        from fedlora.privacy.checks import check_config  # the privacy rules live with the privacy package

        check_config(self)
        if t.dtype == "bfloat16" and (needs := self.float32_needs()):
            raise ConfigError(f"train.dtype = 'bfloat16' does not fit this run: {needs[0]}; set train.dtype = "
                              "'float32' or 'auto' (auto picks float32 for it)")

    def float32_needs(self) -> list[str]:
        """The features of this run that need float32 compute, one phrase each: ``train.dtype = "auto"``
        resolves to float32 when there is any (:func:`fedlora.precision.choose_dtype`), and an explicit
        ``"bfloat16"`` is refused. The one list of such rules: DP-SGD (privacy.checks) today."""
        from fedlora.privacy.checks import float32_reasons

        return float32_reasons(self)

    @property
    def clients_per_round(self) -> int:
        return self.train.clients_per_round or self.data.num_clients

    @property
    def states_on_disk(self) -> bool:
        """Whether the embedded runtime keeps client states on disk (``train.client_states``; auto: when fewer
        clients take part per round than there are)."""
        mode = self.train.client_states
        return mode == "disk" or (mode == "auto" and self.clients_per_round < self.data.num_clients)

    def resolved(self) -> Config:
        """The same experiment with every 'unset: default' key filled in, as written to a run's config.toml."""
        from fedlora.methods import get_method  # late import: methods depend on config

        kind = registry.ADAPTERS.lookup(self.adapter.kind)
        lr = self.train.lr if self.train.lr is not None else float(kind.default_lr)
        share = self.method.share_head
        if share is None:
            share = get_method(self.method.name).default_share_head
        model = hub.resolved(self.model)  # causal decided; a Hub revision pinned to its commit
        task, targets = self._resolve_task(model.causal), self.adapter.targets
        if targets is None:  # PEFT's default for the model type: BERT's query/value, Llama's q_proj/v_proj
            targets = hub.default_targets(model)
        from fedlora.privacy.checks import resolve_privacy  # calibrates the noise for privacy.target_epsilon

        # The chosen plugins' options are written out with their values (defaults included), so that config.toml
        # says everything the run used; options of plugins not chosen are kept as given.
        method = replace(self.method, share_head=share, extra=_with_defaults(self.method.extra,
                                                                             get_method(self.method.name).options))
        adapter = replace(self.adapter, targets=targets, extra=_with_defaults(self.adapter.extra, kind.options))
        data = replace(self.data, task=task, metric=self._resolve_metric(task))
        return replace(self, model=model, train=replace(self.train, lr=lr), method=method, data=data,
                       adapter=adapter, privacy=resolve_privacy(self))

    def _resolve_task(self, causal: bool | None = None) -> str:
        """data.task = auto: the dataset's own task, or for a user file (task 'either') generation on a causal LM;
        checked against the model family (``causal``; unset: :func:`fedlora.hub.is_causal`): a causal LM has no
        classification head, an encoder cannot generate."""
        d = self.data
        if causal is None:
            causal = hub.is_causal(self.model)
        source = registry.DATASETS.lookup(d.dataset)
        task = d.task
        if task == "auto":
            task = source.task if source.task != "either" else ("generation" if causal else "classification")
        if task == "generation" and not causal:
            raise ConfigError(f"data.dataset = {d.dataset!r} is a generation task, which needs a causal language model; "
                              f"model.name = {self.model.name!r} is an encoder; use smollm2, tiny-llama, a causal LM "
                              "(local directory or Hub id), or model.causal = true if it is one")
        if task == "classification" and causal:
            twins = [n for n, s in registry.DATASETS.items() if s.classification_twin == d.dataset]
            hint = f"use data.dataset = {twins[0]!r}" if twins else "use data.task = 'generation' with instruction data"
            raise ConfigError(f"model.name = {self.model.name!r} is a causal language model, which needs a generation "
                              f"task; {hint}")
        return task

    def _resolve_metric(self, task: str) -> str:
        """data.metric = auto: accuracy for classification, else the dataset plugin's metric (exact-match where it
        declares none); checked against the task and against the metrics the dataset can score."""
        source = registry.DATASETS.lookup(self.data.dataset)
        metric = self.data.metric
        if metric == "auto":
            metric = "accuracy" if task == "classification" else (source.metric or "exact-match")
        if (metric == "accuracy") != (task == "classification"):
            allowed = "'accuracy'" if task == "classification" else "'exact-match' or 'final-number'"
            raise ConfigError(f"data.metric = {metric!r} does not score a {task} task; use 'auto' or {allowed}")
        if source.task_builder is not None and metric != source.metric:
            raise ConfigError(f"data.dataset = {self.data.dataset!r} is scored by {source.metric!r} only; unset "
                              f"data.metric = {metric!r}")
        if metric not in ("accuracy", "exact-match", "final-number") and metric != source.metric:
            owners = [n for n, s in registry.DATASETS.items() if s.metric == metric]
            raise ConfigError(f"data.metric = {metric!r} is scored by the dataset that defines it "
                              f"({', '.join(owners) or 'none'}), not by data.dataset = {self.data.dataset!r}")
        return metric

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for f in fields(self):
            section = getattr(self, f.name)
            values = dataclasses.asdict(section)
            values.update(dict(values.pop("extra", ())))  # plugin options sit beside the section's own keys
            out[f.name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if v is not None}
        return out


def _with_defaults(extra: tuple[tuple[str, Any], ...], options: Any) -> tuple[tuple[str, Any], ...]:
    """``extra`` with every one of ``options`` that it lacks set to its declared default."""
    values = dict(extra)
    for opt in options:
        values.setdefault(opt.key, opt.default)
    return tuple(sorted(values.items()))


SECTIONS: dict[str, type] = dict(typing.get_type_hints(Config))


def from_dict(raw: Mapping[str, Any], base: Config | None = None) -> Config:
    """Build a :class:`Config` from nested dicts (as read from TOML), on top of ``base`` (default: the demo)."""
    raw = _with_dataset_defaults(raw, base)
    base = base or Config()
    sections: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}]{_closest(name, list(SECTIONS))}; "
                              f"sections are: {', '.join(SECTIONS)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{name}] must be a table of keys, got {values!r}")
        cls = SECTIONS[name]
        hints = typing.get_type_hints(cls)
        known = [f.name for f in fields(cls) if f.name != "extra"]
        options = PLUGIN_SECTIONS[name].options() if name in PLUGIN_SECTIONS else {}
        changes: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in values.items():
            if key in known:
                changes[key] = _coerce(f"{name}.{key}", value, hints[key])
            elif key in options:
                opt, _ = options[key]
                extra[key] = _coerce_option(f"{name}.{key}", value, opt)
            else:
                every = known + sorted(options)
                raise ConfigError(f"unknown key {name}.{key}{_closest(key, every)}; keys of [{name}] are: "
                                  f"{', '.join(every)}")
        if extra:
            changes["extra"] = tuple(sorted({**dict(getattr(base, name).extra), **extra}.items()))
        sections[name] = replace(getattr(base, name), **changes)
    return replace(base, **sections)


def _with_dataset_defaults(raw: Mapping[str, Any], base: Config | None) -> dict[str, Any]:
    """``raw`` plus the settings the chosen dataset declares (``DatasetSource.defaults``) for every key the user did
    not set: not in ``raw``, and (on top of a ``base``, which then must name the dataset anew in ``raw``) still at
    its schema default in ``base``."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    data = out.get("data")
    named = data.get("dataset") if isinstance(data, dict) else None
    if base is not None and named is None:
        return out  # the base config's own dataset: its defaults were applied when it was loaded
    dataset = named if named is not None else Config().data.dataset
    if not isinstance(dataset, str) or dataset not in registry.DATASETS:
        return out  # DataConfig reports an unknown name
    current = base or Config()
    for key, value in registry.DATASETS.lookup(dataset).defaults().items():
        section, name = key.split(".")
        given = out.get(section)
        if isinstance(given, dict) and name in given:
            continue
        schema_default = next(f.default for f in fields(SECTIONS[section]) if f.name == name)
        if getattr(getattr(current, section), name) == schema_default:
            out.setdefault(section, {})
            if isinstance(out[section], dict):
                out[section][name] = value
    return out


def _coerce_option(key: str, value: Any, opt: registry.Option) -> Any:
    """A plugin option's value, of its default's type (any plain value when the default is None), checked."""
    hint = type(opt.default) if opt.default is not None else None
    if hint in (bool, int, float, str):
        value = _coerce(key, value, hint)
    elif isinstance(value, list):
        value = tuple(value)
    _check_value(key, value, opt.rules())
    return value


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value`` and parse the value as TOML (falling back to a plain string)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like section.key=value")
    lhs, rhs = text.split("=", 1)
    parts = lhs.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must be section.key, e.g. method.name")
    try:
        value = tomllib.loads(f"v = {rhs.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs.strip()
    return parts[0], parts[1], value


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML file (or start from the defaults), then apply ``section.key=value`` overrides in order."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        raw[section][key] = value
    # Build in one go so that cross-section checks see the final values, not an intermediate state.
    try:
        return from_dict(raw)
    except TypeError as e:  # pragma: no cover - defensive: dataclass construction errors
        raise ConfigError(str(e)) from None


def dumps(config: Config) -> str:
    """TOML text of a config (round-trips through :func:`load`)."""
    import tomli_w

    return tomli_w.dumps(config.to_dict())


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) for every key, for ``fedlora config --help``-style listings and the README."""
    rows = []
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            if f.name != "extra":
                rows.append((f"{name}.{f.name}", repr(f.default), f.metadata.get("help", "")))
        if name in PLUGIN_SECTIONS:  # options declared by plugins, with the plugins that declare them
            for key, (opt, owners) in PLUGIN_SECTIONS[name].options().items():
                rows.append((f"{name}.{key}", repr(opt.default), f"{opt.help} [{', '.join(owners)}]"))
    return rows

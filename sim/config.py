"""The run configuration: typed sections, YAML in and out, `--set a.b=c` overrides.

Registry-backed names (algorithms, dataset, partition scheme, model) and per-plugin options
(`data.*` for the chosen dataset, `algo.<name>.*` for each algorithm) are validated against
their registries in `validate`, so a typo is reported with the allowed values.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sim.plugins import algorithm_names, expand_algorithms, get_algorithm
from sim.typed import ConfigError, convert, from_mapping, to_mapping

T = TypeVar("T")


@dataclass(frozen=True)
class PartitionConfig:
    """How the dataset is split over clients: the keys every scheme shares, plus the scheme's own.

    The scheme's own keys sit flat beside these in YAML and `--set` (`partition: {scheme: dirichlet,
    alpha: 0.1}`) and land in `params`, validated against the params class the scheme registered
    (as `algo.<name>.*` are), so a new scheme brings its knobs in its own file.
    """

    scheme: str = "domain-dirichlet"
    min_size: int = 10
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int | None = None  # None: the run's seed, so each seed of a comparison gets its own split
    params: dict[str, Any] = field(default_factory=dict)  # the scheme's own keys; complete after load_config


_SHARED_PARTITION_KEYS = frozenset({"scheme", "min_size", "val_fraction", "test_fraction", "seed"})


@dataclass(frozen=True)
class ModelConfig:
    name: str = "small_cnn"
    width: int = 32


@dataclass(frozen=True)
class TrainConfig:
    """Local training shared by every algorithm (algorithms add their own terms, not their own loops)."""

    local_epochs: int = 1
    batch_size: int = 32
    # Plain SGD at 0.05: of {0.01, 0.05} x {0, 0.9}, the setting whose worst baseline is closest to its
    # own best on validation (README, "Shared defaults", has the measurement).
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    # One personalization budget for every method that fine-tunes a received model (FedAvg-FT,
    # FedBABU, Per-FedAvg's adaptation, WarmFed's DSD, new-client evaluation), so budgets are equal.
    finetune_epochs: int = 5


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  # evaluate every k rounds (the last round is always evaluated)
    batch_size: int = 512
    max_clients: int | None = None  # evaluate a seeded subset of clients at large scale
    # Epochs a held-out client adapts the final model for (new-client accuracy); None follows
    # train.finetune_epochs, so newcomers get the same personalization budget as fine-tuning methods.
    new_client_epochs: int | None = None


@dataclass(frozen=True)
class ClientResources:
    """Ray resources of one client actor; num_gpus may be a fraction, or "auto" (a share if GPUs exist, else CPU)."""

    num_cpus: float = 1.0
    num_gpus: float | str = 0.0


@dataclass(frozen=True)
class ServerResources:
    """Ray resources of the server actor (it lives on the driver's node).

    num_cpus 0: the server mostly waits while the clients train, so it takes no client's CPU.
    num_gpus "auto": a GPU share only when the driver's node has GPUs and an algorithm of the run
    has heavy server phases (`Algorithm.server_heavy`, e.g. WarmFed's fine-tuning on synthetic
    data): the server then counts as one more actor splitting the GPUs with the client actors
    (a whole GPU when the client actors run on CPU); otherwise 0. A server without a GPU share
    never touches a GPU (sim/orchestration/cluster.py, actors/devices.py)."""

    num_cpus: float = 0.0
    num_gpus: float | str = "auto"
    # torch threads; None: every core of its node, as its heavy phases run while the clients wait
    threads: int | None = None


MIXED_PRECISION = ("fp32", "fp16", "bf16")  # fp32: off


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local Ray; "auto": attach to the running cluster
    namespace: str | None = None  # None: a namespace per run, so concurrent runs never collide
    num_cpus: int | None = None  # cap for a locally started Ray
    pool_size: int | None = None  # client actors; None: as many as the cluster's free resources allow


@dataclass(frozen=True)
class RunConfig:
    algorithms: list[str] = field(default_factory=lambda: ["warmfed", "fedavg", "fedprox", "local", "fedbabu"])
    algo: dict[str, dict[str, Any]] = field(default_factory=dict)
    # named variants usable in `algorithms`, e.g. {warmfed-nodsd: {algorithm: warmfed, dsd: false}}:
    # one row each in the results, for ablations and hyper-parameter comparisons
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: str = "digits-domains"
    data: dict[str, Any] = field(default_factory=dict)
    num_clients: int = 10
    clients_per_round: int | None = None  # None (or "all"): every client that trains, so any num_clients works
    rounds: int = 5
    seed: int | list[int] = 0
    holdout_clients: int = 0  # clients never trained: they report new-client accuracy
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    client_resources: ClientResources = field(default_factory=ClientResources)
    server_resources: ServerResources = field(default_factory=ServerResources)
    # fp16 | bf16: autocast for diffusion sampling and LoRA training on a GPU (RunContext.autocast); CPU ignores it.
    mixed_precision: str = "fp32"
    ray: RayConfig = field(default_factory=RayConfig)
    out: str = "results"
    cache_dir: str | None = None  # None: <out>/cache (partitions, pretrained backbones)
    run_id: str | None = None
    checkpoint_every: int = 1
    checkpoint_keep: int = 2  # newest checkpoints kept: a corrupt one falls back to the one before
    progress: bool = True
    # `module:attribute` paths of sim.callbacks.Callback subclasses (trackers, loggers)
    callbacks: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return list(self.seed) if isinstance(self.seed, list) else [self.seed]

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out) / "cache"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value parsed as YAML; a comma list becomes a list (`algorithms=fedavg,fedprox`)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc
    if isinstance(value, str) and "," in value:
        value = [yaml.safe_load(v) for v in value.split(",")]
    return key, value


_LIST_KEYS = {"algorithms", "callbacks"}


def load_config(path: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read YAML (a path) or take a mapping of the same keys, apply overrides, type-check and validate names."""
    tree: dict[str, Any] = {}
    if isinstance(path, Mapping):
        tree = copy.deepcopy(dict(path))
    elif path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(loaded).__name__}")
        tree = copy.deepcopy(loaded)
    for text in overrides:
        key, value = parse_override(text)
        if key in _LIST_KEYS and isinstance(value, str):
            value = [value]
        _set_dotted(tree, key, value)
    if tree.get("clients_per_round") == "all":
        tree["clients_per_round"] = None
    _nest_partition_params(tree)
    cfg = from_mapping(RunConfig, tree)
    validate(cfg)
    return resolve(cfg)


def _nest_partition_params(tree: dict[str, Any]) -> None:
    """Move the scheme's own keys of the flat `partition:` section into `partition.params`."""
    section = tree.get("partition")
    if not isinstance(section, dict):
        return  # from_mapping reports the wrong type
    shared = {k: v for k, v in section.items() if k in _SHARED_PARTITION_KEYS}
    tree["partition"] = {**shared, "params": {k: v for k, v in section.items() if k not in _SHARED_PARTITION_KEYS}}


def partition_params(partition: PartitionConfig) -> Any:
    """The chosen scheme's typed params. Another scheme's key is ignored, so one config can sweep
    `partition.scheme` (alpha set for dirichlet does not stop a shards cell); a key no scheme has is an error."""
    from sim.partition import scheme_names, scheme_params_cls

    def keys(scheme: str) -> set[str]:
        return {f.name for f in dataclasses.fields(scheme_params_cls(scheme))}

    own = keys(partition.scheme)
    known = set().union(*(keys(s) for s in scheme_names()))
    unknown = sorted(set(partition.params) - known)
    if unknown:
        raise ConfigError(
            f"partition.{unknown[0]}: no partition scheme has this parameter; scheme {partition.scheme!r} takes: "
            f"{', '.join(sorted(own)) or 'none'} (and every scheme: {', '.join(sorted(_SHARED_PARTITION_KEYS))})"
        )
    mine = {k: v for k, v in partition.params.items() if k in own}
    return from_mapping(scheme_params_cls(partition.scheme), mine, prefix="partition")


def resolved(value: T | None, key: str) -> T:
    """A key that `resolve` fills; None here means the config skipped load_config, a caller's bug."""
    if value is None:
        raise ValueError(f"{key} is unresolved: build configs with load_config (it fills derived defaults)")
    return value


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill the keys whose default follows another key, so a run directory records the numbers used."""
    if cfg.clients_per_round is None:
        cfg = dataclasses.replace(cfg, clients_per_round=cfg.num_clients - cfg.holdout_clients)
    if cfg.eval.new_client_epochs is None:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, new_client_epochs=cfg.train.finetune_epochs))
    # validates the scheme's keys too; every field, typed: alpha=1 and alpha=1.0 are one config
    params = to_mapping(partition_params(cfg.partition))
    return dataclasses.replace(cfg, partition=dataclasses.replace(cfg.partition, params=params))


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_gpus(name: str, gpus: float | str) -> None:
    """A GPU request Ray can place: 'auto', a fraction of one GPU, or whole GPUs."""
    if isinstance(gpus, str):
        if gpus != "auto":
            raise ConfigError(f"{name} must be a number or 'auto', got {gpus!r}")
        return
    _positive(name, gpus, allow_zero=True)
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"{name}={gpus}: a share above one GPU must be a whole number of GPUs")


def validate(cfg: RunConfig) -> None:
    """Semantic checks, including registry names; raises ConfigError naming key and allowed values."""
    from sim.callbacks import load_callback
    from sim.data import dataset_names, dataset_params_cls
    from sim.models import model_names
    from sim.partition import scheme_names

    _positive("rounds", cfg.rounds, allow_zero=True)
    for path in cfg.callbacks:
        load_callback(path, "callbacks")
    _positive("num_clients", cfg.num_clients)
    if cfg.clients_per_round is not None:
        _positive("clients_per_round", cfg.clients_per_round)
    _positive("holdout_clients", cfg.holdout_clients, allow_zero=True)
    if cfg.holdout_clients >= cfg.num_clients:
        raise ConfigError(f"holdout_clients ({cfg.holdout_clients}) must be below num_clients ({cfg.num_clients})")
    if cfg.clients_per_round is not None and cfg.clients_per_round > cfg.num_clients - cfg.holdout_clients:
        raise ConfigError(
            f"clients_per_round ({cfg.clients_per_round}) exceeds num_clients ({cfg.num_clients})"
            + (f" minus holdout_clients ({cfg.holdout_clients})" if cfg.holdout_clients else "")
        )
    _positive("train.local_epochs", cfg.train.local_epochs)
    _positive("train.batch_size", cfg.train.batch_size)
    _positive("train.lr", cfg.train.lr)
    _positive("train.finetune_epochs", cfg.train.finetune_epochs, allow_zero=True)
    _positive("eval.every", cfg.eval.every)
    if cfg.eval.new_client_epochs is not None:
        _positive("eval.new_client_epochs", cfg.eval.new_client_epochs, allow_zero=True)
    _positive("checkpoint_every", cfg.checkpoint_every)
    _positive("checkpoint_keep", cfg.checkpoint_keep)
    _positive("client_resources.num_cpus", cfg.client_resources.num_cpus)
    _check_gpus("client_resources.num_gpus", cfg.client_resources.num_gpus)
    _positive("server_resources.num_cpus", cfg.server_resources.num_cpus, allow_zero=True)
    if cfg.server_resources.threads is not None:
        _positive("server_resources.threads", cfg.server_resources.threads)
    _check_gpus("server_resources.num_gpus", cfg.server_resources.num_gpus)
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {cfg.mixed_precision!r}")
    if not cfg.seeds:
        raise ConfigError("seed: give at least one seed")
    if not cfg.algorithms:
        raise ConfigError("algorithms: give at least one algorithm; registered: " + ", ".join(algorithm_names()))
    for name in cfg.algo:
        if name not in algorithm_names():
            raise ConfigError(f"algo.{name}: unknown algorithm; registered: {', '.join(algorithm_names())}")
    for name, spec in cfg.variants.items():
        if name in algorithm_names():
            raise ConfigError(f"variants.{name}: the name of a registered algorithm; pick another")
        if "algorithm" not in spec:
            raise ConfigError(f"variants.{name}: missing key 'algorithm' (one of {', '.join(algorithm_names())})")
    for name in run_algorithms(cfg):
        algorithm_spec(cfg, name)
    if cfg.dataset not in dataset_names():
        raise ConfigError(f"dataset: unknown dataset {cfg.dataset!r}; registered: {', '.join(dataset_names())}")
    convert(cfg.data, dataset_params_cls(cfg.dataset), "data")
    if cfg.partition.scheme not in scheme_names():
        raise ConfigError(
            f"partition.scheme: unknown scheme {cfg.partition.scheme!r}; registered: {', '.join(scheme_names())}"
        )
    if cfg.model.name not in model_names():
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}; registered: {', '.join(model_names())}")


def run_algorithms(cfg: RunConfig) -> list[str]:
    """The names a run executes, in order: registered algorithms (`all` = every one) and variants."""
    names: list[str] = []
    for name in cfg.algorithms:
        if name in cfg.variants:
            expanded = [name]
        else:
            try:
                expanded = expand_algorithms([name])
            except ConfigError as exc:
                if cfg.variants:
                    raise ConfigError(f"{exc}; variants: {', '.join(sorted(cfg.variants))}") from None
                raise
        names += [n for n in expanded if n not in names]
    return names


def algorithm_spec(cfg: RunConfig, name: str) -> tuple[type[Any], Any]:
    """(algorithm class, typed hyper-parameters) of a run name; a variant's keys override `algo.<base>`."""
    if name in cfg.variants:
        spec = dict(cfg.variants[name])
        base = str(spec.pop("algorithm"))
        cls = get_algorithm(base)
        return cls, convert({**cfg.algo.get(base, {}), **spec}, cls.Params, f"variants.{name}")
    cls = get_algorithm(name)
    return cls, convert(cfg.algo.get(name, {}), cls.Params, f"algo.{name}")


def config_mapping(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain data, in the shape YAML and `--set` use (the scheme's keys flat in `partition`)."""
    tree = to_mapping(cfg)
    part = tree["partition"]
    tree["partition"] = {"scheme": part.pop("scheme"), **part.pop("params"), **part}
    return tree


def stored_config_matches(path: Path, cfg: RunConfig) -> bool:
    """Whether the config stored at `path` (a run's config.yaml) is `cfg`, up to the progress bar
    (a display choice, so a resumed run may switch it)."""
    previous = load_config(path)
    return dump_config(dataclasses.replace(previous, progress=cfg.progress)) == dump_config(cfg)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_mapping(cfg), sort_keys=False)

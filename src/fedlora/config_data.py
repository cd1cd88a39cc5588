"""The sections that say what is trained on what: ``[model]`` (a bundled model, a local directory or a Hub id:
:mod:`fedlora.hub`) and ``[data]`` (a dataset plugin of :data:`fedlora.registry.DATASETS`, its columns and how it is
split). Part of the schema of :mod:`fedlora.config`, which re-exports both."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora import hub, registry
from fedlora.config_fields import MAX_COUNT, _opt, _Section
from fedlora.errors import ConfigError

MODEL_NAMES = tuple(hub.BUNDLED)  # the bundled models (fedlora.hub declares them)
CAUSAL_MODEL_NAMES = tuple(n for n, (_, causal) in hub.BUNDLED.items() if causal)
# How the frozen base's linear layers are stored (bitsandbytes through PEFT's k-bit path: fedlora.quantize).
QUANTIZATIONS = ("none", "nf4", "int8")
TASKS = ("auto", "classification", "generation")
# How answers are scored: classification by accuracy (and macro-F1); generation by exact match, GSM8K's final
# number, or HumanEval pass@1 (python-functions). "auto": the dataset plugin's metric (DatasetSource.metric).
METRICS = ("auto", "accuracy", "exact-match", "final-number", "humaneval")
PARTITIONS = ("iid", "dirichlet", "pathological", "natural-id", "shard")


@dataclass(frozen=True)
class ModelConfig(_Section):
    SECTION = "model"
    name: str = _opt("minilm", "bundled model (minilm, tiny-bert, smollm2, tiny-llama), a local Hugging Face directory "
                     "or a Hub id 'org/name' (from the Hugging Face cache, downloaded where the environment allows)")
    revision: str = _opt("main", "Hub ids: branch, tag or commit; the run's config.toml records the commit it named")
    causal: bool | None = _opt(None, "whether the model is a causal LM (generation) rather than an encoder "
                               "(classification head); unset: from its config's architectures")
    quantization: str = _opt("none", "causal LMs: the frozen base's linear layers in 4-bit NF4 or 8-bit (QLoRA; needs "
                             "bitsandbytes: pip install --no-deps bitsandbytes==0.50.2), adapters stay float32 and "
                             "save as plain PEFT adapters over the unquantized base; refused with methods that "
                             "change base weights (fedex, flora)", choices=QUANTIZATIONS)

    def __post_init__(self) -> None:
        super().__post_init__()
        hub.check_name(self.name, self.revision)


@dataclass(frozen=True)
class DataConfig(_Section):
    SECTION = "data"
    dataset: str = _opt("rotten-tomatoes", "bundled dataset or a user file (fedlora methods lists them)",
                        choices=registry.DATASETS)
    path: str = _opt("", "file for dataset = csv or jsonl; for hf: a Hub dataset id, a local dataset folder or a "
                     "parquet / arrow / json / csv file")
    config_name: str = _opt("", "hf: the dataset's configuration (e.g. 'mnli' of nyu-mll/glue)")
    splits: tuple[str, ...] = _opt(("train",), "hf: the splits whose examples are pooled (then held out and "
                                   "partitioned as any dataset)")
    test_split: str = _opt("", "hf: a split used as the global test set (subsampled to data.test_fraction of "
                           "data.max_examples); unset: held out of the pooled splits")
    text_column: str = _opt("text", "column with the input text (csv, jsonl, hf)")
    text_pair_column: str = _opt("", "column with the second text of a sentence pair (MNLI's hypothesis), encoded "
                                 "as a pair by the tokenizer (csv, jsonl, hf); unset: single texts")
    label_column: str = _opt("label", "column with the label (csv, jsonl, hf); strings, integers or a ClassLabel")
    task: str = _opt("auto", "classification or generation (instruction data on a causal LM); auto: the dataset's "
                     "own, and for csv/jsonl/hf generation on a causal LM, else classification", choices=TASKS)
    metric: str = _opt("auto", "how answers are scored: accuracy (classification), exact-match or final-number "
                       "(GSM8K's #### answer) for generation, humaneval (python-functions); auto: the dataset's",
                       choices=METRICS)
    prompt_column: str = _opt("", "generation from csv/jsonl/hf: column with the prompt (unset: instruction [+ input] "
                              "or prompt)")
    response_column: str = _opt("", "generation from csv/jsonl/hf: column with the response (unset: output or "
                                "response)")
    partition: str = _opt("dirichlet", "how examples are spread over clients", choices=PARTITIONS)
    partitioner: str = _opt("fedlora", "whose algorithm draws the partition: fedlora's, or Flower Datasets' "
                            "partitioner of the same name, for the split a Flower baseline uses "
                            "(fedlora.data.flower_partition)", choices=("fedlora", "flower"))
    partition_column: str = _opt("", "natural-id partition: the column naming each example's owner (a user, a "
                                 "hospital); one client per value, in sorted order (hf)")
    alpha: float = _opt(0.5, "Dirichlet concentration over labels (smaller: more skew)", gt=0)
    classes_per_client: int = _opt(2, "pathological partition: classes per client", ge=1)
    shards_per_client: int = _opt(2, "shard partition (Flower's ShardPartitioner: examples sorted by label, cut into "
                                  "equal shards): shards per client", ge=1)
    num_clients: int = _opt(3, "number of clients", ge=1, le=MAX_COUNT)
    min_examples_per_client: int = _opt(8, "every client gets at least this many examples", ge=2)
    test_fraction: float = _opt(0.2, "stratified global test set held out before partitioning", gt=0, lt=1)
    client_test_fraction: float = _opt(0.2, "fraction of each client's data kept as its own test split", gt=0, lt=1)
    validation_fraction: float = _opt(0.0, "fraction of each client's training data held out as its validation split; "
                                      "when > 0 the run trains on the rest and evaluates on validation data only (each "
                                      "client's split, their union as the global set), never on a test split: for "
                                      "choosing hyperparameters", ge=0, lt=1)
    max_examples: int = _opt(2400, "stratified subsample of the dataset before anything else (0: all; the demo uses 2400)", ge=0)
    seed: int = _opt(0, "seed of the subsample, the global test set and the partition")
    humaneval_problems: int = _opt(0, "python-functions: HumanEval problems each evaluation runs, a subset seeded "
                                   "by data.seed (0: all 164)", ge=0, le=164)

    def __post_init__(self) -> None:
        super().__post_init__()
        source = registry.DATASETS.lookup(self.dataset)
        if source.path == "no" and self.path:
            raise ConfigError(f"data.dataset = {self.dataset!r} does not read data.path = {self.path!r}; unset "
                              "data.path")
        if self.text_column == self.label_column:
            raise ConfigError(f"data.text_column and data.label_column are both {self.text_column!r}; the label "
                              "must come from another column than the text")
        if self.text_pair_column in (self.text_column, self.label_column):
            raise ConfigError(f"data.text_pair_column = {self.text_pair_column!r} is also the text or label column; "
                              "the second text of a pair must come from a column of its own")
        if not source.splits:
            for key, value, default in (("config_name", self.config_name, ""), ("splits", self.splits, ("train",)),
                                        ("test_split", self.test_split, "")):
                if value != default:
                    shown = list(value) if isinstance(value, tuple) else value
                    readers = [n for n, s in registry.DATASETS.items() if s.splits]
                    raise ConfigError(f"data.{key} = {shown!r} applies to the datasets read by the datasets library "
                                      f"(data.dataset = {', '.join(readers)}) only; unset it")
        if (self.partition == "natural-id") != bool(self.partition_column):
            raise ConfigError(f"data.partition = {self.partition!r} and data.partition_column = "
                              f"{self.partition_column!r}: the natural-id partition needs the column of each "
                              "example's owner, and only it reads one")
        if self.partition == "shard" and self.partitioner != "flower":
            raise ConfigError("data.partition = 'shard' is Flower Datasets' ShardPartitioner, which fedlora does not "
                              "reimplement; set data.partitioner = 'flower'")
        if self.partition_column and not source.splits:
            raise ConfigError(f"data.partition_column = {self.partition_column!r} is read from datasets of the "
                              f"datasets library only, not data.dataset = {self.dataset!r}")
        if not self.splits or not all(self.splits):
            raise ConfigError(f"data.splits = {list(self.splits)!r}: name at least one split, e.g. [\"train\"]")
        if self.test_split in self.splits:
            raise ConfigError(f"data.test_split = {self.test_split!r} is also in data.splits; the global test set "
                              "must be a split of its own")
        if bool(self.prompt_column) != bool(self.response_column):
            raise ConfigError(f"data.prompt_column = {self.prompt_column!r} and data.response_column = "
                              f"{self.response_column!r}: set both or neither")
        if self.task == "classification" and source.task == "generation":
            hint = (f"; use data.dataset = {source.classification_twin!r} for classification"
                    if source.classification_twin else "")
            raise ConfigError(f"data.dataset = {self.dataset!r} is a generation task but data.task = "
                              f"'classification'{hint}")
        if self.task == "generation" and source.task == "classification":
            twins = [n for n, s in registry.DATASETS.items() if s.classification_twin == self.dataset]
            hint = f"; use data.dataset = {twins[0]!r}" if twins else ""
            raise ConfigError(f"data.task = 'generation' needs instruction data, and data.dataset = {self.dataset!r} "
                              f"is labelled text{hint}")

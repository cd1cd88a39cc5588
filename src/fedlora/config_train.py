"""The ``[train]`` section: how each client trains locally (steps, batches, optimizer, learning-rate schedule,
memory) and what the server does around it (rounds, sampling, evaluation). Part of the schema of
:mod:`fedlora.config`, which re-exports it."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.config_fields import MAX_BATCH, MAX_COUNT, MAX_SECONDS, MAX_THREADS, MAX_TOKENS, _opt, _Section
from fedlora.errors import ConfigError

LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainConfig(_Section):
    SECTION = "train"
    rounds: int = _opt(8, "federated rounds", ge=1, le=MAX_COUNT)
    clients_per_round: int = _opt(0, "clients sampled per round (0: all)", ge=0, le=MAX_COUNT)
    min_clients: int = _opt(1, "fewest valid updates for a round to count", ge=1, le=MAX_COUNT)
    local_steps: int = _opt(10, "optimizer steps per client per round", ge=1, le=MAX_COUNT)
    batch_size: int = _opt(16, "examples per step", ge=1, le=MAX_BATCH)
    lr: float | None = _opt(None, "learning rate (unset: 3e-3 for lora/rslora, 1e-2 for vera); the peak of "
                                  "train.lr_schedule", gt=0)
    optimizer: str = _opt("adamw", "local optimizer, fresh each round", choices=("adamw", "sgd"))
    weight_decay: float = _opt(0.0, "decoupled weight decay (adamw) or L2 (sgd)", ge=0)
    max_grad_norm: float = _opt(1.0, "gradient clipping by global norm (0: off)", ge=0)
    max_length: int = _opt(64, "tokens per example after truncation (at most the model's position limit)", ge=8,
                           le=MAX_TOKENS)
    eval_every: int = _opt(1, "evaluate every k rounds (and always after the last)", ge=1, le=MAX_COUNT)
    eval_initial: bool = _opt(True, "evaluate before the first round (recorded as round 0)")
    eval_batch_size: int = _opt(64, "examples per evaluation batch", ge=1, le=MAX_BATCH)
    max_new_tokens: int = _opt(0, "generation tasks: most tokens generated per answer (0: the task's default: "
                               "longest reference + 4; math-word 256, python-functions 384)", ge=0, le=MAX_TOKENS)
    seed: int = _opt(0, "seed of client sampling, batches and dropout")
    device: str = _opt("auto", "where to compute", choices=("auto", "cpu", "cuda"))
    dtype: str = _opt("auto", "compute dtype (auto: bf16 where the device has fast bf16 units and no feature of the "
                              "run needs float32 (privacy.dp_sgd), else float32; resolved, with the reason, in the "
                              "run's config.toml)", choices=("auto", "float32", "bfloat16"))
    attention: str = _opt("auto", "attention implementation (auto: the faster one for the device and dtype, "
                                  "measured by benchmarks/throughput.py)", choices=("auto", "eager", "sdpa"))
    threads: int = _opt(0, "torch CPU threads (0: one per available core)", ge=0, le=MAX_THREADS)
    round_timeout: float = _opt(0.0, "seconds a client may take to reply in a round (0: no limit)", ge=0,
                                le=MAX_SECONDS)
    max_update_norm_ratio: float = _opt(0.0, "reject an update whose norm exceeds this × the round's median "
                                             "(0: off)", ge=0)
    micro_batch_size: int = _opt(0, "gradient accumulation: each step's batch of train.batch_size examples is "
                                    "computed in forward/backward passes of at most this many examples, whose "
                                    "gradients sum to the full batch's (same update within float rounding; "
                                    "0: the whole batch in one pass)", ge=0, le=MAX_BATCH)
    gradient_checkpointing: bool = _opt(False, "activation checkpointing in local training (transformers' "
                                               "non-reentrant checkpointing of each layer): less memory for long "
                                               "sequences, one more forward pass per step; same update")
    lr_schedule: str = _opt("constant", "learning rate over the federated run, the same for every client at the same "
                                        "step s = (round - 1) × local_steps + k (k = 0 … local_steps - 1): "
                                        "constant; linear or cosine decay from train.lr after the warm-up towards "
                                        "train.min_lr_ratio × lr at the end of the run (fedlora.schedule)",
                            choices=LR_SCHEDULES)
    warmup_steps: int = _opt(0, "warm-up: the first steps s < warmup_steps of that count run at lr × (s + 1) / "
                                "warmup_steps, then train.lr_schedule applies; at most rounds × local_steps "
                                "(0: none)", ge=0, le=MAX_COUNT)
    min_lr_ratio: float = _opt(0.0, "linear and cosine schedules: the learning rate the decay ends at, as a "
                                    "fraction of train.lr", ge=0.0, le=1.0)

    client_states: str = _opt("auto", "where the embedded runtime keeps the clients' adapter states between their "
                                      "uses: memory, or disk (one safetensors file per client under the run's "
                                      "checkpoint/clients/, a temporary folder without a run directory; memory then "
                                      "grows with the clients per round, not the total); auto: disk when fewer "
                                      "clients take part per round than there are", choices=("auto", "memory", "disk"))
    eval_clients: int = _opt(0, "clients whose own model is evaluated in an evaluated round (0: all): a sample of "
                                "this many, drawn from (train.seed, round), listed in the record's 'evaluated'",
                             ge=0, le=MAX_COUNT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.micro_batch_size > self.batch_size:
            raise ConfigError(f"train.micro_batch_size = {self.micro_batch_size} exceeds train.batch_size = "
                              f"{self.batch_size}; use a value from 1 to {self.batch_size}, or 0 (no accumulation)")
        total = self.rounds * self.local_steps
        if self.warmup_steps > total:
            raise ConfigError(f"train.warmup_steps = {self.warmup_steps} exceeds the run's steps per client "
                              f"(train.rounds × train.local_steps = {total}); use 0 to {total}")

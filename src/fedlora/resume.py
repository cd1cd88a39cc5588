"""What ``fedlora run --resume DIR`` checks before it loads anything.

A resume continues the saved state, so the config it runs with must be the config that produced that state. The
checkpoint stores the resolved config of the run; :func:`check_resume` compares it, key by key, with the run's
``config.toml`` as it is now. Keys that decide the saved state or the data (model, adapter, method, data split,
seeds, optimiser, ...) must not change: a difference is refused with every differing key, its saved and its new
value. :data:`ALLOWED_CHANGES` may change (they decide how long the run goes on or when it evaluates, not what has
been computed); such a change is accepted and recorded in ``resumes.jsonl``. A key added to fedlora after the
checkpoint was written is no change when it holds what the earlier release did (:func:`added_since`), so a run
checkpointed by an earlier release resumes with this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from fedlora.config import Config
from fedlora.errors import FedloraError

# Keys a resumed run may change: more (or fewer, but not fewer than done) rounds, another evaluation schedule, a
# different deadline for slow clients. Nothing computed so far depends on them.
ALLOWED_CHANGES = frozenset({"train.rounds", "train.eval_every", "train.round_timeout"})


def _flat(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in raw.items() for key, value in values.items()}


def config_changes(saved: Mapping[str, Mapping[str, Any]], now: Config) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every key that differs (a key set on one side only too)."""
    a, b = _flat(saved), _flat(now.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def added_since(saved: Mapping[str, Mapping[str, Any]], now: Config, changes: Mapping[str, tuple[Any, Any]]
                ) -> list[str]:
    """Keys of ``changes`` that the checkpoint lacks because they were added to fedlora after it was written (a
    checkpoint of an earlier release), and whose value now is the one the checkpoint's own config gets for them
    today: read with this release and resolved as every config is. Such a key holds what the earlier release
    did, so it is no edit; a key with any other value, or a checkpoint config this release cannot read, stays a
    change."""
    from fedlora.config import from_dict
    from fedlora.errors import ConfigError

    absent = [k for k, (old, _) in changes.items() if k not in _flat(saved)]
    if not absent:
        return []
    try:
        upgraded = _flat(from_dict(saved).resolved().to_dict())
    except (ConfigError, TypeError, ValueError):
        return []
    current = _flat(now.to_dict())
    return [k for k in absent if k in upgraded and upgraded[k] == current.get(k)]


def check_resume(run_dir: Path, config: Config) -> dict[str, Any]:
    """Refuse to resume ``run_dir`` with ``config`` when they do not describe the checkpointed run.

    Verifies the checkpoint's checksum first. Returns what the resume will record: the round it continues from
    (``-1`` when no checkpoint exists yet: the run starts again from round 0) and the allowed changes.
    """
    from fedlora.checkpoint import has_checkpoint, read_checkpoint

    ckpt_dir = run_dir / "checkpoint"
    if not has_checkpoint(ckpt_dir):
        return {"from_round": -1, "changed": {}}
    meta, _ = read_checkpoint(ckpt_dir)
    saved = meta.get("config")
    changes = config_changes(saved, config) if saved is not None else {}
    if saved is not None:
        for key in added_since(saved, config, changes):
            del changes[key]
    refused = {k: v for k, v in changes.items() if k not in ALLOWED_CHANGES}
    if refused:
        shown = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in list(refused.items())[:6])
        more = f" (and {len(refused) - 6} more)" if len(refused) > 6 else ""
        raise FedloraError(f"--resume {str(run_dir)!r}: config.toml no longer matches the checkpointed run ({shown}"
                           f"{more}); undo the edit, or start a new run with --out elsewhere (only "
                           f"{', '.join(sorted(ALLOWED_CHANGES))} may change on resume)")
    done = int(meta["round"])
    if config.train.rounds < done:
        raise FedloraError(f"--resume {str(run_dir)!r}: train.rounds = {config.train.rounds} but the checkpoint is "
                           f"after round {done}; train.rounds must be at least {done}")
    return {"from_round": done, "changed": {k: list(v) for k, v in changes.items()}}

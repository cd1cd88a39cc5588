"""The ``fedlora`` command.

Every :class:`~fedlora.errors.FedloraError` (bad config, missing data, unknown method...) becomes one line on
stderr and exit status 2, with no traceback; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from fedlora.report import RunDir

import warnings

# PEFT calls a transformers API that transformers 5 marks deprecated; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default is exit 2 too, with the usage; keep it short
        self.exit(2, f"fedlora: error: {message}\n")


def add_plugin_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE",
                        help="a Python file that registers methods, adapter kinds, datasets or runtimes "
                             "(repeatable; docs/extending.md)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedlora", description="Federated fine-tuning with LoRA-family adapters.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one experiment (no CONFIG: the default demo)")
    run.add_argument("config", nargs="?", help="TOML file; every key can be overridden with --set")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one key (repeatable), e.g. --set method.name=fedit")
    run.add_argument("--out", help="run directory (default: runs/<method>-<adapter>-<time>)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing non-empty run directory")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR after its last complete round "
                                                     "(its config.toml is used; no CONFIG or --set)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--tensorboard", action="store_true", help="also log the run to <run dir>/tensorboard")
    add_plugin_option(run)

    add_plugin_option(sub.add_parser("methods", help="list the methods, adapter kinds, datasets and runtimes"))
    keys = sub.add_parser("config", help="print the resolved config (after --set) as TOML")
    add_plugin_option(keys)
    keys.add_argument("config", nargs="?")
    keys.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    keys.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
    from fedlora import cli_experiments

    cli_experiments.add_parsers(sub)  # compare, report, analyze
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    """Check everything (config, output folder, lock, checkpoint) before loading a model or writing a file."""
    from fedlora import config as cfgmod
    from fedlora.errors import FedloraError

    if args.resume:
        if args.config or args.overrides or args.out or args.overwrite:
            raise FedloraError("--resume DIR continues DIR with its own config.toml; do not combine it with "
                               "CONFIG, --set, --out or --overwrite (--plugin is allowed: give the run's plugins)")
        resume_dir = Path(args.resume)
        if not (resume_dir / "config.toml").is_file():
            raise FedloraError(f"--resume {str(resume_dir)!r}: no config.toml there (not a fedlora run directory)")
        if (resume_dir / "summary.json").is_file():
            print(f"{resume_dir} is already complete (summary.json exists); nothing to resume")
            return 0
        config = cfgmod.load(resume_dir / "config.toml")
        out = _run_dir(args, resume_dir, resume=True)  # takes the lock: a second --resume is refused here
    else:
        config = cfgmod.load(args.config, args.overrides)
        out_path = Path(args.out) if args.out else Path("runs") / (
            f"{config.method.name}-{config.adapter.kind}-{time.strftime('%Y%m%d-%H%M%S')}")
        out = _run_dir(args, out_path, overwrite=args.overwrite)  # refuse a non-empty folder before any work
    with out:
        summary = _execute(args, config, out)
    return _exit_status(summary)


def _execute(args: argparse.Namespace, config: Any, out: RunDir) -> dict[str, Any]:
    """Run the experiment into the locked ``out`` with the runtime the config names; print the summary table."""
    from rich.console import Console

    from fedlora.registry import RUNTIMES
    from fedlora.report import summary_table

    runtime = RUNTIMES.lookup(config.runtime.kind)
    if args.resume:
        from fedlora.resume import check_resume

        entry = check_resume(out.path, config.resolved())  # checksum and config, before the model is loaded
        out.record_resume({**entry, "time": time.time()})
    summary: dict[str, Any] = runtime.run(config, out, progress=not args.quiet, resume=bool(args.resume))
    console = Console()
    console.print(summary_table([{"method": config.method.name, "adapter": config.adapter.kind, **summary}]))
    console.print(f"run directory: {out.path}")
    return summary


# Exit status of a run that completed without learning anything: every round failed (no valid update ever reached
# the server). Distinct from 0 (success), 2 (refused input) and 130 (interrupted), so that scripts notice.
EXIT_NOTHING_LEARNED = 3


def _exit_status(summary: dict[str, Any]) -> int:
    rounds, failed = int(summary.get("rounds") or 0), list(summary.get("failed_rounds") or [])
    if rounds > 0 and len(failed) >= rounds:
        print(f"fedlora: error: every round failed ({rounds} of {rounds}): no update reached the server, the run "
              "learned nothing (see the 'failed', 'missing' and 'rejected' fields of metrics.jsonl)", file=sys.stderr)
        return EXIT_NOTHING_LEARNED
    return 0


def _run_dir(args: argparse.Namespace, path: Path, **kwargs: bool) -> RunDir:
    """The run directory, logging to TensorBoard too with --tensorboard (a missing package fails here)."""
    from fedlora.report import RunDir

    if not args.tensorboard:
        return RunDir(path, **kwargs)
    from fedlora.runlog import ObservedRunDir, TensorBoardLogger

    return ObservedRunDir(path, observers=[TensorBoardLogger()], **kwargs)


def _cmd_methods(args: argparse.Namespace) -> int:
    """Every registered plugin with its description; methods with the adapter kinds they fit."""
    from fedlora.registry import ADAPTERS, DATASETS, METHODS, RUNTIMES, fitting_adapters

    width = max(len(n) for r in (METHODS, ADAPTERS, DATASETS, RUNTIMES) for n in r)
    print("methods:")
    for name, cls in METHODS.items():
        print(f"  {name:<{width}} {cls.description} [adapters: {', '.join(fitting_adapters(cls))}]")
    for title, reg in (("adapters", ADAPTERS), ("datasets", DATASETS), ("runtimes", RUNTIMES)):
        print(f"{title}:")
        for name, plugin in reg.items():
            print(f"  {name:<{width}} {plugin.description}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from fedlora import config as cfgmod

    if args.keys:
        for key, default, help_ in cfgmod.describe():
            print(f"{key:<32} {default:<22} {help_}")
        return 0
    print(cfgmod.dumps(cfgmod.load(args.config, args.overrides).resolved()), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from fedlora.errors import FedloraError

    from fedlora.cli_experiments import COMMANDS

    args = _parser().parse_args(argv)
    try:
        if getattr(args, "plugins", None):  # before any config is read: a plugin may define what it names
            from fedlora.registry import load_plugin

            for path in args.plugins:
                load_plugin(path)
        return {"run": _cmd_run, "methods": _cmd_methods, "config": _cmd_config, **COMMANDS}[args.command](args)
    except FedloraError as e:
        print(f"fedlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The experiment subcommands of ``fedlora``: ``compare``, ``report``, ``analyze asymmetry``, ``export`` and
``evaluate``.

Kept apart from :mod:`fedlora.cli` so that the command-line entry point stays small; :func:`add_parsers` adds
the subcommands and :data:`COMMANDS` maps each to its handler. Errors are :class:`~fedlora.errors.FedloraError`
(one line, exit 2, printed by ``cli.main``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

SET_HELP = "override one key (repeatable), e.g. --set train.rounds=5"


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from fedlora.registry import ADAPTERS

    cmp = sub.add_parser("compare", help="run a grid of methods × adapters × seeds and tabulate it (resumable)")
    cmp.add_argument("config", nargs="?", help="TOML file (no CONFIG: the defaults); --set overrides keys")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help=SET_HELP)
    cmp.add_argument("--methods", help="comma-separated methods (default: every registered method)")
    cmp.add_argument("--adapters", default=None,
                     help=f"comma-separated adapters from {', '.join(ADAPTERS)} (default: the config's)")
    cmp.add_argument("--seeds", default="0", help="comma-separated seeds or a range like 0-2 (default: 0); a seed "
                                                  "sets data.seed, train.seed and adapter.seed")
    cmp.add_argument("--out", required=True, help="comparison directory; run it again to finish an interrupted grid")
    cmp.add_argument("--tensorboard", action="store_true", help="also log every run to <run dir>/tensorboard")
    cmp.add_argument("--quiet", action="store_true", help="no progress bar")
    from fedlora.cli import add_plugin_option

    add_plugin_option(cmp)

    rep = sub.add_parser("report", help="rebuild results.csv/.md and the plots from finished run directories")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or a compare directory")
    rep.add_argument("--out", help="where to write (default: the compare directory, when one is given)")

    ana = sub.add_parser("analyze", help="analyses of local training")
    ana_sub = ana.add_subparsers(dest="analysis", required=True)
    asym = ana_sub.add_parser("asymmetry", help="A vs B similarity across clients trained locally (FedSA-LoRA's "
                                                "observation)")
    asym.add_argument("config", nargs="?", help="TOML file (no CONFIG: the defaults)")
    asym.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help=SET_HELP)
    asym.add_argument("--out", required=True, help="folder for asymmetry.csv, asymmetry.json and asymmetry.png")
    asym.add_argument("--quiet", action="store_true", help="no progress bar")

    exp = sub.add_parser("export", help="write a run's saved global or client model as a directory that plain "
                                        "transformers / PEFT load (no fedlora needed)")
    exp.add_argument("run", metavar="RUN", help="a finished run directory")
    _which_model(exp)
    exp.add_argument("--out", required=True, help="the new directory (must not hold files)")
    exp.add_argument("--merged", action="store_true", help="merge the adapter into the weights: one model "
                                                           "directory (default: base/ + the PEFT adapter)")

    ev = sub.add_parser("evaluate", help="recompute the metrics of a run's saved (or an exported) model on the "
                                         "run's own test split or on a new file; prints JSON")
    ev.add_argument("run", metavar="RUN", help="a run directory (its config.toml gives model and data)")
    _which_model(ev)
    ev.add_argument("--model", metavar="DIR", help="an exported directory (fedlora export) instead of the saved model")
    ev.add_argument("--data", metavar="FILE", help="a labelled csv / jsonl file (the run's columns and labels; an "
                                                   "instruction file for generation runs) instead of the run's split")


def _which_model(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--global", dest="global_model", action="store_true", help="the global model")
    group.add_argument("--client", type=int, metavar="K", help="client K's own model")


def _print_tables(out: Path) -> None:
    text = (out / "results.md").read_text(encoding="utf-8")
    print("\n".join(line for line in text.splitlines() if line.startswith(("|", "##"))))
    print(f"\nwritten to {out}: results.csv, results.md, runs.csv, accuracy_vs_round.png, accuracy_vs_bytes.png")


def _cmd_compare(args: argparse.Namespace) -> int:
    from fedlora import config as cfgmod
    from fedlora.compare import compare, parse_names, parse_seeds
    from fedlora.methods import METHODS

    base = cfgmod.load(args.config, args.overrides)
    methods = parse_names(args.methods, "--methods") if args.methods else list(METHODS)
    adapters = parse_names(args.adapters, "--adapters") if args.adapters else [base.adapter.kind]
    out = Path(args.out)
    compare(base, methods, adapters, parse_seeds(args.seeds), out, progress=not args.quiet,
            tensorboard=args.tensorboard)
    _print_tables(out)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fedlora.errors import FedloraError
    from fedlora.results import write_report

    paths = [Path(p) for p in args.runs]
    if args.out:
        out = Path(args.out)
    elif len(paths) == 1 and (paths[0] / "runs").is_dir():
        out = paths[0]
    else:
        raise FedloraError("give --out DIR (the default is the compare directory, when exactly one is given)")
    _, incomplete = write_report(paths, out)
    for p in incomplete:
        print(f"left out (incomplete, no summary.json): {p}")
    _print_tables(out)
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from fedlora import config as cfgmod
    from fedlora.analyze import asymmetry

    summary = asymmetry(cfgmod.load(args.config, args.overrides), args.out, progress=not args.quiet)
    from fedlora.registry import ADAPTERS

    a_name, b_name = ADAPTERS.lookup(summary["adapter"]).side_names
    print(f"mean pairwise cosine similarity over {summary['layers']} layers and {summary['num_clients']} clients:")
    print(f"  learned:       {a_name} {summary['a_similarity']:.3f}   {b_name} {summary['b_similarity']:.3f}")
    print(f"  change (−init): {a_name} {summary['a_change_similarity']:.3f}   "
          f"{b_name} {summary['b_change_similarity']:.3f}")
    print(f"written to {args.out}: asymmetry.csv, asymmetry.json, asymmetry.png")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from fedlora.export import export

    info = export(args.run, None if args.global_model else args.client, args.out, merged=args.merged)
    print(json.dumps(info, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from fedlora.export import evaluate

    result = evaluate(args.run, None if args.global_model else args.client, args.model, args.data)
    print(json.dumps(result, indent=2))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "compare": _cmd_compare, "report": _cmd_report, "analyze": _cmd_analyze, "export": _cmd_export,
    "evaluate": _cmd_evaluate}

"""The `terarec` command line: data, train, serve, deploy.

Bad input ends with a one-line message naming what was wrong and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from terarec.core.config import ConfigError, load_config
from terarec.core.errors import UserError

TRAIN_FLAGS = {  # flag -> config key
    "model": "model", "data": "data", "run_dir": "run_dir", "steps": "steps", "batch_size": "batch_size",
    "workers": "workers", "seed": "seed",
}


def _add_train(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a model on a local Ray or a cluster")
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--config-json", help="the whole config as one JSON object (what the control plane submits)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key (dotted, YAML value), e.g. --set embedding.dim=32")
    train.add_argument("--model", help="dlrm, lr, ... (see `terarec models`)")
    train.add_argument("--data", help="data directory with train/ and eval/")
    train.add_argument("--run-dir", help="where checkpoints, logs and metrics.json go")
    train.add_argument("--steps", type=int)
    train.add_argument("--batch-size", type=int, help="global batch size")
    train.add_argument("--workers", type=int, help="number of workers (or --set workers=[min,max])")
    train.add_argument("--seed", type=int)
    train.add_argument("--resume", nargs="?", const="latest", help="resume from a checkpoint dir (default: latest)")
    train.set_defaults(func=_train)


def _train(args) -> int:
    flags = {key: getattr(args, flag) for flag, key in TRAIN_FLAGS.items()}
    flags["resume_from"] = args.resume
    tree = parse_json_config(args.config_json) if args.config_json else None
    config = load_config(args.config, args.set, flags, tree)
    from .runner import run_training

    metrics = run_training(config)
    if metrics.get("stopped_early"):
        print(f"[terarec] {metrics['stopped_early']}")
    summary = {k: metrics.get(k) for k in ("model", "steps", "auc", "logloss", "samples_per_s", "train_rows",
                                           "best_auc", "best_step")}
    print(f"[terarec] done: {json.dumps(summary)}")
    print(f"[terarec] metrics: {config.run_dir}/metrics.json")
    return 0


def parse_json_config(text: str) -> dict:
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--config-json is not valid JSON: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError("--config-json must be a JSON object")
    return tree


def _models(args) -> int:
    from terarec.models.registry import MODELS

    for name, spec in sorted(MODELS.items()):
        print(f"{name:10s} {spec.cls.__doc__.strip().splitlines()[0] if spec.cls.__doc__ else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="terarec", description="Train and serve recommender models with huge embedding tables on Ray.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    data = subparsers.add_parser("data", help="make or convert datasets")
    from .data_cli import register as register_data

    register_data(data.add_subparsers(dest="data_command", required=True))
    _add_train(subparsers)
    from .plan import register as register_plan

    register_plan(subparsers)
    subparsers.add_parser("models", help="list the model zoo").set_defaults(func=_models)
    try:
        from terarec.api.cli import register as register_api
    except ImportError:
        register_api = None
    if register_api is not None:
        register_api(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .runner import JobFailedError

    try:
        code = args.func(args)
    except (UserError, FileNotFoundError) as error:
        print(f"terarec {args.command}: error: {error}", file=sys.stderr)
        code = 2
    except JobFailedError as error:
        print(f"terarec {args.command}: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()

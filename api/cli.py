"""`terarec serve` (the control plane under uvicorn) and `terarec deploy` (a checkpoint onto Ray Serve)."""
from __future__ import annotations

import json
import os

from terarec.actors.serve_env import use_serve_env
from terarec.core.errors import UserError


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the REST control plane (jobs, models, predict)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--token-file", help="file holding the API bearer token (default: $TERAREC_API_TOKEN)")
    serve.add_argument("--db", help="SQLite file of job records (default: $TERAREC_DB_PATH, or jobs.db in the state "
                                    "directory $TERAREC_HOME, ~/.local/share/terarec)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="uvicorn's log level (info logs every request)")
    serve.set_defaults(func=_serve)

    deploy = subparsers.add_parser("deploy", help="serve a checkpoint with Ray Serve on the running cluster")
    deploy.add_argument("checkpoint", help="a checkpoint directory (meta.json, dense.pt, shard-*.pt), or `best` "
                                          "(the best eval AUC of a keep_best run) or `latest` of --run-dir")
    deploy.add_argument("--run-dir", default="runs/latest", help="the run whose `best` or `latest` checkpoint to serve")
    deploy.add_argument("--name", required=True, help="model name; an existing one is rolled out to this checkpoint")
    deploy.add_argument("--replicas", type=int, default=1, help="Serve replicas of the dense model")
    deploy.add_argument("--servers", type=int, help="embedding server actors (default: the checkpoint's world size)")
    deploy.add_argument("--store", choices=["device", "cached_host", "cached_ssd"],
                        help="the servers' store (default: device, every row in memory)")
    deploy.add_argument("--cache-bytes", type=float, help="a tiered server's cache in bytes (or a fraction of free memory)")
    deploy.add_argument("--store-path", help="directory of the servers' SSD tables (cached_ssd)")
    deploy.add_argument("--cpus", type=float, default=1, help="CPUs per replica")
    deploy.add_argument("--gpus", type=float, default=0, help="GPUs per replica (the dense model runs on it)")
    deploy.add_argument("--timeout", type=float, default=120, help="give up (exit 2) after waiting this many seconds "
                                                                   "for the replicas' and servers' resources")
    deploy.add_argument("--server-gpus", type=float, default=0, help="GPUs per embedding server (its store on it)")
    deploy.set_defaults(func=_deploy)


def _settings(**values):
    from pydantic import ValidationError

    from terarec.core.config import format_validation_error

    from .settings import Settings

    try:
        return Settings(**{key: value for key, value in values.items() if value is not None})
    except ValidationError as error:
        raise UserError(format_validation_error(error).replace("config field", "setting")) from None


def _serve(args) -> int:
    import uvicorn

    from .app import create_app
    from .ray_cluster import use_token_auth

    settings = _settings(api_token_file=args.token_file, db_path=args.db)
    use_token_auth(settings)
    use_serve_env()
    try:
        app = create_app(settings)
    except (ValueError, OSError) as error:
        raise UserError(str(error)) from None
    print(f"[terarec] serve: listening on http://{args.host}:{args.port}; job records in {settings.job_db} "
          f"(state directory {settings.home})", flush=True)
    # h11 bounds a request's head (httptools reads any size): a huge header without a token costs nothing.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, http="h11",
                h11_max_incomplete_event_size=settings.max_header_bytes)
    return 0


def _deploy(args) -> int:
    from pydantic import ValidationError

    from terarec.core.checkpoints import find_checkpoint
    from terarec.core.config import format_validation_error

    from .errors import Unprocessable
    from .ray_cluster import RayCluster, RayUnavailable, use_token_auth
    from .schemas import ModelRequest
    from .services.models import check_checkpoint

    checkpoint = os.path.abspath(find_checkpoint(args.run_dir, args.checkpoint))
    try:
        store = {"kind": args.store, "cache_bytes": args.cache_bytes, "path": args.store_path} if args.store else None
        request = ModelRequest(name=args.name, checkpoint=checkpoint, replicas=args.replicas, servers=args.servers,
                               store=store, server_gpus=args.server_gpus,
                               serving={"cpus": args.cpus, "gpus": args.gpus, "deploy_timeout_s": args.timeout})
        check_checkpoint(request.checkpoint)  # a wrong path fails here, before joining the cluster
    except ValidationError as error:
        raise UserError(format_validation_error(error).replace("config field", "argument")) from None
    except Unprocessable as error:
        raise UserError(error.detail) from None
    settings = _settings()
    use_token_auth(settings)
    use_serve_env()
    try:
        RayCluster(settings).connect_driver()
    except RayUnavailable as error:
        raise UserError(str(error)) from None
    from terarec.actors.inference import deploy_model

    served = deploy_model(request.name, request.checkpoint, request.replicas, request.servers, store=request.store,
                          server_gpus=request.server_gpus, settings=request.serving,
                          say=lambda line: print(line, flush=True))
    print(f"[terarec] serving: {json.dumps(served)}")
    return 0

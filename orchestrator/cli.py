"""`tidal`: serve a model on many instances, and talk to a running deployment.

    tidal serve     [--model M] [--instances N] [--port P] [--http-port H] [--ray-address A] [--config FILE] ...
    tidal generate  "prompt" [--addr A] [--max-tokens N] [--temperature T] [--seed S] [--priority P]
    tidal status    [--addr A]
    tidal bench replay --trace azure-conv|burstgpt|mooncake|FILE [--rate-scale X] [--duration S] [--addr A] ...
    tidal drain INSTANCE | undrain INSTANCE | rebalance | migrate REQUEST_ID [--to INSTANCE]
    tidal set-role INSTANCE prefill|decode|both
    tidal scale --instances N
    tidal scale INSTANCE --ep N [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

import grpc

from instance.limits import MAX_MODEL_LEN_CAP
from orchestrator.bench.report import format_table
from orchestrator.config import DEFAULT_HTTP_PORT, DEFAULT_PORT, ConfigError, default_addr, load_config
from orchestrator.security import add_connection_args, client_channel, exposure_warning

EXIT_USAGE, EXIT_FAILED = 2, 1


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="start a deployment and serve it over gRPC until interrupted")
    p.add_argument("--config", help="YAML or TOML file of settings; flags override it")
    p.add_argument("--model", help="smollm2-135m (default), smollm2-135m-moe, tiny-llama, tiny-moe, or a path to "
                   "a .gguf file / HF directory")
    p.add_argument("--backend", choices=["native", "vllm"], help="engine of every instance: native (default) or "
                   "vllm (an in-process vLLM LLMEngine; live migration included)")
    p.add_argument("--instances", type=int, help="serving instances (default 2)")
    p.add_argument("--host", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, help=f"gRPC port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--http-port", type=int, help=f"HTTP port of the OpenAI-compatible API and /metrics (default "
                   f"{DEFAULT_HTTP_PORT}; 0 picks a free one)")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--deployment", help="name of the deployment (prefix of its Ray actors; default tidal)")
    p.add_argument("--dispatch-policy", choices=["round-robin", "least-load", "freeness", "prefix-aware"],
                   help="how new requests pick an instance (default freeness; prefix-aware: where the prompt's "
                        "prefix is cached, against the load there)")
    p.add_argument("--dispatch-prefix-weight", type=float,
                   help="prefix-aware dispatch: a cached prompt token's worth against a queued one (default 1)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
                   help="compute every prompt in full (prefix caching is on by default)")
    p.add_argument("--kv-cache-gib", type=float, help="KV-cache memory per instance in GiB (default 1.0)")
    p.add_argument("--num-blocks", type=int, help="KV-cache blocks per instance (overrides --kv-cache-gib)")
    p.add_argument("--block-size", type=int, help="tokens per KV block (default 16)")
    p.add_argument("--max-model-len", type=int, help="prompt + output limit (default: the model's, at most "
                   f"{MAX_MODEL_LEN_CAP})")
    p.add_argument("--max-num-seqs", type=int, help="requests batched at once per instance (default 64)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--num-cpus-per-instance", type=float, help="Ray CPUs per instance (default 1)")
    p.add_argument("--num-gpus-per-instance", type=float, help="Ray GPUs per instance (default 1 on cuda)")
    p.add_argument("--max-queue-per-instance", type=int, help="queued requests before RESOURCE_EXHAUSTED")
    p.add_argument("--restart-dead-instances", action="store_true", default=None,
                   help="replace an instance that died with a new one")
    p.add_argument("--state-store", help="ray (GCS internal KV, default) or redis://host:port/db")
    p.add_argument("--prefill-instances", type=int,
                   help="instances that only prefill and hand each request to a decode instance (default 0)")
    p.add_argument("--decode-instances", type=int, help="instances that take hand-overs and decode (default 0); "
                   "--instances defaults to prefill + decode, any more do both")
    p.add_argument("--pd-adaptive", action="store_true", default=None,
                   help="switch instances between prefill and decode by which one is the bottleneck")
    p.add_argument("--api-key-file", help="data-plane API keys, one per line (also $TIDAL_API_KEYS, comma-separated)")
    p.add_argument("--admin-key-file", help="admin keys, one per line (also $TIDAL_ADMIN_KEYS)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve gRPC over TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    p.add_argument("--audit-log", help="append a JSON line per admin call to this file")


def _add_client(sub) -> None:
    g = sub.add_parser("generate", help="stream a completion to stdout")
    g.add_argument("prompt")
    g.add_argument("--addr", default=default_addr(), help="server address (default $TIDAL_ADDR or 127.0.0.1:50051)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--priority", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    g.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    s = sub.add_parser("status", help="show the instances and the migrations of a running deployment")
    s.add_argument("--addr", default=default_addr())
    s.add_argument("--json", action="store_true", help="print JSON instead of tables")
    d = sub.add_parser("drain", help="stop dispatching to an instance and migrate its requests away")
    d.add_argument("instance")
    u = sub.add_parser("undrain", help="dispatch to a drained instance again")
    u.add_argument("instance")
    r = sub.add_parser("rebalance", help="run the migration policy now and show the moves")
    m = sub.add_parser("migrate", help="live-migrate one running request")
    m.add_argument("request_id")
    m.add_argument("--to", help="destination instance (default: the scheduler picks)")
    sr = sub.add_parser("set-role", help="make an instance prefill, decode or both; what no longer fits moves")
    sr.add_argument("instance")
    sr.add_argument("role", choices=["prefill", "decode", "both"])
    sc = sub.add_parser("scale", help="run N instances (a removed one is drained by migration first), or run an "
                                      "MoE instance's experts on N ranks (INSTANCE --ep N) while it serves")
    sc.add_argument("instance", nargs="?", help="with --ep: the MoE instance whose expert parallelism to change")
    sc.add_argument("--instances", type=int, help="how many instances to run")
    sc.add_argument("--ep", type=int, help="EP size: the leader plus N-1 expert workers")
    sc.add_argument("--dry-run", action="store_true", help="with --ep: show the moves, change nothing")
    for p in (d, u, r, m, sr, sc):
        p.add_argument("--addr", default=default_addr())
        p.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    for p in (g, s, d, u, r, m, sr, sc):
        add_connection_args(p)



def _add_bench(sub) -> None:
    from orchestrator.bench.replay import add_parser

    add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidal", description="Serve an LLM on many instances with live migration.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_client(sub)
    _add_bench(sub)
    return parser


def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"tidal serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    from orchestrator.deployment import Deployment, DeploymentError

    deployment = Deployment(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    warning = exposure_warning(config.host, config.security)
    if warning:
        print(f"tidal: {warning}", file=sys.stderr, flush=True)
        logging.getLogger("tidal.security").warning(warning)
    print(f"tidal: starting {config.instances} x {config.engine.model} on "
          f"{config.ray_address or 'a local Ray'} ...", flush=True)
    try:
        port = deployment.start()
    except DeploymentError as e:
        print(f"tidal serve: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"tidal: listening on {config.host}:{port} (gRPC: tidal.v1.GenerationService, tidal.v1.AdminService, "
          f"health, reflection)", flush=True)
    print(f"tidal: HTTP on {config.host}:{deployment.http_port} (OpenAI API /v1/completions, "
          f"/v1/chat/completions, /v1/models; /health, /metrics)", flush=True)
    print(f"tidal: ready — {config.instances} instances, dispatch {config.dispatch_policy}", flush=True)
    stop.wait()
    print(f"tidal: shutting down (grace period {config.grace_period_s:.0f} s)", flush=True)
    deployment.stop()
    import ray

    ray.shutdown()
    print("tidal: stopped", flush=True)
    return 0


def _channel(args) -> grpc.Channel:
    try:
        return client_channel(args.addr, args.api_key, args.tls, args.tls_ca, args.tls_cert, args.tls_key)
    except ValueError as e:
        raise SystemExit(f"tidal {args.command}: {e}") from None


def _rpc_failed(cmd: str, addr: str, e: grpc.RpcError) -> int:
    if e.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (e.details() or "").lower():
        print(f"tidal {cmd}: no server at {addr}; start one with `tidal serve` or pass --addr", file=sys.stderr)
    else:
        print(f"tidal {cmd}: {e.code().name}: {e.details()}", file=sys.stderr)
    return EXIT_FAILED


def cmd_generate(args) -> int:
    from tidal.v1 import generation_pb2, generation_pb2_grpc

    sampling = generation_pb2.SamplingParams(temperature=args.temperature, top_k=args.top_k)
    if args.top_p is not None:
        sampling.top_p = args.top_p
    req = generation_pb2.GenerateRequest(max_tokens=args.max_tokens, sampling=sampling, priority=args.priority,
                                         stop=args.stop)
    if args.chat:
        req.chat.messages.add(role="user", content=args.prompt)
    else:
        req.prompt = args.prompt
    if args.seed is not None:
        req.seed = args.seed
    with _channel(args) as ch:
        try:
            for chunk in generation_pb2_grpc.GenerationServiceStub(ch).Generate(req, timeout=args.timeout):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except grpc.RpcError as e:
            sys.stdout.write("\n")
            return _rpc_failed("generate", args.addr, e)
    sys.stdout.write("\n")
    return 0


def format_status(instances) -> str:
    """A table of admin_pb2.Instance messages. CACHED: free blocks that still hold a prefix; PREFIX HIT: the share
    of admitted prompt tokens found cached ("-" before any admission or with prefix caching off)."""
    from tidal.v1 import admin_pb2

    rows = [("INSTANCE", "NODE", "STATE", "ROLE", "RUNNING", "WAITING", "FREE/TOTAL BLOCKS", "CACHED", "PREFIX HIT",
             "TOKENS/S")]
    for inst in instances:
        load = inst.load
        state = admin_pb2.InstanceState.Name(inst.state).removeprefix("INSTANCE_STATE_").lower()
        role = admin_pb2.InstanceRole.Name(inst.role).removeprefix("INSTANCE_ROLE_").lower()
        hit = (f"{100 * load.prefix_hit_tokens / load.prefix_query_tokens:.0f}%" if load.prefix_query_tokens
               else "-")
        rows.append((inst.instance_id, inst.node_ip or inst.node_id[:12], state, role, str(load.num_running),
                     str(load.num_waiting), f"{load.free_blocks}/{load.total_blocks}", str(load.cached_blocks), hit,
                     f"{load.tokens_per_s:.0f}"))
    return format_table(rows, right_align=False)


def cmd_status(args) -> int:
    from google.protobuf.json_format import MessageToDict

    from tidal.v1 import admin_pb2, admin_pb2_grpc

    with _channel(args) as ch:
        try:
            resp = admin_pb2_grpc.AdminServiceStub(ch).ListInstances(admin_pb2.ListInstancesRequest(), timeout=10)
        except grpc.RpcError as e:
            return _rpc_failed("status", args.addr, e)
        try:      # migrations are the scheduler's: while it restarts, the instance table still shows
            migrations = admin_pb2_grpc.AdminServiceStub(ch).ListMigrations(admin_pb2.ListMigrationsRequest(),
                                                                            timeout=10)
            missing = None
        except grpc.RpcError as e:
            migrations, missing = admin_pb2.ListMigrationsResponse(), e.details() or e.code().name
    if args.json:
        out = {**MessageToDict(resp), **MessageToDict(migrations)}
        if missing:
            out["migrations_unavailable"] = missing
        print(json.dumps(out, indent=2))
        return 0
    print(format_status(resp.instances))
    experts = format_experts(resp.instances)
    if experts:
        print(f"\nexpert parallelism:\n{experts}")
    if resp.control_plane.target_instances:
        print(f"\n{format_scaling(resp.control_plane)}")
    for line in control_plane_problems(resp.control_plane):
        print(f"\n{line}")
    if missing:
        print(f"\nmigrations: unavailable ({missing})")
        return 0
    print(f"\nmigrations in flight: {len(migrations.in_flight)}")
    if migrations.in_flight:
        print(format_migrations(migrations.in_flight))
    recent = list(migrations.recent)[-10:]
    print(f"\nrecent migrations (last {len(recent)} of {len(migrations.recent)}):")
    if recent:
        print(format_migrations(recent))
    return 0


def control_plane_problems(cp) -> list[str]:
    """What is wrong with the scheduler or its state store, in sentences (nothing when all is well)."""
    problems = []
    if not cp.scheduler_reachable:
        problems.append(f"scheduler: no table for {cp.scheduler_silent_s:.0f} s (restarting?); serving goes on "
                        "with the last instance table")
    if cp.state_store and not cp.state_store_reachable:
        problems.append(f"state store {cp.state_store}: unreachable ({cp.state_store_error}); serving goes on, "
                        f"{cp.unwritten_intent} target-state records will be written once it is back")
    return problems


def format_scaling(cp) -> str:
    """The scaling line of `tidal status`: target, the operation in flight, the last decision and why."""
    line = f"scaling: {cp.target_instances} instances, autoscale {'on' if cp.autoscale else 'off'}"
    if cp.scaling:
        line += f"; in flight: {cp.scaling}"
    if cp.last_scale_decision:
        line += f"; last decision {cp.last_scale_age_s:.0f} s ago: {cp.last_scale_decision}"
    return line


def format_migrations(records) -> str:
    from tidal.v1 import admin_pb2

    rows = [("MIGRATION", "REQUEST", "FROM", "TO", "STATE", "STAGES", "BLOCKS", "DOWNTIME MS", "REASON")]
    for r in records:
        state = admin_pb2.MigrationState.Name(r.state).removeprefix("MIGRATION_STATE_").lower()
        rows.append((r.migration_id, r.request_id, r.src, r.dst, state, str(r.stages), str(r.blocks_copied),
                     f"{r.downtime_ms:.1f}", r.reason))
    return format_table(rows, right_align=False)


def _admin(args, method: str, request):
    from tidal.v1 import admin_pb2_grpc

    with _channel(args) as ch:
        return getattr(admin_pb2_grpc.AdminServiceStub(ch), method)(request, timeout=args.timeout)


def cmd_drain(args) -> int:
    from tidal.v1 import admin_pb2

    try:
        r = _admin(args, "DrainInstance", admin_pb2.DrainInstanceRequest(instance_id=args.instance))
    except grpc.RpcError as e:
        return _rpc_failed("drain", args.addr, e)
    print(f"drained {r.instance_id}: {len(r.moved)} moved, {len(r.not_moved)} could not move, "
          f"{r.remaining} remaining")
    if r.moved:
        print(format_migrations(r.moved))
    for nm in r.not_moved:
        print(f"  not moved: {nm.request_id}: {nm.reason}")
    return 0 if r.remaining == 0 else EXIT_FAILED


def cmd_undrain(args) -> int:
    from tidal.v1 import admin_pb2

    try:
        r = _admin(args, "UndrainInstance", admin_pb2.UndrainInstanceRequest(instance_id=args.instance))
    except grpc.RpcError as e:
        return _rpc_failed("undrain", args.addr, e)
    print(f"{args.instance}: {admin_pb2.InstanceState.Name(r.state).removeprefix('INSTANCE_STATE_').lower()}")
    return 0


def cmd_set_role(args) -> int:
    from tidal.v1 import admin_pb2

    role = admin_pb2.InstanceRole.Value(f"INSTANCE_ROLE_{args.role.upper()}")
    try:
        r = _admin(args, "SetRole", admin_pb2.SetRoleRequest(instance_id=args.instance, role=role))
    except grpc.RpcError as e:
        return _rpc_failed("set-role", args.addr, e)
    before = admin_pb2.InstanceRole.Name(r.previous).removeprefix("INSTANCE_ROLE_").lower()
    print(f"{args.instance}: {before} -> {args.role}")
    return 0


def cmd_rebalance(args) -> int:
    from tidal.v1 import admin_pb2

    try:
        r = _admin(args, "Rebalance", admin_pb2.RebalanceRequest())
    except grpc.RpcError as e:
        return _rpc_failed("rebalance", args.addr, e)
    print(f"rebalance: {len(r.migrations)} migrations")
    if r.migrations:
        print(format_migrations(r.migrations))
    return 0


def cmd_migrate(args) -> int:
    from tidal.v1 import admin_pb2

    try:
        r = _admin(args, "MigrateRequest", admin_pb2.MigrateRequestRequest(request_id=args.request_id,
                                                                          to_instance_id=args.to or ""))
    except grpc.RpcError as e:
        return _rpc_failed("migrate", args.addr, e)
    print(format_migrations([r.migration]))
    return 0 if r.migration.state == admin_pb2.MIGRATION_STATE_COMMITTED else EXIT_FAILED


def cmd_scale(args) -> int:
    from tidal.v1 import admin_pb2

    if (args.ep is None) == (args.instances is None) or (args.ep is not None) != (args.instance is not None):
        print("tidal scale: give either --instances N, or INSTANCE --ep N [--dry-run]", file=sys.stderr)
        return EXIT_FAILED
    if args.ep is not None:
        return scale_experts(args)
    try:
        r = _admin(args, "ScaleInstances", admin_pb2.ScaleInstancesRequest(instances=args.instances))
    except grpc.RpcError as e:
        return _rpc_failed("scale", args.addr, e)
    print(f"scale: {r.previous} -> {r.instances} instances ({r.reason})")
    if r.added:
        print(f"  added: {', '.join(r.added)}")
    if r.removed:
        print(f"  removed: {', '.join(r.removed)} (drained by live migration)")
    for nm in r.not_moved:
        print(f"  finished in place: {nm.request_id}: {nm.reason}")
    return 0 if r.instances == args.instances else EXIT_FAILED


def scale_experts(args) -> int:
    from tidal.v1 import admin_pb2

    try:
        r = _admin(args, "ScaleExperts", admin_pb2.ScaleExpertsRequest(instance_id=args.instance, ep_size=args.ep,
                                                                       dry_run=args.dry_run))
    except grpc.RpcError as e:
        return _rpc_failed("scale", args.addr, e)
    print(f"scale {r.instance_id}: EP {r.previous} -> {r.ep_size if not args.dry_run else args.ep} ({r.result}); "
          f"{len(r.moves)} experts {'would move' if args.dry_run else 'moved'} ({r.bytes_moved / 1e6:.1f} MB) "
          f"over {', '.join(r.ranks)}")
    if not args.dry_run and r.ok and r.result != "no-op":
        print(f"  prepare {r.prepare_ms:.0f} ms, copy while serving {r.transfer_ms:.0f} ms, switch "
              f"{r.switch_ms:.1f} ms, total {r.total_ms:.0f} ms")
    if args.dry_run:
        for m in r.moves[:20]:
            print(f"  layer {m.layer} expert {m.expert}: {m.src} -> {m.dst}")
    return 0 if r.ok else EXIT_FAILED


def format_experts(instances) -> str:
    """Expert parallelism of the MoE instances: EP size, and each rank's experts and load share."""
    rows = [("INSTANCE", "EP", "RANK", "PID", "EXPERTS", "LOAD", "PLACEMENT (layer:experts)")]
    notes = []
    for inst in instances:
        x = inst.experts
        if not inst.HasField("experts"):
            continue
        size = f"{x.ep_size}" + (f" (target {x.target})" if x.target != x.ep_size else "")
        for r in x.ranks:
            placement = " ".join(r.layers[:3]) + (" ..." if len(r.layers) > 3 else "")
            rows.append((inst.instance_id, size, r.rank, str(r.pid), str(r.experts), f"{100 * r.load_share:.0f}%",
                         placement))
        note = (f"{inst.instance_id}: max EP {x.max_size}, {x.warm_workers} warm workers, remote wait "
                f"{x.remote_ms_per_layer:.2f} ms per layer, {x.workers_lost} workers lost")
        if x.scaling:
            note += f"; scaling {x.scaling}"
        if x.last_scale:
            note += f"; last: {x.last_scale}"
        notes.append(note)
    if not notes:
        return ""
    return format_table(rows, right_align=False) + "\n" + "\n".join(notes)


def cmd_bench(args) -> int:
    from orchestrator.bench.replay import main as bench_main

    return bench_main(args)


COMMANDS = {"serve": cmd_serve, "generate": cmd_generate, "status": cmd_status, "drain": cmd_drain,
            "bench": cmd_bench,
            "undrain": cmd_undrain, "rebalance": cmd_rebalance, "migrate": cmd_migrate, "set-role": cmd_set_role,
            "scale": cmd_scale}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""Who may call what: API keys for the data plane, admin keys for the admin plane, TLS, and the audit log.

Keys are bearer tokens (`authorization: Bearer <key>`), kept only as SHA-256 hashes and compared in constant
time against every hash. The planes:
- data (`tidal.v1.GenerationService`, the HTTP `/v1/*` routes): an API key or an admin key;
- admin (`tidal.v1.AdminService`, admin HTTP routes): an admin key; a data key gets PERMISSION_DENIED / 403;
- open: health, liveness, `/metrics`, `/version` and gRPC reflection, so probes and scrapers need no key.
With no key configured at all both planes are open (a local quick start); with keys but no admin key the
admin plane refuses every call. Keys come from `--api-key-file` / `--admin-key-file` (one key per line, `#`
comments) and the environment (`TIDAL_API_KEYS`, `TIDAL_ADMIN_KEYS`, comma-separated); `load_config` reads
the environment, the frontend reads the files (it runs where `tidal serve` runs).

Every admin call is written to the audit log ("tidal.audit" logger, and as a JSON line to `audit_log` when
set): who (the key's hash prefix, never the key), from where, the operation and its arguments, the result.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import text_format
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)
audit_log = logging.getLogger("tidal.audit")

API_KEYS_ENV, ADMIN_KEYS_ENV, CLIENT_KEY_ENV = "TIDAL_API_KEYS", "TIDAL_ADMIN_KEYS", "TIDAL_API_KEY"
DATA, ADMIN = "data", "admin"
ADMIN_SERVICE = "/tidal.v1.AdminService/"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ARGS_LIMIT = 300              # characters of an admin call's arguments in an audit line


class SecurityConfig(BaseModel):
    """The `security:` section of the config file (and the serve flags of the same names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key_file: str | None = Field(None, description="file of data-plane API keys, one per line")
    admin_key_file: str | None = Field(None, description="file of admin keys, one per line")
    api_key_hashes: tuple[str, ...] = Field((), description="SHA-256 hex of more API keys (from TIDAL_API_KEYS)")
    admin_key_hashes: tuple[str, ...] = Field((), description="SHA-256 hex of more admin keys (TIDAL_ADMIN_KEYS)")
    tls_cert: str | None = Field(None, description="PEM certificate chain the servers present")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: str | None = Field(None, description="PEM CA bundle: clients must present a certificate it "
                                                        "signed (mutual TLS)")
    audit_log: str | None = Field(None, description="append a JSON line per admin call to this file")

    @field_validator("api_key_file", "admin_key_file", "tls_cert", "tls_key", "tls_client_ca", "audit_log")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        """Paths are read by the frontend actor, whose working directory is not the caller's."""
        return None if path is None else str(Path(path).expanduser().absolute())

    @model_validator(mode="after")
    def _tls_pairs(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

    @property
    def has_keys(self) -> bool:
        return bool(self.api_key_file or self.admin_key_file or self.api_key_hashes or self.admin_key_hashes)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_from_env(env) -> dict:
    """The `security:` settings the environment adds: hashes of the keys in TIDAL_API_KEYS / TIDAL_ADMIN_KEYS."""
    out = {}
    for field, var in (("api_key_hashes", API_KEYS_ENV), ("admin_key_hashes", ADMIN_KEYS_ENV)):
        keys = [k.strip() for k in env.get(var, "").split(",") if k.strip()]
        if keys:
            out[field] = tuple(hash_key(k) for k in keys)
    return out


def read_key_file(path: str, what: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror}") from None
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not keys:
        raise ValueError(f"{what}: {path} holds no key (one per line; # starts a comment)")
    return keys


def read_pem(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror}") from None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    principal: str = "anonymous"
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""

    @property
    def http_status(self) -> int:
        return {grpc.StatusCode.OK: 200, grpc.StatusCode.UNAUTHENTICATED: 401,
                grpc.StatusCode.PERMISSION_DENIED: 403}[self.code]


class Authenticator:
    """Checks an `authorization` header against the configured keys."""

    def __init__(self, api_hashes: set[str], admin_hashes: set[str]):
        self.api = tuple(sorted(api_hashes))
        self.admin = tuple(sorted(admin_hashes))

    @classmethod
    def from_config(cls, cfg: SecurityConfig) -> Authenticator:
        api = set(cfg.api_key_hashes)
        admin = set(cfg.admin_key_hashes)
        if cfg.api_key_file:
            api |= {hash_key(k) for k in read_key_file(cfg.api_key_file, "api_key_file")}
        if cfg.admin_key_file:
            admin |= {hash_key(k) for k in read_key_file(cfg.admin_key_file, "admin_key_file")}
        return cls(api, admin)

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)

    def check(self, authorization: str | None, plane: str) -> Verdict:
        if not self.enabled:
            return Verdict(True)
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Verdict(False, code=grpc.StatusCode.UNAUTHENTICATED,
                           message="missing API key: send the header `authorization: Bearer <key>`")
        digest = hash_key(token.strip())
        is_admin, is_api = _member(digest, self.admin), _member(digest, self.api)
        who = f"key:{digest[:8]}"
        if is_admin or (is_api and plane == DATA):
            return Verdict(True, principal=who)
        if is_api:
            return Verdict(False, principal=who, code=grpc.StatusCode.PERMISSION_DENIED,
                           message="this is a data-plane API key; admin calls need an admin key")
        return Verdict(False, code=grpc.StatusCode.UNAUTHENTICATED, message="invalid API key")


def _member(digest: str, hashes: tuple[str, ...]) -> bool:
    """Constant time in which hash matches: every one is compared."""
    found = False
    for h in hashes:
        found |= hmac.compare_digest(digest, h)
    return found


def plane_of(method: str) -> str | None:
    """The plane of a gRPC method path; None for the open services."""
    if method.startswith(OPEN_SERVICES):
        return None
    return ADMIN if method.startswith(ADMIN_SERVICE) else DATA


class Auditor:
    """Writes one line per admin call: to the "tidal.audit" logger, and as JSON to `path` when set."""

    def __init__(self, path: str | None):
        self.path = path

    def record(self, who: str, peer: str, op: str, args: str, result: str) -> None:
        args = args if len(args) <= ARGS_LIMIT else args[:ARGS_LIMIT] + "…"
        audit_log.info("audit: who=%s peer=%s op=%s args=%r result=%s", who, peer, op, args, result)
        if self.path:
            line = json.dumps({"ts": time.time(), "who": who, "peer": peer, "op": op, "args": args,
                               "result": result})
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError as e:
                log.error("audit log %s not written: %s (the line: %s)", self.path, e, line)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """The gRPC side: refuses a call without the right key before it reaches a servicer; audits admin calls."""

    def __init__(self, auth: Authenticator, auditor: Auditor):
        self.auth = auth
        self.auditor = auditor

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        plane = plane_of(details.method)
        if handler is None or plane is None:
            return handler
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        verdict = self.auth.check(metadata.get("authorization"), plane)
        op = details.method.rsplit("/", 1)[-1]
        if not verdict.ok:
            return _refusal(handler, verdict, self.auditor if plane == ADMIN else None, op)
        if plane == ADMIN:
            return _audited(handler, verdict.principal, op, self.auditor)
        return handler


def _refusal(handler, verdict: Verdict, auditor: Auditor | None, op: str):
    async def refuse(request, context):
        if auditor is not None:
            auditor.record(verdict.principal, context.peer(), op, "", verdict.code.name)
        await context.abort(verdict.code, verdict.message)

    async def refuse_stream(request, context):
        await refuse(request, context)
        yield  # pragma: no cover - abort raises

    kinds = {"unary_unary": grpc.unary_unary_rpc_method_handler, "unary_stream": grpc.unary_stream_rpc_method_handler}
    for kind, make in kinds.items():
        if getattr(handler, kind) is not None:
            return make(refuse if kind == "unary_unary" else refuse_stream,
                        request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler      # streaming-request methods: Tidal has none


def _audited(handler, who: str, op: str, auditor: Auditor):
    if handler.unary_unary is None:
        return handler
    inner = handler.unary_unary

    async def behavior(request, context):
        args = text_format.MessageToString(request, as_one_line=True)
        try:
            response = await inner(request, context)
        except BaseException:
            code = context.code()
            auditor.record(who, context.peer(), op, args,
                           code.name if isinstance(code, grpc.StatusCode) else "INTERNAL")
            raise
        auditor.record(who, context.peer(), op, args, "OK")
        return response

    return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)


def server_credentials(cfg: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC server, or None for plaintext."""
    if not cfg.tls_cert:
        return None
    cert, key = read_pem(cfg.tls_cert, "tls_cert"), read_pem(cfg.tls_key, "tls_key")
    ca = read_pem(cfg.tls_client_ca, "tls_client_ca")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def exposure_warning(host: str, cfg: SecurityConfig) -> str | None:
    """A sentence for `tidal serve` when the admin plane is reachable beyond this machine with no admin key."""
    if host in ("127.0.0.1", "localhost", "::1") or cfg.admin_key_file or cfg.admin_key_hashes:
        return None
    return (f"WARNING: serving on {host} with no admin key: anyone who reaches the port can drain, migrate and "
            f"scale every instance. Set --admin-key-file or TIDAL_ADMIN_KEYS (and --api-key-file for the data "
            f"plane), or bind --host 127.0.0.1.")


# ----- the client side: the CLI and the load generator ---------------------------------------------------
def add_connection_args(p) -> None:
    """How a client command reaches a server that wants a key or TLS."""
    from orchestrator.config import default_api_key     # config imports this module

    p.add_argument("--api-key", default=default_api_key(),
                   help="sent as `authorization: Bearer KEY` (default $TIDAL_API_KEY)")
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots")
    p.add_argument("--tls-ca", help="connect with TLS, trusting this PEM CA bundle")
    p.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")


def client_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def client_credentials(ca: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials:
    """TLS to a Tidal server: trust `ca` (system roots if None), and present `cert`/`key` for mutual TLS."""
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(root_certificates=read_pem(ca, "--tls-ca"),
                                        private_key=read_pem(key, "--tls-key"),
                                        certificate_chain=read_pem(cert, "--tls-cert"))


class _CallDetails(namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
                   grpc.ClientCallDetails):
    pass


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization` to every call of a synchronous channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def _with_key(self, d):
        return _CallDetails(d.method, d.timeout, tuple(d.metadata or ()) + self.metadata, d.credentials,
                            d.wait_for_ready, getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


def client_channel(addr: str, api_key: str | None = None, tls: bool = False, ca: str | None = None,
                   cert: str | None = None, key: str | None = None) -> grpc.Channel:
    """A channel to a Tidal server, with TLS when `tls` or any TLS file is given, and the key on every call."""
    if tls or ca or cert:
        channel = grpc.secure_channel(addr, client_credentials(ca, cert, key))
    else:
        channel = grpc.insecure_channel(addr)
    return grpc.intercept_channel(channel, _KeyInterceptor(client_metadata(api_key))) if api_key else channel

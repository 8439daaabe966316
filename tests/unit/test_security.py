"""The key rules of both planes, where keys come from, and the TLS settings that go together."""

import grpc
import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.security import (ADMIN, DATA, Authenticator, SecurityConfig, exposure_warning, hash_key,
                                   keys_from_env, plane_of)

AUTH = Authenticator({hash_key("d1"), hash_key("d2")}, {hash_key("a1")})


@pytest.mark.parametrize("header, plane, ok, code", [
    ("Bearer d1", DATA, True, grpc.StatusCode.OK),
    ("bearer  d2 ", DATA, True, grpc.StatusCode.OK),
    ("Bearer a1", DATA, True, grpc.StatusCode.OK),               # an admin key works on the data plane too
    ("Bearer a1", ADMIN, True, grpc.StatusCode.OK),
    ("Bearer d1", ADMIN, False, grpc.StatusCode.PERMISSION_DENIED),
    ("Bearer nope", DATA, False, grpc.StatusCode.UNAUTHENTICATED),
    ("Bearer nope", ADMIN, False, grpc.StatusCode.UNAUTHENTICATED),
    ("d1", DATA, False, grpc.StatusCode.UNAUTHENTICATED),         # not a bearer token
    ("Basic d1", DATA, False, grpc.StatusCode.UNAUTHENTICATED),
    ("Bearer ", DATA, False, grpc.StatusCode.UNAUTHENTICATED),
    (None, DATA, False, grpc.StatusCode.UNAUTHENTICATED),
])
def test_who_may_call_which_plane(header, plane, ok, code):
    v = AUTH.check(header, plane)
    assert (v.ok, v.code) == (ok, code)
    assert v.http_status == {grpc.StatusCode.OK: 200, grpc.StatusCode.UNAUTHENTICATED: 401,
                             grpc.StatusCode.PERMISSION_DENIED: 403}[code]


def test_principals_name_the_key_by_its_hash_never_the_key():
    assert AUTH.check("Bearer a1", ADMIN).principal == f"key:{hash_key('a1')[:8]}"
    assert AUTH.check(None, DATA).message == "missing API key: send the header `authorization: Bearer <key>`"


def test_no_keys_means_open_and_keys_without_an_admin_key_close_the_admin_plane():
    open_ = Authenticator(set(), set())
    assert open_.check(None, ADMIN).ok and open_.check(None, DATA).ok
    data_only = Authenticator({hash_key("d1")}, set())
    assert data_only.check("Bearer d1", DATA).ok
    assert data_only.check("Bearer d1", ADMIN).code == grpc.StatusCode.PERMISSION_DENIED


def test_health_and_reflection_are_open_and_everything_else_has_a_plane():
    assert plane_of("/grpc.health.v1.Health/Check") is None
    assert plane_of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert plane_of("/tidal.v1.AdminService/DrainInstance") == ADMIN
    assert plane_of("/tidal.v1.GenerationService/Generate") == DATA
    assert plane_of("/some.Unknown/Method") == DATA                    # refused by default when keys are set


def test_keys_come_from_files_and_the_environment(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\n k1 \n\nk2\n")
    cfg = load_config(None, {"api_key_file": str(f)}, env={"TIDAL_ADMIN_KEYS": "a1, a2,", "TIDAL_API_KEYS": "k3"})
    assert cfg.security.admin_key_hashes == (hash_key("a1"), hash_key("a2"))
    auth = Authenticator.from_config(cfg.security)
    assert set(auth.api) == {hash_key(k) for k in ("k1", "k2", "k3")}
    assert keys_from_env({}) == {}
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        Authenticator.from_config(SecurityConfig(api_key_file=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="admin_key_file: cannot read"):
        Authenticator.from_config(SecurityConfig(admin_key_file=str(tmp_path / "missing")))


def test_tls_settings_go_together_and_paths_are_made_absolute(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_config(None, {"tls_cert": "c.pem"}, env={})
    with pytest.raises(ConfigError, match="needs tls_cert"):
        load_config(None, {"tls_client_ca": "ca.pem"}, env={})
    monkeypatch.chdir(tmp_path)
    assert SecurityConfig(tls_cert="c.pem", tls_key="k.pem").tls_cert == str(tmp_path / "c.pem")


def test_serving_beyond_loopback_without_an_admin_key_is_warned_about():
    assert exposure_warning("127.0.0.1", SecurityConfig()) is None
    assert "no admin key" in exposure_warning("0.0.0.0", SecurityConfig())
    assert exposure_warning("0.0.0.0", SecurityConfig(admin_key_hashes=(hash_key("a"),))) is None

"""supervisor.config: TOML text into frozen, validated types; every error names its key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import msgspec
import pytest

from supervisor import config
from supervisor.config import Config, ConfigError, Limits, parse


@pytest.fixture(autouse=True)
def _short_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # Default ipc paths derive from XDG_RUNTIME_DIR; keep them short and independent of the host.
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/tmp")


def toml(text: str) -> str:
    return textwrap.dedent(text)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(toml(text), source="stepvisor.toml")
    return str(exc.value)


def test_empty_text_gives_defaults() -> None:
    cfg = parse("")
    assert cfg == Config()
    assert cfg.server.launch_mode == "fork"
    assert cfg.server.max_activations == 16
    assert cfg.server.synchronous == "acked"
    assert cfg.defaults == Limits()
    assert cfg.defaults.memory_mib == 512
    assert cfg.defaults.timeout_s == 600.0
    assert cfg.tenants == {}
    assert cfg.limits_for("anyone") == Limits()


def test_load_none_is_the_embedded_default() -> None:
    assert config.load(None) == Config()


def test_full_config_parses() -> None:
    cfg = parse(
        toml("""
        [server]
        state_dir = "/var/lib/sv"
        runtime_dir = "/run/sv"
        max_activations = 32
        hello_timeout_s = 5
        synchronous = "normal"
        log_level = "debug"
        require_declared_tenants = true

        [defaults]
        memory_mib = 256
        timeout_s = 30
        max_concurrent = 2
    """)
    )
    assert cfg.server.state_dir == "/var/lib/sv"
    assert cfg.server.max_activations == 32
    assert cfg.server.hello_timeout_s == 5.0
    assert isinstance(cfg.server.hello_timeout_s, float)
    assert cfg.server.synchronous == "normal"
    assert cfg.server.require_declared_tenants is True
    assert cfg.defaults == Limits(memory_mib=256, timeout_s=30.0, max_concurrent=2)
    paths = config.resolve_paths(cfg)
    assert paths.db == Path("/var/lib/sv/stepvisor.db")
    assert paths.api_endpoint == "ipc:///run/sv/api.sock"
    assert paths.sandbox_endpoint == "ipc:///run/sv/sandbox.sock"


def test_tenant_overrides_merge_over_defaults() -> None:
    cfg = parse(
        toml("""
        [defaults]
        memory_mib = 256
        cpu_seconds = 30
        max_concurrent = 2

        [tenants.acme]
        memory_mib = 2048
        max_concurrent = 8

        [tenants.tiny]
    """)
    )
    acme = cfg.limits_for("acme")
    assert acme.memory_mib == 2048  # overridden
    assert acme.max_concurrent == 8  # overridden
    assert acme.cpu_seconds == 30  # from [defaults]
    assert acme.timeout_s == Limits().timeout_s  # built-in default
    assert cfg.limits_for("tiny") == cfg.defaults  # declared, no overrides
    assert cfg.limits_for("other") == cfg.defaults  # undeclared
    assert cfg.defaults.memory_mib == 256  # merging does not change [defaults]
    assert set(cfg.tenants) == {"acme", "tiny"}


@pytest.mark.parametrize(
    "text,key",
    [
        ('[server]\nlaunch_mode = "vfork"', "server.launch_mode"),
        ("[server]\nfork_spares = -1", "server.fork_spares"),
        ("[server]\nmax_activations = 0", "server.max_activations"),
        ('[server]\nmax_activations = "16"', "server.max_activations"),
        ("[server]\nhello_timeout_s = 0", "server.hello_timeout_s"),
        ("[server]\nhello_timeout_s = nan", "server.hello_timeout_s"),
        ("[server]\ndrain_timeout_s = -1", "server.drain_timeout_s"),
        ('[server]\nsynchronous = "off"', "server.synchronous"),
        ('[server]\nlog_level = "trace"', "server.log_level"),
        ("[server]\nrequire_declared_tenants = 1", "server.require_declared_tenants"),
        ("[server]\nstate_dir = 5", "server.state_dir"),
        ("[defaults]\nmemory_mib = 63", "defaults.memory_mib"),
        ("[defaults]\nmemory_mib = true", "defaults.memory_mib"),
        ("[defaults]\nmemory_mib = 512.0", "defaults.memory_mib"),
        ("[defaults]\ncpu_seconds = 86401", "defaults.cpu_seconds"),
        ("[defaults]\ntimeout_s = 86401", "defaults.timeout_s"),
        ("[defaults]\nmax_activation_failures = 101", "defaults.max_activation_failures"),
        ("server = 1", "server"),
    ],
)
def test_bad_values_name_their_key_path(text: str, key: str) -> None:
    message = error_of(text)
    assert message.startswith("stepvisor.toml: ")
    assert f"`{key}`" in message, message


@pytest.mark.parametrize(
    "text,key",
    [
        ("[tenants.acme]\nmemory_mib = 10", "tenants.acme.memory_mib"),
        ('[tenants.acme]\nmemory_mib = "big"', "tenants.acme.memory_mib"),
        ("[tenants.acme]\nmemory_mb = 1024", "tenants.acme"),
        ("[tenants]\nacme = 3", "tenants.acme"),
    ],
)
def test_bad_tenant_values_name_the_tenant(text: str, key: str) -> None:
    message = error_of(text)
    assert f"`{key}`" in message, message
    if "memory_mb" in text:
        assert "memory_mb" in message


def test_bad_tenant_values_are_rejected() -> None:
    # Whatever the path looks like, the key at fault is named.
    assert "memory_mib" in error_of("[tenants.acme]\nmemory_mib = 10")
    assert "memory_mb" in error_of("[tenants.acme]\nmemory_mb = 1024")


@pytest.mark.parametrize(
    "text,unknown,where",
    [
        ("colour = 1", "colour", None),
        ("[server]\nport = 8080", "port", "server"),
        ("[defaults]\nmemory = 8", "memory", "defaults"),
        ('[auth]\nkey = "x"', "auth", None),
    ],
)
def test_unknown_keys_are_errors(text: str, unknown: str, where: str | None) -> None:
    message = error_of(text)
    assert f"`{unknown}`" in message, message
    if where is not None:
        assert f"`{where}`" in message, message


@pytest.mark.parametrize("name", ["ACME", "-acme", "_x", "a b", "a" * 64, "ünï", ""])
def test_invalid_tenant_names_are_rejected(name: str) -> None:
    message = error_of(f'[tenants."{name}"]\nmemory_mib = 128')
    assert f"`tenants.{name}`" in message
    assert "invalid tenant name" in message


def test_tenant_name_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(ConfigError):
        parse('[tenants."acme\\n"]\nmemory_mib = 128\n')


def test_valid_tenant_names_are_accepted() -> None:
    cfg = parse('[tenants.a]\n[tenants."acme-co_2"]\n[tenants.' + "x" * 63 + "]\n")
    assert set(cfg.tenants) == {"a", "acme-co_2", "x" * 63}


@pytest.mark.parametrize("key", ["api_endpoint", "sandbox_endpoint"])
@pytest.mark.parametrize(
    "endpoint", ["tcp://127.0.0.1:5555", "inproc://x", "/tmp/api.sock", "IPC:///tmp/x"]
)
def test_non_ipc_endpoints_are_rejected(key: str, endpoint: str) -> None:
    message = error_of(f'[server]\n{key} = "{endpoint}"')
    assert f"server.{key}" in message
    assert "ipc://" in message


def test_ipc_path_length_limit() -> None:
    fits = "/tmp/" + "x" * (config.IPC_PATH_MAX - 5)
    assert parse(f'[server]\napi_endpoint = "ipc://{fits}"').server.api_endpoint == f"ipc://{fits}"
    message = error_of(f'[server]\napi_endpoint = "ipc://{fits}x"')
    assert "server.api_endpoint" in message and "longer" in message


def test_long_runtime_dir_is_rejected_through_the_derived_sockets() -> None:
    message = error_of(f'[server]\nruntime_dir = "/{"r" * 120}"')
    assert "server.api_endpoint" in message


def test_non_executable_python_is_rejected(tmp_path: Path) -> None:
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n")
    message = error_of(f'[server]\npython = "{script}"')
    assert "`server.python`" in message and "not executable" in message
    script.chmod(0o755)
    assert parse(f'[server]\npython = "{script}"').server.python == str(script)


@pytest.mark.parametrize(
    "text",
    [
        "[server",
        "a = ",
        "[server]\nx = 1\n[server]\n",
        "= 1",
        "[server]\nstate_dir = 'unterminated",
    ],
)
def test_invalid_toml_is_rejected(text: str) -> None:
    message = error_of(text)
    assert "not valid TOML" in message


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "stepvisor.toml"
    path.write_text("[defaults]\nmax_concurrent = 9\n")
    assert config.load(path).defaults.max_concurrent == 9
    assert config.load(str(path)).defaults.max_concurrent == 9


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "stepvisor.toml"
    path.write_text("[defaults]\nmax_concurrent = 0\n")
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert str(path) in str(exc.value)
    assert "`defaults.max_concurrent`" in str(exc.value)


def test_load_of_a_missing_file_raises_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as exc:
        config.load(missing)
    assert str(missing) in str(exc.value)
    assert "No such file" in str(exc.value)


def test_load_of_a_directory_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        config.load(tmp_path)


def test_load_of_a_non_utf8_file_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "stepvisor.toml"
    path.write_bytes(b'[server]\nlog_file = "\xff\xfe"\n')
    with pytest.raises(ConfigError):
        config.load(path)


def test_config_is_frozen() -> None:
    cfg = parse("[tenants.acme]\nmemory_mib = 128\n")
    with pytest.raises(AttributeError):
        cfg.server = config.Server()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.defaults.memory_mib = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.server.launch_mode = "fork"  # type: ignore[misc,assignment]
    with pytest.raises(AttributeError):
        cfg.tenants["acme"].memory_mib = 1  # type: ignore[misc]
    assert cfg.limits_for("acme").memory_mib == 128


def test_replacing_gives_a_new_config() -> None:
    cfg = parse("")
    other = msgspec.structs.replace(cfg, defaults=Limits(memory_mib=64))
    assert cfg.defaults.memory_mib == 512
    assert other.limits_for("x").memory_mib == 64


def test_the_shipped_example_config_is_valid() -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "systemd" / "stepvisor.toml"
    cfg = config.parse(example.read_text(), source=str(example))
    assert cfg.limits_for("acme").memory_mib == 1024
    assert cfg.isolation.uid == "auto"


def test_diff_names_every_changed_key_with_old_and_new() -> None:
    old = parse("[defaults]\nmemory_mib = 256\n[tenants.acme]\nmax_concurrent = 2\n")
    new = parse(
        "[defaults]\nmemory_mib = 512\n[tenants.acme]\nmax_concurrent = 2\n"
        "[tenants.beta]\ncpu_seconds = 5\n"
    )
    changes = config.diff(old, new)
    assert changes["defaults.memory_mib"] == (256, 512)
    assert changes["tenants.beta.cpu_seconds"] == (None, 5)
    assert "tenants.acme.max_concurrent" not in changes
    assert config.diff(new, new) == {}
    assert config.needs_restart(changes) == []


def test_restart_only_keys_are_named() -> None:
    old = parse("")
    new = parse('[server]\nlaunch_mode = "spawn"\nmax_activations = 4\n[isolation]\nuid = "off"\n')
    assert sorted(config.needs_restart(config.diff(old, new))) == [
        "isolation.uid",
        "server.launch_mode",
    ]


def test_database_urls_are_checked_and_never_shown_with_their_password() -> None:
    for bad, why in (
        ("mysql://db/x", "expected a postgresql:// URL"),
        ("postgresql://h/db?sslmode", "not a valid libpq URL"),
    ):
        with pytest.raises(ConfigError, match=f"server.database.*{why}"):
            parse(f'[server]\ndatabase = "{bad}"\n')
    with pytest.raises(ConfigError, match="node_name"):
        parse('[server]\nnode_name = "bad name!"\n')
    old = parse('[server]\ndatabase = "postgresql://sv:hunter2@db.internal:5433/sv"\n')
    new = parse('[server]\ndatabase = "postgresql://sv:swordfish@db.internal:5433/sv"\n')
    changes = config.diff(old, new)
    assert changes["server.database"] == (
        "sv@db.internal:5433/sv",
        "sv@db.internal:5433/sv (password changed)",
    )
    assert "hunter2" not in repr(changes) and "swordfish" not in repr(changes)
    assert config.needs_restart(changes) == ["server.database"]
    assert parse("").server.lease_s == 10.0


def test_default_dirs_follow_one_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # root: the system's dirs, whatever a login shell's XDG_* say (logind's /run/user/0 is 0700,
    # out of the sandbox uids' reach); anyone else: the XDG ones
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setenv("XDG_STATE_HOME", "/home/ann/.local/state")
    monkeypatch.setattr(config.os, "geteuid", lambda: 0)
    assert config.default_state_dir() == Path("/var/lib/stepvisor")
    assert config.default_runtime_dir() == Path("/run/stepvisor")
    assert config.default_api_endpoint() == "ipc:///run/stepvisor/api.sock"
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    assert config.default_state_dir() == Path("/home/ann/.local/state/stepvisor")
    assert config.default_runtime_dir() == Path("/run/user/1000/stepvisor")

"""`cli.py` only turns flags into a frozen ServeConfig and picks a transport."""

from __future__ import annotations

import pydantic
import pytest

from gvisor_mcp.cli import build_parser, serve_config
from gvisor_mcp.cli_args import UsageError
from gvisor_mcp.config import HttpOptions, ServeConfig


def test_serve_flags_become_a_frozen_config():
    args = build_parser().parse_args(
        [
            "serve",
            "--tenant",
            "ci",
            "--state-dir",
            "/srv/g",
            "--pool-size",
            "0",
            "--workspace",
            "w1",
            "--egress-host",
            "mirror.internal=10.0.0.5",
            "--audit-max-mb",
            "2",
            "--max-concurrent",
            "3",
            "--pool-freeze-after",
            "2.5",
        ]
    )
    config = serve_config(args)
    assert config.manager.pool_freeze_after == 2.5
    assert isinstance(config, ServeConfig) and config.transport == "stdio" and config.http is None
    assert (config.tenant, str(config.state_dir), config.pool_size, config.workspace) == ("ci", "/srv/g", 0, "w1")
    assert config.manager.max_concurrent_containers == 3 and config.audit_max_bytes == 2 << 20
    assert [str(a) for a in config.network.hosts["mirror.internal"]] == ["10.0.0.5"]
    assert not config.multi_tenant and config.workspace_root == config.state_dir / "workspaces"
    with pytest.raises(pydantic.ValidationError):
        config.tenant = "other"  # type: ignore[misc]


def test_http_flags_become_http_options_next_to_the_rest():
    args = build_parser().parse_args(["serve", "--transport", "http", "--state-dir", "/srv/g", "--port", "9000"])
    config = serve_config(args)
    assert config.multi_tenant and isinstance(config.http, HttpOptions)
    assert config.http.port == 9000 and config.http.tokens_path == "/srv/g/tokens.yaml"


def test_a_malformed_flag_is_a_value_error_naming_it():
    args = build_parser().parse_args(["serve", "--egress-host", "nonsense"])
    with pytest.raises(ValueError, match="--egress-host 'nonsense': expected NAME=ADDRESS"):
        serve_config(args)


def test_pool_freeze_after_defaults_to_one_second_and_refuses_a_negative_value():
    assert serve_config(build_parser().parse_args(["serve"])).manager.pool_freeze_after == 1.0
    with pytest.raises(UsageError, match="--pool-freeze-after: -1 is not allowed: a number of seconds, or 0 for never"):
        build_parser().parse_args(["serve", "--pool-freeze-after", "-1"])

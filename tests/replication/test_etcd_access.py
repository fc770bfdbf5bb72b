"""replication/etcd_access.py and the command line's --etcd-* options, without an etcd:
which URLs and combinations are accepted, and where a password may come from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from replication.etcd_access import EtcdAccess, TlsClient, parse_url
from server import cli


def test_the_scheme_alone_says_tls() -> None:
    assert parse_url("etcd://a:1") == (False, (("a", 1),))
    assert parse_url("etcds://a:1, b:2") == (True, (("a", 1), ("b", 2)))
    for bad in ("http://a:1", "etcd://a", "etcd://:1", "etcds://a:x", "etcd://a:²"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_access_refuses_what_would_be_ignored(tmp_path: Path) -> None:
    pem = str(tmp_path / "x.pem")
    with pytest.raises(ValueError, match="etcds://"):
        EtcdAccess.from_url("etcd://a:1", ca_file=pem)  # TLS options on plain text
    with pytest.raises(ValueError, match="go together"):
        EtcdAccess.from_url("etcds://a:1", cert_file=pem)
    with pytest.raises(ValueError, match="password"):
        EtcdAccess.from_url("etcd://a:1", user="u")
    access = EtcdAccess.from_url("etcds://a:1,b:2", user="u", password="hunter2")
    assert "hunter2" not in repr(access) and "hunter2" not in access.url
    assert access.url == "etcds://a:1,b:2"
    assert isinstance(access.client(1, 2), TlsClient)
    assert not isinstance(dataclasses.replace(access, tls=False).client(0, 2), TlsClient)


def test_a_password_is_not_an_option_and_comes_from_a_private_file_or_the_env(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No --etcd-password: a command line is readable by every local user.
    ran = CliRunner().invoke(cli.main, ["keys", "list", "--cluster", "etcd://127.0.0.1:1",
                                        "--etcd-password", "hunter2"])
    assert ran.exit_code == 2 and "No such option" in ran.output

    secret = tmp_path / "password"
    secret.write_text("from-file\r\n")
    secret.chmod(0o600)
    flags = cli._EtcdFlags(user="u", password_file=str(secret))
    monkeypatch.setenv(cli.ETCD_PASSWORD_ENV, "from-env")
    assert cli._etcd_access("etcds://h:1", flags).password == "from-file"  # the file wins
    assert cli._etcd_access("etcds://h:1", cli._EtcdFlags(user="u")).password == "from-env"
    secret.chmod(0o644)
    with pytest.raises(click.UsageError, match="chmod 600"):
        cli._etcd_access("etcds://h:1", flags)
    monkeypatch.delenv(cli.ETCD_PASSWORD_ENV)
    with pytest.raises(click.UsageError, match="needs its password"):
        cli._etcd_access("etcds://h:1", cli._EtcdFlags(user="u"))

    # In clear text over the network: allowed (a tunnel may protect it), but said.
    monkeypatch.setenv(cli.ETCD_PASSWORD_ENV, "from-env")
    cli._etcd_access("etcd://127.0.0.1:1", cli._EtcdFlags(user="u"))
    assert capsys.readouterr().err == ""
    cli._etcd_access("etcd://10.0.0.5:2379", cli._EtcdFlags(user="u"))
    assert "clear text" in capsys.readouterr().err

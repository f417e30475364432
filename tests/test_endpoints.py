"""Endpoint flags: parse_endpoints and endpoint_scheme (--etcd-endpoints), what an https:// or http:// scheme
means for TLS; every invalid value is a ConfigError naming its flag."""

from __future__ import annotations


import pytest

from etcd_agent.endpoints import endpoint_scheme, parse_endpoints
from etcd_agent.errors import EXIT_USAGE, ConfigError


# --- parse_endpoints -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:2379", (("127.0.0.1", 2379),)),
    ("etcd-1:2379,etcd-2:22379, etcd-3:32379", (("etcd-1", 2379), ("etcd-2", 22379), ("etcd-3", 32379))),
    ("http://10.0.0.5:2379", (("10.0.0.5", 2379),)),
    ("https://etcd.example:2379/", (("etcd.example", 2379),)),
    ("http://a:1,b:2", (("a", 1), ("b", 2))),
    ("https://a:1,HTTPS://b:2", (("a", 1), ("b", 2))),
    ("etcd-1", (("etcd-1", 2379),)),
    ("http://etcd-1", (("etcd-1", 2379),)),
    ("[::1]:2379", (("::1", 2379),)),
    ("[::1]", (("::1", 2379),)),
    ("[fe80::1]:12379", (("fe80::1", 12379),)),
    ("a:2379,,b:2379,", (("a", 2379), ("b", 2379))),
    ("h:65535", (("h", 65535),)),
])
def test_parse_endpoints(text, expected):
    assert parse_endpoints(text) == expected


@pytest.mark.parametrize("text", ["h:abc", "h:", "h:0", "h:65536", "h:-1", "[::1]:x", "[::1]:", "a:2379,b:99999"])
def test_parse_endpoints_bad_port_names_the_flag(text):
    with pytest.raises(ConfigError) as caught:
        parse_endpoints(text)
    assert "--etcd-endpoints" in str(caught.value)
    assert "port" in str(caught.value)
    assert caught.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize("text", ["", " , ", ":2379", "http://:2379"])
def test_parse_endpoints_without_a_host_names_the_flag(text):
    with pytest.raises(ConfigError, match="--etcd-endpoints"):
        parse_endpoints(text)


def test_parse_endpoints_names_the_flag_it_is_given():
    with pytest.raises(ConfigError, match="--rdzv-endpoint"):
        parse_endpoints("h:x", flag="--rdzv-endpoint")


def test_parse_endpoints_ignores_an_upper_case_scheme():
    assert parse_endpoints("HTTP://127.0.0.1:2379") == (("127.0.0.1", 2379),)


@pytest.mark.parametrize("text, scheme", [("a:1", None), ("a:1,http://b:2", "http"), ("https://a:1,https://b", "https"),
                                          ("HTTPS://a", "https")])
def test_endpoint_scheme(text, scheme):
    assert endpoint_scheme(text) == scheme


@pytest.mark.parametrize("text, message", [
    ("ftp://a:1", r"--etcd-endpoints: 'ftp://a:1': the scheme ftp:// is not one etcd speaks; use https://"),
    ("unix://sock", r"the scheme unix:// is not one etcd speaks"),
    ("http://a:1,https://b:2", r"mixes https:// with plaintext endpoints"),
    ("https://a:1,b:2", r"mixes https:// with plaintext endpoints"),
])
def test_other_schemes_are_usage_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_endpoints(text)


def _ns(**kw):
    import argparse

    return argparse.Namespace(**{"cacert": None, "cert": None, "key": None, "user": None, "password_file": None,
                                 "etcd_timeout": 10.0, **kw})


def test_https_means_tls_with_the_system_cas():
    from etcd_agent.cli.launch import etcd_config

    cfg = etcd_config(_ns(), "https://etcd.example:2379")
    assert cfg.secure and cfg.tls and cfg.ca_cert is None
    assert cfg.describe() == "TLS (the system's CA bundle), no password auth"
    assert etcd_config(_ns(), "etcd.example:2379").describe() == "plaintext (no TLS), no password auth"
    assert not etcd_config(_ns(), "http://etcd.example:2379").secure


def test_http_with_a_ca_is_a_contradiction():
    from etcd_agent.cli.launch import etcd_config

    with pytest.raises(ConfigError, match="http:// means plaintext, but --etcd-cacert asks for TLS"):
        etcd_config(_ns(cacert=__file__), "http://etcd.example:2379")


def test_password_auth_over_https_needs_no_ca_file(monkeypatch):
    from etcd_agent.cli.launch import etcd_config

    monkeypatch.setenv("ETCD_AGENT_ETCD_PASSWORD", "pw")
    cfg = etcd_config(_ns(user="root"), "https://etcd.example:2379")
    assert cfg.user == "root" and cfg.password == "pw"
    assert cfg.describe() == "TLS (the system's CA bundle), password auth as user root"
    with pytest.raises(ConfigError, match="--etcd-user needs TLS"):
        etcd_config(_ns(user="root"), "etcd.example:2379")


def test_parse_endpoints_superscript_port_is_a_config_error():
    with pytest.raises(ConfigError, match="--etcd-endpoints"):
        parse_endpoints("h:²")


@pytest.mark.parametrize("text", ["h:2379:1", "[::1", "[::1]2379"])
def test_parse_endpoints_rejects_malformed_hosts(text):
    with pytest.raises(ConfigError, match="--etcd-endpoints"):
        parse_endpoints(text)


def test_parse_endpoints_accepts_a_bare_ipv6_address():
    assert parse_endpoints("::1") == (("::1", 2379),)

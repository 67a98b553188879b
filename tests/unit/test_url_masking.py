"""URL user information (a proxy's user:password) never shows: not in the masked settings, the
settings' repr, a configuration error, a Tanium client message, or a log line."""

from __future__ import annotations

import json
import logging

import pytest

from connector.config import ConfigError, TaniumSection, parse_pipeline
from connector.tanium import TaniumClient, TaniumConnectionError
from connector.text import mask_userinfo
from connector.tools.embedded import free_port

PASSWORD = "pr0xy-PASS"
PROXY = f"http://alice:{PASSWORD}@127.0.0.1:3128"


@pytest.mark.parametrize(
    "text, shown",
    [
        (PROXY, "http://***@127.0.0.1:3128"),
        (f"via {PROXY}/ and https://bob:pw@h.example:8443/x?y=1 done", "via http://***@127.0.0.1:3128/ and"),
        ("https://user:p@ss@host.example/", "https://***@host.example/"),  # an unencoded @ in the password
        ("HTTPS://u:p@H", "HTTPS://***@H"),
        ("socks5h://u:p@h:1080", "socks5h://***@h:1080"),
        ("no url here, mail me at a@b.example", "no url here, mail me at a@b.example"),
        ("http://host.example/path@v2", "http://host.example/path@v2"),
    ],
)
def test_mask_userinfo(text, shown):
    masked = mask_userinfo(text)
    assert shown in masked
    assert ":p@" not in masked and PASSWORD not in masked and ":pw@" not in masked


def test_masked_settings_and_repr_hide_the_proxy_password():
    cfg = parse_pipeline({"pipeline": {"name": "p"}, "tanium": {"host": "t.example", "api_key": "k", "proxy": PROXY}})
    shown = cfg.masked()["tanium"]["proxy"]
    assert shown == "http://***@127.0.0.1:3128"
    for text in (json.dumps(cfg.masked()), repr(cfg), repr(cfg.tanium), str(cfg.tanium)):
        assert PASSWORD not in text
    assert cfg.tanium.proxy == PROXY  # the client still gets the real URL


def test_a_rejected_proxy_value_is_shown_without_its_password():
    with pytest.raises(ConfigError) as e:
        parse_pipeline(
            {
                "pipeline": {"name": "p"},
                "tanium": {"host": "t.example", "api_key": "k", "proxy": f"socks5://alice:{PASSWORD}@p:1080"},
            }
        )
    assert "tanium.proxy" in str(e.value) and "socks5://***@p:1080" in str(e.value)
    assert PASSWORD not in str(e.value)


def test_client_messages_hide_proxy_credentials_from_the_environment(sim, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    for var in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}")
    client = TaniumClient(TaniumSection(**sim.settings(max_retries=0)))
    with pytest.raises(TaniumConnectionError) as e:
        client.list_alerts([], 0, 1)
    client.close()
    assert "proxy" in e.value.message
    assert PASSWORD not in e.value.message and PASSWORD not in caplog.text


def test_log_lines_show_no_url_user_information():
    """The CLI's log filter masks URLs in any log line, whichever library wrote it."""
    from connector.cli import RedactFilter

    record = logging.LogRecord("urllib3", logging.DEBUG, __file__, 1, "Starting new connection via %s", (PROXY,), None)
    assert RedactFilter().filter(record)
    assert record.getMessage() == "Starting new connection via http://***@127.0.0.1:3128"


def _logged_exception(name: str) -> logging.LogRecord:
    try:
        None.recv(4096)  # type: ignore[attr-defined]
    except AttributeError:
        import sys

        return logging.LogRecord(name, logging.ERROR, __file__, 1, "Error receiving data", (), sys.exc_info())
    raise AssertionError("unreachable")


def test_an_exception_a_library_logs_is_one_line_unless_debugging():
    """kafka-python logs its own shutdown races with a traceback; an operator sees one line naming the
    exception, and the traceback only at debug level. The connector's own exceptions keep theirs."""
    from connector.cli import RedactFilter

    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)
        lib, ours = _logged_exception("kafka.net.transport"), _logged_exception("connector.stream.sink")
        assert RedactFilter().filter(lib) and RedactFilter().filter(ours)
        assert lib.getMessage() == "Error receiving data\nAttributeError: 'NoneType' object has no attribute 'recv'"
        assert "Traceback" in ours.getMessage()
        root.setLevel(logging.DEBUG)
        lib = _logged_exception("kafka.net.transport")
        assert RedactFilter().filter(lib)
        assert "Traceback" in lib.getMessage()
    finally:
        root.setLevel(level)

import json

import pytest

from lazyfs.config import Config, RegistrySettings, config_from_dict, load_config
from lazyfs.errors import ConfigError


def test_defaults_and_round_trip(tmp_path):
    assert Config().cache_root != Config().writable_root  # read/write splitting by default
    doc = {"cache_root": "/big/cache", "writable_root": "/fast/w", "cache_size": 1 << 30, "fetch_deadline": 5,
           "registries": [{"host": "127.0.0.1:5000", "plain_http": True, "mirrors": ["127.0.0.1:5001"]}],
           "metrics_address": "127.0.0.1:9750", "log_level": "debug"}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    config = load_config(str(path))
    assert config.cache_root == "/big/cache" and config.writable_root == "/fast/w"
    assert config.fetch_deadline == 5.0 and config.registry("127.0.0.1:5000").mirrors == ("127.0.0.1:5001",)
    assert config.socket_path.endswith("lazyfs.sock")


@pytest.mark.parametrize("doc, field", [
    ({"cache_size": "big"}, "cache_size"),
    ({"cache_sise": 1}, "cache_sise"),
    ({"trace_replay": "yes"}, "trace_replay"),
    ({"log_level": "loud"}, "log_level"),
    ({"metrics_address": "9750"}, "metrics_address"),
    ({"registries": [{"plain_http": True}]}, "registries[0]"),
    ({"registries": [{"host": "h", "mirrors": "m"}]}, "registries[0].mirrors"),
    ({"fetch_deadline": -1}, "fetch_deadline"),
])
def test_errors_name_the_field(doc, field):
    with pytest.raises(ConfigError) as info:
        config_from_dict(doc)
    assert field in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        load_config(str(tmp_path / "bad.json"))


def test_toml_and_json_load_the_same(tmp_path):
    doc = {"cache_root": "/big/cache", "fetch_deadline": 5, "log_level": "debug",
           "registries": [{"host": "127.0.0.1:5000", "plain_http": True, "mirrors": ["http://127.0.0.1:5001"]}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    (tmp_path / "c.toml").write_text('cache_root = "/big/cache"\nfetch_deadline = 5\nlog_level = "debug"\n\n'
                                     '[[registries]]\nhost = "127.0.0.1:5000"\nplain_http = true\n'
                                     'mirrors = ["http://127.0.0.1:5001"]\n')
    from_json, from_toml = load_config(str(tmp_path / "c.json")), load_config(str(tmp_path / "c.toml"))
    assert from_json == from_toml and from_toml.fetch_deadline == 5.0
    # the effective config round-trips through both formats
    (tmp_path / "shown.toml").write_text(from_toml.to_toml())
    (tmp_path / "shown.json").write_text(json.dumps(from_toml.to_json()))
    assert load_config(str(tmp_path / "shown.toml")) == from_toml == load_config(str(tmp_path / "shown.json"))
    (tmp_path / "bad.toml").write_text("cache_size = [")
    with pytest.raises(ConfigError, match="not TOML"):
        load_config(str(tmp_path / "bad.toml"))
    (tmp_path / "typo.toml").write_text('[[registries]]\nhost = "h:1"\nca_fil = "x"\n')
    with pytest.raises(ConfigError, match=r"unknown field 'registries\[0\].ca_fil'"):
        load_config(str(tmp_path / "typo.toml"))


def test_config_stays_a_frozen_value():
    import dataclasses

    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache_size = 1
    assert dataclasses.replace(config, run_dir="/r").socket_path == "/r/lazyfs.sock"
    assert hash(RegistrySettings("h:1", mirrors=("m:2",)))  # values: hashable


def test_paths_are_checked(tmp_path):
    from tests.support.registry import make_pki

    pki = make_pki(tmp_path / "pki")
    good = config_from_dict({"registries": [{"host": "h:1", "ca_file": str(pki.ca_file),
                                             "client_cert": str(pki.cert_file), "client_key": str(pki.key_file)}],
                             "hosts_dir": str(tmp_path)})
    assert good.registries[0].client_cert == str(pki.cert_file)
    (tmp_path / "junk.pem").write_text("not a certificate")
    for doc, needle in [
        ({"registries": [{"host": "h:1", "ca_file": str(tmp_path / "missing.pem")}]}, "registries[0].ca_file"),
        ({"registries": [{"host": "h:1", "ca_file": str(tmp_path / "junk.pem")}]}, "registries[0].ca_file"),
        ({"registries": [{"host": "h:1", "client_cert": str(pki.cert_file)}]}, "registries[0].client_cert"),
        ({"registries": [{"host": "h:1", "client_key": str(pki.key_file)}]}, "client_key without client_cert"),
        ({"hosts_dir": str(pki.ca_file)}, "hosts_dir"),
        ({"credentials": str(tmp_path)}, "credentials"),
    ]:
        with pytest.raises(ConfigError) as info:
            config_from_dict(doc)
        assert needle in str(info.value), (doc, str(info.value))


def test_schema_and_cli(tmp_path, capsys):
    from lazyfs.cli import main
    from lazyfs.config import config_schema

    schema = config_schema()
    props = schema["$defs"]["Config"]["properties"]
    assert props["cache_size"]["minimum"] == 0 and "hosts_dir" in props
    assert schema["$defs"]["Config"]["additionalProperties"] is False
    assert schema["$defs"]["RegistrySettings"]["required"] == ["host"]
    assert main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(schema))
    path = tmp_path / "c.toml"
    path.write_text('cache_size = 1024\n[[registries]]\nhost = "127.0.0.1:5000"\n')
    assert main(["config", "show", "--config", str(path), "--plain-http", "127.0.0.1:6000"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["cache_size"] == 1024 and shown["log_level"] == "info"  # defaults filled in
    assert [r["host"] for r in shown["registries"]] == ["127.0.0.1:5000", "127.0.0.1:6000"]
    assert main(["config", "show", "--toml", "--config", str(path)]) == 0
    assert "cache_size = 1024" in capsys.readouterr().out
    path.write_text("cache_size = -1\n")
    assert main(["config", "show", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cache_size" in err and "Traceback" not in err

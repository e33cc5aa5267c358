import json

import pytest

from lazyfs.config import Config, config_from_dict, load_config
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

"""Config errors name the key, show a long value cut short and suggest the key meant."""

import pytest

from mindspeed_vita.config.loader import build_config, load_config
from mindspeed_vita.config.schema import ConfigError


def message_of(raw):
    with pytest.raises(ConfigError) as info:
        build_config(raw, source="s.yaml")
    return str(info.value)


def test_unknown_key_suggests_the_close_one_in_its_section():
    assert message_of({"parallel": {"tpp": 2}}) == (
        "s.yaml: unknown config key 'parallel.tpp' (value 2); did you mean 'parallel.tp'?"
    )
    assert "did you mean 'model.language.num_layers'?" in message_of(
        {"model": {"language": {"num_layerz": 2}}}
    )
    assert "did you mean 'training'?" in message_of({"trainig": {}})
    assert "did you mean" not in message_of({"parallel": {"zzzzzz": 1}})


def test_long_values_are_cut_short():
    message = message_of(
        {"sources": [{"name": f"source-{i}", "path": "/x" * 50} for i in range(40)]}
    )
    assert len(message) < 300 and "..." in message
    assert "a data mixture file?" in message
    assert len(message_of({"data": {"seq_length": "x" * 5000}})) < 300


def test_the_shipped_mixture_file_given_as_a_stage_is_one_short_line():
    with pytest.raises(ConfigError) as info:
        load_config("configs/data/stage3.yaml")
    assert "\n" not in str(info.value) and len(str(info.value)) < 300

"""ParallelLayout: every parallel rule, checked without any process group."""
import pytest

from mindspeed_vita.config.loader import load_config
from mindspeed_vita.config.model import LanguageConfig
from mindspeed_vita.config.schema import ConfigError, ParallelConfig
from mindspeed_vita.convert.checkpoint import check_tp_size
from mindspeed_vita.errors import CheckpointError
from mindspeed_vita.parallel.layout import ParallelLayout


def layout_of(world_size, **parallel):
    # unvalidated on purpose: the section's own validation asks the layout, tested below
    return ParallelLayout.from_config(ParallelConfig.model_construct(**parallel), world_size)


# ------------------------------------------------------------------ degrees and world size
@pytest.mark.parametrize("parallel, world, expected", [
    ({}, 1, (1, 1, 1, 1)),
    ({}, 6, (1, 1, 1, 6)),
    ({"tp": 2, "cp": 2}, 4, (2, 1, 2, 1)),
    ({"cp": 2}, 4, (1, 1, 2, 2)),
    ({"tp": 8, "cp": 8, "sequence_parallel": True}, 512, (8, 1, 8, 8)),
    ({"tp": 2, "dp": 3}, 6, (2, 1, 1, 3)),
])
def test_degrees_and_inferred_dp(parallel, world, expected):
    layout = layout_of(world, **parallel)
    assert (layout.tp, layout.pp, layout.cp, layout.dp) == expected
    assert layout.world_size == world


def test_product_not_dividing_the_world_names_the_keys():
    with pytest.raises(ConfigError) as e:
        layout_of(6, tp=2, cp=2)
    assert ("config keys 'parallel.tp' * 'parallel.pp' * 'parallel.cp' = 2 * 1 * 2 = 4 does not "
            "divide the world size 6") in str(e.value)


def test_explicit_dp_must_complete_the_world():
    with pytest.raises(ConfigError) as e:
        layout_of(8, tp=2, cp=2, dp=3)
    assert ("'parallel.tp' * 'parallel.pp' * 'parallel.cp' * 'parallel.dp' = 2 * 1 * 2 * 3 = 12 "
            "is not the world size 8") in str(e.value)


@pytest.mark.parametrize("world", [0, -4])
def test_world_size_zero_or_negative_is_a_config_error(world):
    with pytest.raises(ConfigError, match=f"world size {world}: must be an integer >= 1"):
        layout_of(world)


def test_world_size_none_is_the_smallest_world_of_the_config():
    assert layout_of(None, tp=2, cp=2).world_size == 4
    assert layout_of(None, tp=2, dp=3).dp == 3


def test_pipeline_parallel_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as e:
        layout_of(4, pp=2)
    assert "'parallel.pp' = 2" in str(e.value) and "not supported" in str(e.value)


@pytest.mark.parametrize("axis", ["tp", "pp", "cp", "dp"])
def test_degrees_below_one_are_refused(axis):
    with pytest.raises(ConfigError, match=f"'parallel.{axis}' = 0"):
        ParallelLayout(**{axis: 0})


def test_sequence_parallel_needs_tp():
    with pytest.raises(ConfigError, match="'parallel.sequence_parallel' = True needs "
                                          "'parallel.tp' > 1"):
        ParallelLayout(sequence_parallel=True)
    assert ParallelLayout(tp=2).with_sequence_parallel(True).sequence_parallel


# ------------------------------------------------------------------ multiples
@pytest.mark.parametrize("tp, cp, sp, seq, segment", [
    (1, 1, False, 1, 1), (8, 1, False, 1, 1), (8, 1, True, 8, 1), (8, 2, True, 32, 4),
    (8, 8, False, 16, 16), (1, 4, False, 8, 8), (2, 2, True, 8, 4),
])
def test_sequence_and_segment_multiples(tp, cp, sp, seq, segment):
    layout = ParallelLayout(tp=tp, cp=cp, sequence_parallel=sp)
    assert (layout.seq_multiple, layout.segment_multiple) == (seq, segment)


def test_seq_length_rule_names_key_value_and_multiple():
    ParallelLayout(cp=2).check_seq_length(1000)
    with pytest.raises(ConfigError) as e:
        ParallelLayout(cp=2).check_seq_length(1001)
    assert ("config key 'data.seq_length' = 1001 is not divisible by 2 * 'parallel.cp' = 4 "
            "('parallel.cp' = 2)") in str(e.value)
    with pytest.raises(ConfigError) as e:
        ParallelLayout(tp=8, cp=2, sequence_parallel=True).check_seq_length(4100)
    assert ("= 4100 is not divisible by 2 * 'parallel.cp' * 'parallel.tp' = 32 ('parallel.cp' = "
            "2, 'parallel.tp' = 8)") in str(e.value)
    with pytest.raises(ConfigError, match=r"by 'parallel.tp' = 4 \('parallel.tp' = 4\)"):
        ParallelLayout(tp=4, sequence_parallel=True).check_seq_length(6)


def test_a_segment_multiple_that_cannot_be_split_is_refused():
    layout = ParallelLayout(cp=4)
    layout.check_segment_multiple(8)
    layout.check_segment_multiple(16)
    with pytest.raises(ConfigError) as e:
        layout.check_segment_multiple(4)
    assert "'segment_multiple' = 4" in str(e.value) and "2 * 'parallel.cp' = 8" in str(e.value)
    ParallelLayout().check_segment_multiple(3)  # no context parallelism: anything splits


# ------------------------------------------------------------------ tensor parallel vs model
def language(**fields):
    base = dict(hidden_size=64, num_layers=1, num_attention_heads=8, num_query_groups=4,
                ffn_hidden_size=96, vocab_size=128)
    return LanguageConfig(**dict(base, **fields))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_dividing_heads_groups_and_mlp_is_accepted(tp):
    ParallelLayout(tp=tp).check_language(language())


@pytest.mark.parametrize("field, fields, tp", [
    ("num_attention_heads", {}, 3),
    ("num_query_groups", {}, 8),  # fewer kv groups than TP ranks: megatron needs whole groups
    ("ffn_hidden_size", {"ffn_hidden_size": 98}, 4),
])
def test_tp_not_dividing_the_model_names_the_key(field, fields, tp):
    cfg = language(**fields)
    with pytest.raises(ConfigError) as e:
        ParallelLayout(tp=tp).check_language(cfg)
    assert f"'model.language.{field}' = {getattr(cfg, field)}" in str(e.value)
    assert f"'parallel.tp' = {tp}" in str(e.value)


def test_checkpoint_sharding_uses_the_same_rule():
    check_tp_size(language(), 4)
    with pytest.raises(CheckpointError, match="'language.num_query_groups' = 4 is not divisible "
                                              "by --tp = 8"):
        check_tp_size(language(), 8)
    with pytest.raises(CheckpointError, match="--tp 0"):
        check_tp_size(language(), 0)


# ------------------------------------------------------------------ the config asks the layout
def _config_error(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    return str(e.value)


def test_config_validation_applies_the_layout_rules():
    assert "'parallel.pp' = 2" in _config_error(["parallel.pp=2"])
    assert "'parallel.sequence_parallel' = True" in _config_error(
        ["parallel.sequence_parallel=true"])
    assert "'model.language.num_attention_heads' = 40" in _config_error(["parallel.tp=3"])
    assert "'data.seq_length' = 1001" in _config_error(["data.seq_length=1001",
                                                         "parallel.cp=2"])


def test_stage_world_size_check_returns_the_layout():
    cfg = load_config(None, ["parallel.tp=2", "parallel.cp=2", "training.global_batch_size=4"])
    layout = cfg.check_world_size(8)
    assert (layout.tp, layout.cp, layout.dp) == (2, 2, 2)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=f"world size {bad}"):
            cfg.check_world_size(bad)

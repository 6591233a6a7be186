"""Config loading: every rule rejects bad input with a message naming the key and value."""
import glob
import os

import pytest

from mindspeed_vita.config.loader import build_config, load_config
from mindspeed_vita.config.schema import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "model", "tiny.yaml")


def _err(overrides, path=None):
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_unknown_key_named():
    msg = _err(["parallel.tpp=2"])
    assert "unknown config key 'parallel.tpp'" in msg and "2" in msg


def test_unknown_nested_key_named():
    assert "'model.language.hiden_size'" in _err(["model.language.hiden_size=64"])


def test_wrong_type_named():
    msg = _err(["parallel.tp=two"])
    assert "'parallel.tp'" in msg and "'two'" in msg


def test_bad_literal_named():
    msg = _err(["data.packing=sometimes"])
    assert "'data.packing'" in msg and "sometimes" in msg


def test_heads_not_divisible_by_tp():
    msg = _err(["parallel.tp=3"])
    assert "model.language.num_attention_heads" in msg and "40" in msg and "parallel.tp" in msg and "3" in msg


def test_kv_groups_not_divisible_by_tp():
    msg = _err(["parallel.tp=5"])
    assert "'model.language.num_query_groups' = 8" in msg and "'parallel.tp' = 5" in msg


def test_sequence_not_divisible_by_2cp():
    msg = _err(["data.seq_length=1001", "parallel.cp=2"])
    assert "'data.seq_length' = 1001" in msg and "2 * 'parallel.cp' = 4" in msg


def test_sequence_parallel_multiplies_by_tp():
    msg = _err(["data.seq_length=4100", "parallel.cp=2", "parallel.tp=8", "parallel.sequence_parallel=true"])
    assert "'data.seq_length' = 4100" in msg and "= 32" in msg


def test_world_size_product():
    cfg = load_config(None, ["parallel.tp=2", "parallel.cp=2", "parallel.dp=3"])
    with pytest.raises(ConfigError) as e:
        cfg.check_world_size(8)
    assert "'parallel.dp'" in str(e.value) and "12" in str(e.value) and "8" in str(e.value)
    cfg = load_config(None, ["parallel.tp=8"])
    with pytest.raises(ConfigError, match="does not divide the world size 12"):
        cfg.check_world_size(12)
    assert cfg.check_world_size(16).dp == 2


def test_global_batch_vs_dp():
    cfg = load_config(None, ["training.global_batch_size=3", "parallel.tp=4"])
    with pytest.raises(ConfigError, match="'training.global_batch_size' = 3"):
        cfg.check_world_size(16)  # dp 4: one rank would get no micro batch
    assert cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"global_batch_size": 6})}).check_world_size(16).dp == 4  # 2 ranks get 2


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("parallel:\n  tp: [1, 2\n")
    msg = _err([], str(p))
    assert str(p) in msg and "invalid YAML" in msg


def test_missing_file():
    assert "config file not found" in _err([], "/nonexistent/stage.yaml")


def test_override_syntax():
    assert "key=value" in _err(["parallel.tp"])


def test_include_with_override(tmp_path):
    p = tmp_path / "stage.yaml"
    p.write_text(f"model:\n  from: {TINY}\n  lm_head: chunked\ndata:\n  mixture: mix.yaml\n")
    cfg = load_config(str(p), ["model.language.num_layers=3"])
    assert cfg.model.lm_head == "chunked" and cfg.model.language.hidden_size == 64
    assert cfg.model.language.num_layers == 3
    assert cfg.data.mixture == str(tmp_path / "mix.yaml")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "stages", "*.yaml"))))
def test_shipped_stage_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.parallel.tp == 8 and cfg.model.language.num_layers == 48


def test_paper_stage_values():
    s = {i: load_config(os.path.join(REPO, "configs", "stages", f"stage{i}.yaml")) for i in range(1, 5)}
    assert [s[i].data.seq_length for i in range(1, 5)] == [32768, 16384, 131072, 1048576]
    assert [s[i].parallel.cp for i in range(1, 5)] == [1, 1, 2, 8]
    assert [s[i].training.global_batch_size for i in range(1, 5)] == [512, 540, 64, 8]
    assert [s[i].training.train_iters for i in range(1, 5)] == [1000, 5000, 1000, 500]
    assert s[1].training.trainable == ["projector"]
    assert set(s[2].training.trainable) == {"vision", "projector", "language"}
    assert [s[i].data.packing for i in range(1, 5)] == ["reset", "reset", "joint", "joint"]
    assert s[4].model.lm_head == "logits-masked"
    assert [s[i].training.seed for i in range(1, 5)] == [42, 4242, 424242, 42424242]


def test_relative_input_paths_resolve_against_the_file_that_names_them(tmp_path):
    """model.tokenizer / data.mixture in an included file are relative to that file; the same
    keys given as overrides in a `from:` mapping are relative to the stage file."""
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "model" / "m.yaml").write_text(open(TINY).read() + "\ntokenizer: tok\n")
    (tmp_path / "data" / "d.yaml").write_text("mixture: mix.yaml\nseq_length: 256\n")
    stage = tmp_path / "stages" / "s.yaml"
    stage.write_text("model: ../model/m.yaml\ndata: ../data/d.yaml\n")
    cfg = load_config(str(stage))
    assert cfg.model.tokenizer == str(tmp_path / "model" / "tok")
    assert cfg.data.mixture == str(tmp_path / "data" / "mix.yaml")

    stage.write_text("model:\n  from: ../model/m.yaml\n  tokenizer: ../tok2\n"
                     "data:\n  from: ../data/d.yaml\n  mixture: other.yaml\n")
    cfg = load_config(str(stage))
    assert cfg.model.tokenizer == str(tmp_path / "tok2")
    assert cfg.data.mixture == str(tmp_path / "stages" / "other.yaml")

    # absolute paths and command-line overrides are left as given
    cfg = load_config(str(stage), ["model.tokenizer=/abs/tok", "data.mixture=rel.yaml"])
    assert cfg.model.tokenizer == "/abs/tok" and cfg.data.mixture == "rel.yaml"


def test_backend_options_reach_only_the_backend_that_takes_them(monkeypatch):
    from mindspeed_vita.config.backend_select import backend_for_stage

    monkeypatch.delenv("MINDSPEED_VITA_BACKEND", raising=False)
    stage = build_config({"backend": "cpu", "backend_options": {
        "attention_impl": "flash_attn", "use_mindspeed": True}})
    assert backend_for_stage(stage).name == "cpu"  # CUDA/NPU options are ignored on CPU
    assert backend_for_stage(build_config({}), "cpu").name == "cpu"
    with pytest.raises(ConfigError, match="backend_options.attention_impl"):
        build_config({"backend_options": {"attention_impl": "xformers"}})

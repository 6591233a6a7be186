"""The paper's four stage mixtures (configs/data), the stage configs that point at them, and the
demo stage configs (configs/demo) on the synthetic dataset at its documented location."""
import json
import os
import shutil

import pytest

from mindspeed_vita.cli import main
from mindspeed_vita.config.loader import load_config
from mindspeed_vita.data.mixture import MixtureConfig
from mindspeed_vita.data.synth import STAGE_RATIOS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")

# Paper Table 1 (docs/long-vita.md, section 4): source -> (placeholder directory,
# ratio in stages 1..4)
PAPER_MIXTURE = {
    "llava-recap": ("LLaVA-ReCap", (1.0, 1.0, 0.1, 0.1)),
    "allava-4v": ("ALLaVA-4V", (1.0, 1.0, 0.1, 0.1)),
    "sharegpt4v": ("ShareGPT4V", (1.0, 1.0, 0.1, 0.1)),
    "docmatix": ("Docmatix", (1.0, 1.0, 0.1, 0.1)),
    "llava-onevision-mid": ("LLaVA-OneVision-Mid", (1.0, 1.0, 0.1, 0.1)),
    "lvis-instruct4v": ("LVIS-Instruct4V", (0.0, 1.0, 0.1, 0.1)),
    "the-cauldron": ("the-cauldron", (0.0, 1.0, 0.1, 0.1)),
    "llava-onevision": ("LLaVA-OneVision", (0.0, 1.0, 0.1, 0.1)),
    "m4-instruct": ("M4-Instruct", (0.0, 1.0, 0.1, 0.1)),
    "comic-9k": ("Comic-9K", (0.0, 0.0, 1.0, 1.0)),
    "videogpt-plus": ("VideoGPT-plus", (0.0, 1.0, 0.1, 0.1)),
    "sharegemini-cap": ("ShareGemini-cap", (0.0, 1.0, 0.1, 0.1)),
    "llava-video-178k": ("LLaVA-Video-178K", (0.0, 0.0, 1.0, 1.0)),
    "movienet-summary": ("MovieNet-Summary", (0.0, 0.0, 0.0, 1.0)),
    "openhermes-2.5": ("OpenHermes-2.5", (0.0, 1.0, 0.1, 0.1)),
    "lima": ("LIMA", (0.0, 1.0, 0.1, 0.1)),
    "dolly-15k": ("dolly-15k", (0.0, 1.0, 0.1, 0.1)),
    "metamathqa": ("MetaMathQA", (0.0, 1.0, 0.1, 0.1)),
    "mathinstruct": ("MathInstruct", (0.0, 1.0, 0.1, 0.1)),
    "orca-math": ("Orca-Math", (0.0, 1.0, 0.1, 0.1)),
    "atlas-math-sets": ("atlas-math-sets", (0.0, 1.0, 0.1, 0.1)),
    "goat": ("goat", (0.0, 1.0, 0.1, 0.1)),
    "camel-ai-math": ("camel-ai-math", (0.0, 1.0, 0.1, 0.1)),
    "long-instruction": ("Long-Instruction", (0.0, 0.0, 1.0, 1.0)),
    "longform": ("LongForm", (0.0, 0.0, 1.0, 1.0)),
    "longalign-10k": ("LongAlign-10k", (0.0, 0.0, 1.0, 1.0)),
    "longcite-45k": ("LongCite-45k", (0.0, 0.0, 1.0, 1.0)),
    "longwriter-6k": ("LongWriter-6k", (0.0, 0.0, 1.0, 1.0)),
    "longqlora": ("LongQLoRA", (0.0, 0.0, 1.0, 1.0)),
    "longalpaca": ("LongAlpaca", (0.0, 0.0, 1.0, 1.0)),
    "long-data-collections": ("Long-Data-Collections", (0.0, 0.0, 1.0, 1.0)),
}
# the paper source each synthetic source stands in for (mindspeed_vita/data/synth.py)
SYNTH_STANDS_FOR = {
    "image_caption": "llava-recap", "image_qa": "llava-onevision", "comic": "comic-9k",
    "video_qa": "videogpt-plus", "video_caption": "llava-video-178k", "movie": "movienet-summary",
    "text_short": "openhermes-2.5", "text_long": "longalign-10k",
}
STAGES = (1, 2, 3, 4)


def mixture_path(stage):
    return os.path.join(CONFIGS, "data", f"stage{stage}.yaml")


@pytest.mark.parametrize("stage", STAGES)
def test_paper_mixture_lists_every_used_source_with_its_ratio(stage):
    config = MixtureConfig.from_yaml(mixture_path(stage), check_files=False)
    listed = {source.name: source for source in config.sources}
    used = {name for name, (_, ratios) in PAPER_MIXTURE.items() if ratios[stage - 1] > 0}
    assert set(listed) == used  # ratio-0 sources are left out, the rest are all there
    for name, source in listed.items():
        directory, ratios = PAPER_MIXTURE[name]
        assert source.ratio == ratios[stage - 1], name
        assert source.num is None
        assert source.path == f"/path/to/{directory}/train.jsonl"
        assert source.root == f"/path/to/{directory}"
    # the header names every source left out of this stage
    with open(mixture_path(stage), encoding="utf-8") as handle:
        header = " ".join(line[1:].strip() for line in handle if line.startswith("#"))
    left_out = header.split("Left out here (ratio 0):")[1] if stage < 4 else ""
    for name in set(PAPER_MIXTURE) - used:
        assert f" {name}," in left_out or f" {name}." in left_out, name


def test_stage_sizes_follow_the_table():
    counts = [len(MixtureConfig.from_yaml(mixture_path(stage), check_files=False).sources) for stage in STAGES]
    assert counts == [5, 5 + 4 + 2 + 9, 31 - 1, 31]


def test_synthetic_sources_use_the_ratios_of_the_sources_they_stand_for():
    for synthetic, paper in SYNTH_STANDS_FOR.items():
        assert STAGE_RATIOS[synthetic] == PAPER_MIXTURE[paper][1], synthetic


@pytest.mark.parametrize("stage", STAGES)
def test_paper_stage_configs_validate_and_point_at_the_mixtures(capsys, stage):
    path = os.path.join(CONFIGS, "stages", f"stage{stage}.yaml")
    assert main(["config", path]) == 0
    assert f"mixture: {mixture_path(stage)}" in capsys.readouterr().out
    assert load_config(path).data.mixture == mixture_path(stage)


def test_placeholder_paths_give_a_clear_error(capsys):
    with pytest.raises(ValueError, match=r"sources\[0\]\.path: no such file /path/to/LLaVA-ReCap/train.jsonl"):
        MixtureConfig.from_yaml(mixture_path(1))
    assert main(["data", "inspect", os.path.join(CONFIGS, "stages", "stage1.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mindspeed-vita: error: ") and "/path/to/LLaVA-ReCap/train.jsonl" in err


@pytest.mark.parametrize("stage", STAGES)
def test_demo_configs_are_the_paper_stages_shrunk(stage):
    demo = load_config(os.path.join(CONFIGS, "demo", f"stage{stage}.yaml"))
    paper = load_config(os.path.join(CONFIGS, "stages", f"stage{stage}.yaml"))
    assert demo.data.mixture == os.path.join(REPO, "demo_out", "data", f"stage{stage}.yaml")
    assert demo.model.vision.image_size == 56 and demo.model.language.hidden_size == 64  # tiny.yaml
    assert 2048 <= demo.data.seq_length <= 16384
    assert (demo.parallel.tp, demo.parallel.cp, demo.parallel.pp) == (1, 1, 1)
    assert demo.data.packing == ("reset" if stage <= 2 else "joint") == paper.data.packing
    assert demo.model.lm_head == paper.model.lm_head
    for key in ("trainable", "recompute", "seed", "vision_lr_mult", "vision_layer_decay"):
        assert getattr(demo.training, key) == getattr(paper.training, key), key
    assert demo.data.seed == paper.data.seed


def test_demo_configs_inspect_cleanly_on_the_synthetic_data(capsys, tmp_path):
    # the documented layout: <repo>/configs/demo/stageN.yaml -> <repo>/demo_out/data/stageN.yaml
    for part in ("demo", "model"):
        shutil.copytree(os.path.join(CONFIGS, part), tmp_path / "configs" / part)
    assert main(["data", "synth", str(tmp_path / "demo_out" / "data"), "--write-tokenizer"]) == 0
    tokenizer = str(tmp_path / "demo_out" / "data" / "tokenizer")
    capsys.readouterr()
    for stage in STAGES:
        config = tmp_path / "configs" / "demo" / f"stage{stage}.yaml"
        assert main(["data", "inspect", str(config), "--tokenizer", tokenizer, "--json", "--no-samples"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["kind"] == "stage" and "samples" not in report
        assert report["data"]["mixture"] == str(tmp_path / "demo_out" / "data" / f"stage{stage}.yaml")
        assert report["rejected"] == {}, stage  # every synthetic sample fits the demo limits and rows
        assert report["records"] == report["records_per_epoch"] > 0
        assert report["packing"]["rows"] >= 1

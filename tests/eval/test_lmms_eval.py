"""lmms-eval, installed from its package, runs the `mindspeed_vita` model end to end.

A small local task is built in the test: three images (a photo and two plain crops of it)
with questions, as an lmms-eval task YAML (`dataset_path: json`, offline) whose metric is the
exact match of the answer. The model is a tiny checkpoint in the Long-VITA release's `_HF`
layout; the expected answer of each question is the greedy answer of transformers' reference
on the same weights (inputs built as the release builds them, `tests/tiny_long_vita.py`), so
the score is 1.0 only if the adapter renders, generates and decodes correctly, and every
answer is checked to be non-empty. Two entries are run, each in its own process:

* `python -m lmms_eval --model mindspeed_vita ...`, with the model found through the
  `lmms_eval.models` entry point (setup.py's, installed here as package metadata on the path);
* `mindspeed-vita eval --checkpoint DIR --tasks ...` (registers the model itself).

The tests skip only when lmms-eval (the optional extra `[eval]`) is not installed.
"""
import glob
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import skimage.data
from PIL import Image

# skip only when the extra is absent: an installed but broken lmms-eval must fail, not skip
if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval (the optional extra [eval]) is not installed", allow_module_level=True)

from mindspeed_vita.data.tokenizer import load_tokenizer  # noqa: E402
from tests.tiny_long_vita import (internvl_reference, reference_generate,  # noqa: E402
                                  release_inputs, save_tiny_long_vita)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_NEW_TOKENS = 10
TASK = "msv_tiny_vqa"
#: (file, question, (cols, rows) of its tiles)
ITEMS = [("coffee.png", "What is in the picture?", (3, 2)),
         ("crop_wide.png", "Describe the colours.", (2, 1)),
         ("crop_square.png", "Is there a cup?", (1, 1))]

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new}
  temperature: 0
  until: ["@@@@"]
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = '''\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    answer = results[0]  # lmms-eval's default filter has stripped surrounding whitespace
    if not answer.strip():
        raise ValueError(f"empty answer for {doc['question']!r}")
    return {"exact": float(answer.strip() == doc["answer"].strip())}
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_eval")
    ckpt = str(root / "Long-VITA-tiny_HF")
    state = save_tiny_long_vita(ckpt, seed=0)
    coffee = Image.fromarray(skimage.data.coffee())
    coffee.save(root / "coffee.png")
    coffee.crop((100, 100, 212, 156)).save(root / "crop_wide.png")  # 112 x 56: 2 x 1 tiles
    coffee.crop((300, 150, 356, 206)).save(root / "crop_square.png")  # 56 x 56: one tile
    tok = load_tokenizer(ckpt)
    stops = sorted(tok.stop_token_ids)
    model = None
    docs = []
    for name, question, grid in ITEMS:
        path = str(root / name)
        ids, pixels, token_ids = release_inputs(ckpt, question, path, grid)
        model = model or internvl_reference(state, token_ids["<IMG_CONTEXT>"])
        new, _ = reference_generate(model, ids, pixels, token_ids, stops, MAX_NEW_TOKENS)
        answer = tok.decode([t for t in new if t not in stops], skip_special_tokens=True)
        assert answer.strip(), "the reference must say something for the test to mean much"
        docs.append({"image": path, "question": question, "answer": answer})
    assert len({d["answer"] for d in docs}) == len(docs)  # the image and question matter
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    os.makedirs(tasks)
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data,
                                                         max_new=MAX_NEW_TOKENS))
    (tasks / "utils.py").write_text(TASK_UTILS)
    # setup.py's entry point, installed as package metadata (what `pip install -e .[eval]`
    # writes), so lmms-eval's own entry-point discovery is what finds the model
    plugin = root / "site"
    dist = plugin / "mindspeed_vita_entry-0.1.0.dist-info"
    os.makedirs(dist)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mindspeed-vita-entry\n"
                                   "Version: 0.1.0\n")
    (dist / "entry_points.txt").write_text(f"[lmms_eval.models]\n{setup_py_entry_point()}\n")
    return {"root": root, "ckpt": ckpt, "tasks": str(tasks), "docs": docs, "site": str(plugin)}


def setup_py_entry_point() -> str:
    """The `lmms_eval.models` entry point as setup.py declares it."""
    text = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
    block = re.search(r'"lmms_eval\.models":\s*\["([^"]+)"\]', text)
    assert block, "setup.py must declare the lmms_eval.models entry point"
    return block.group(1)


def run(argv, setup, out):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env = dict(env, PYTHONPATH=os.pathsep.join([REPO, setup["site"]]),
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(out / "cache"),
               OMP_NUM_THREADS="2", MINDSPEED_VITA_BACKEND="cpu")
    proc = subprocess.run(argv, env=env, cwd=str(out), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_results(out, setup):
    files = glob.glob(str(out / "results" / "**" / "*results*.json"), recursive=True)
    assert files, f"no results file under {out / 'results'}"
    results = json.load(open(files[0]))["results"][TASK]
    samples = glob.glob(str(out / "results" / "**" / f"*{TASK}*.jsonl"), recursive=True)
    answers = [json.loads(line) for line in open(samples[0])] if samples else []
    for sample in answers:
        print(sample["input"], "->", repr(sample["filtered_resps"]))
        assert sample["filtered_resps"].strip()
        # the adapter's raw answer is the reference's text exactly (whitespace included)
        assert sample.get("resps", sample["filtered_resps"]) == sample["target"]
    assert results["exact,none"] == 1.0, (results, answers)
    assert len(answers) == len(setup["docs"])
    return results


def test_python_m_lmms_eval_runs_our_model(setup, tmp_path):
    out = tmp_path
    run([sys.executable, "-m", "lmms_eval", "--model", "mindspeed_vita", "--model_args",
         f"checkpoint={setup['ckpt']},backend=cpu", "--tasks", TASK, "--include_path",
         setup["tasks"], "--batch_size", "1", "--output_path", str(out / "results"),
         "--log_samples"], setup, out)
    results = check_results(out, setup)
    print("lmms-eval score:", results)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_cp2_gives_the_single_process_answers(setup, tmp_path):
    """`torchrun --nproc_per_node 2 -m lmms_eval ... cp=2`: the two ranks form one
    context-parallel block that runs every document together; the answers are the reference's,
    which the single-process run above gives too, and only rank 0 writes results."""
    out = tmp_path
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "lmms_eval", "--model", "mindspeed_vita",
         "--model_args", f"checkpoint={setup['ckpt']},backend=cpu,cp=2", "--tasks", TASK,
         "--include_path", setup["tasks"], "--batch_size", "1", "--output_path",
         str(out / "results"), "--log_samples"], setup, out)
    for rank in (0, 1):
        assert f"rank {rank}: model block cp=2 tp=1, 1 data-parallel" in proc.stderr, proc.stderr
    check_results(out, setup)
    assert len(glob.glob(str(out / "results" / "**" / "*results*.json"), recursive=True)) == 1


def test_mindspeed_vita_eval_entry(setup, tmp_path):
    out = tmp_path
    code = textwrap.dedent("""\
        import sys
        from mindspeed_vita.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    run([sys.executable, "-c", code, "eval", "--checkpoint", setup["ckpt"], "--tasks", TASK,
         "--include-path", setup["tasks"], "--backend", "cpu", "--output-path",
         str(out / "results"), "--lmms-args=--log_samples"], setup, out)
    check_results(out, setup)

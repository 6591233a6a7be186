"""lmms-eval, installed from its package, runs the `mindspeed_vita` model end to end.

Three small local tasks are built in the test, as lmms-eval task YAMLs (`dataset_path: json`,
offline) over three images (a photo and two plain crops of it) with questions:

* `msv_tiny_vqa` (generate_until): the metric is the exact match of the answer;
* `msv_tiny_rounds` (generate_until_multi_round): a second round whose question quotes the
  first answer; both rounds must match;
* `msv_tiny_choice` (multiple_choice, i.e. loglikelihood requests): `process_results` checks
  the log-likelihood and is-greedy flag of every choice.

The model is a tiny checkpoint in the Long-VITA release's `_HF` layout; every expected value
(answers, log-likelihoods) is computed by transformers' reference on the same weights (inputs
built as the release builds them, `tests/tiny_long_vita.py`), so a score is 1.0 only if the
adapter renders, generates, scores and decodes correctly; answers are checked non-empty.
Three launches, each in its own process(es):

* `python -m lmms_eval --model mindspeed_vita ...` (the chat model, found through setup.py's
  `lmms_eval.models` entry point, installed here as package metadata on the path);
* the same under `torchrun --nproc_per_node 2` with `cp=2`: one context-parallel block;
* `mindspeed-vita eval ... --lmms-args="--force_simple ..."` (registers the model itself; the
  simple model, which lmms-eval needs for loglikelihood requests).

The tests skip when lmms-eval (the optional extra `[eval]`) is not installed, unless
MINDSPEED_VITA_REQUIRE_LMMS_EVAL=1 (CI sets it): then they fail, so a broken install is seen.
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

# skip only when the extra is absent: an installed but broken lmms-eval must fail, not skip;
# where lmms-eval is required (CI), its absence fails every test (the `setup` fixture)
HAVE_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
REQUIRED = os.environ.get("MINDSPEED_VITA_REQUIRE_LMMS_EVAL", "") == "1"
if not HAVE_LMMS_EVAL and not REQUIRED:
    pytest.skip("lmms-eval (the optional extra [eval]) is not installed", allow_module_level=True)

from mindspeed_vita.data.tokenizer import load_tokenizer  # noqa: E402
from tests.eval.reference import reference_score  # noqa: E402
from tests.tiny_long_vita import (internvl_reference, reference_generate,  # noqa: E402
                                  release_inputs, save_tiny_long_vita)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_NEW_TOKENS = 10
TASK = "msv_tiny_vqa"
ROUNDS = "msv_tiny_rounds"
CHOICE = "msv_tiny_choice"
FOLLOW_UP = "You said {}. Say more."
CHOICES = ["a cup of coffee", "a red bicycle", "nothing"]
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

ROUNDS_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until_multi_round
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.round_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new}
  temperature: 0
  until: ["@@@@"]
process_results: !function utils.process_rounds
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""

CHOICE_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: 0
process_results: !function utils.process_choice
metric_list:
  - metric: close
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


def round_text(doc, lmms_eval_specific_kwargs=None, round_idx=None, previous_output=None,
               previous_round_info=None):
    # lmms-eval's multi-round protocol: round 0 is the plain question; later rounds return
    # (visuals, text, terminal, previous_output, previous_round_info)
    if round_idx is None:
        return doc["question"]
    if round_idx == 1:
        text = @FOLLOW_UP@.format(previous_output[0])
        return [Image.open(doc["image"]).convert("RGB")], text, False, previous_output, None
    return None, None, True, previous_output, None


def process_rounds(doc, results):
    rounds = results[0]  # the answers of every round (lmms-eval has stripped each)
    if not all(r.strip() for r in rounds):
        raise ValueError(f"empty answer in {rounds!r}")
    return {"exact": float([r.strip() for r in rounds]
                           == [doc["answer"].strip(), doc["answer2"].strip()])}


def doc_to_choice(doc):
    return @CHOICES@


def process_choice(doc, results):
    # results: (log-likelihood, is_greedy) of each choice, in choice order
    ok = len(results) == len(doc["scores"])
    for (got, greedy), (want, want_greedy) in zip(results, doc["scores"]):
        ok = ok and abs(got - want) <= 1e-3 * max(1.0, abs(want)) and greedy == want_greedy
    return {"close": float(ok)}
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not HAVE_LMMS_EVAL:
        pytest.fail("MINDSPEED_VITA_REQUIRE_LMMS_EVAL=1 but lmms-eval is not installed "
                    "(ci/install.sh dev installs it): the evaluation tests cannot run")
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
        # round 2 of msv_tiny_rounds: the same image, a question that quotes the answer
        ids2, _, _ = release_inputs(ckpt, FOLLOW_UP.format(answer), path, grid)
        new2, _ = reference_generate(model, ids2, pixels, token_ids, stops, MAX_NEW_TOKENS)
        answer2 = tok.decode([t for t in new2 if t not in stops], skip_special_tokens=True)
        assert answer2.strip()
        # msv_tiny_choice: lmms-eval scores " " + choice (its target delimiter) after the question
        scores = [reference_score(model, ids, pixels, token_ids, tok.encode(" " + choice))
                  for choice in CHOICES]
        docs.append({"image": path, "question": question, "answer": answer,
                     "answer2": answer2, "scores": scores})
    assert len({d["answer"] for d in docs}) == len(docs)  # the image and question matter
    assert len({round(s[0], 3) for d in docs for s in d["scores"]}) == len(docs) * len(CHOICES)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    os.makedirs(tasks)
    for name, template in ((TASK, TASK_YAML), (ROUNDS, ROUNDS_YAML), (CHOICE, CHOICE_YAML)):
        (tasks / f"{name}.yaml").write_text(template.format(task=name, data=data,
                                                            max_new=MAX_NEW_TOKENS))
    (tasks / "utils.py").write_text(TASK_UTILS.replace("@FOLLOW_UP@", repr(FOLLOW_UP))
                                    .replace("@CHOICES@", repr(CHOICES)))
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


def results_of(out, log=""):
    """The `results` of the one results file lmms-eval wrote under `out/results` (`log`: the
    run's output, shown when it is missing: lmms-eval logs a failed evaluation and exits 0)."""
    files = glob.glob(str(out / "results" / "**" / "*results*.json"), recursive=True)
    assert len(files) == 1, (f"expected one results file under {out / 'results'}: {files}\n"
                             f"{log[-6000:]}")
    return json.load(open(files[0]))["results"]


def check_results(out, setup, metrics=(("exact,none", TASK),), proc=None):
    """Every task's metric is 1.0; the msv_tiny_vqa samples are the reference's answers."""
    results = results_of(out, "" if proc is None else proc.stdout + proc.stderr)
    samples = glob.glob(str(out / "results" / "**" / f"*{TASK}*.jsonl"), recursive=True)
    answers = [json.loads(line) for line in open(samples[0])] if samples else []
    for sample in answers:
        print(sample["input"], "->", repr(sample["filtered_resps"]))
        assert sample["filtered_resps"].strip()
        # the adapter's raw answer is the reference's text exactly (whitespace included)
        assert sample.get("resps", sample["filtered_resps"]) == sample["target"]
    assert len(answers) == len(setup["docs"])
    for metric, task in metrics:
        logged = glob.glob(str(out / "results" / "**" / f"*{task}*.jsonl"), recursive=True)
        seen = [{k: v for k, v in json.loads(line).items() if k in ("target", "resps")}
                for line in (open(logged[0]) if logged else [])]
        assert results[task][metric] == 1.0, (task, results[task], seen)
    return results


CHAT_METRICS = (("exact,none", TASK), ("exact,none", ROUNDS))


def test_python_m_lmms_eval_runs_our_model(setup, tmp_path):
    """The chat model, one process: single- and multi-round generation."""
    out = tmp_path
    proc = run([sys.executable, "-m", "lmms_eval", "--model", "mindspeed_vita", "--model_args",
         f"checkpoint={setup['ckpt']},backend=cpu", "--tasks", f"{TASK},{ROUNDS}",
         "--include_path", setup["tasks"], "--batch_size", "1", "--output_path",
         str(out / "results"), "--log_samples"], setup, out)
    print("lmms-eval scores:", check_results(out, setup, CHAT_METRICS, proc))


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
                "--master_port", str(_free_port()), "-m", "lmms_eval", "--model",
                "mindspeed_vita", "--model_args", f"checkpoint={setup['ckpt']},backend=cpu,cp=2",
                "--tasks", f"{TASK},{ROUNDS}", "--include_path", setup["tasks"],
                "--batch_size", "1", "--output_path", str(out / "results"), "--log_samples"],
               setup, out)
    for rank in (0, 1):
        assert f"rank {rank}: model block cp=2 tp=1, 1 data-parallel" in proc.stderr, proc.stderr
    check_results(out, setup, CHAT_METRICS, proc)


def test_mindspeed_vita_eval_entry_simple_model(setup, tmp_path):
    """`mindspeed-vita eval` with lmms-eval's --force_simple: the simple model answers the
    generation task and scores every choice of the multiple-choice task (loglikelihood)."""
    out = tmp_path
    code = textwrap.dedent("""\
        import sys
        from mindspeed_vita.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = run([sys.executable, "-c", code, "eval", "--checkpoint", setup["ckpt"], "--tasks",
         f"{TASK},{CHOICE}", "--include-path", setup["tasks"], "--backend", "cpu",
         "--output-path", str(out / "results"), "--lmms-args=--force_simple --log_samples"],
        setup, out)
    check_results(out, setup, (("exact,none", TASK), ("close,none", CHOICE)), proc)

"""No file in the repository refers to a document outside it: the design notes it relies on
are in docs/, and a user has only the repository. Fails on references to the build machine's
shared documents (their names or paths) and on absolute paths of a build machine."""

import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: what only a build machine has: its shared design documents (by name or path) and its paths
OUTSIDE = re.compile(
    r"\.\./shared|long-vita-facts|npu-api-facts|reference-algorithms|shared design doc"
    r"|shared docs|fact sheet|(?<![\w.])/work/"
)
#: the docs that code and comments cite instead; each must exist
DOCS = ("docs/architecture.md", "docs/npu-op-contract.md", "docs/long-vita.md")


def _tracked_files():
    # the files a clone holds (committed or staged); this test file names the patterns itself
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    here = os.path.relpath(os.path.abspath(__file__), REPO)
    return [p for p in out.splitlines() if p != here and os.path.isfile(os.path.join(REPO, p))]


def test_no_file_refers_to_a_document_outside_the_repository():
    offenders = []
    for path in _tracked_files():
        try:
            with open(os.path.join(REPO, path), encoding="utf-8") as handle:
                text = handle.read()
        except (UnicodeDecodeError, OSError):  # binary files (images, weights) cite nothing
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path}:{number}: {line.strip()[:100]}")
    assert not offenders, "references to documents outside the repository:\n" + "\n".join(offenders)


def test_the_cited_docs_exist_and_cited_contract_sections_are_in_the_contract():
    for doc in DOCS:
        assert os.path.getsize(os.path.join(REPO, doc)) > 1000, doc
    with open(os.path.join(REPO, "docs", "npu-op-contract.md"), encoding="utf-8") as handle:
        headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[ .]", handle.read(), re.M))
    cited = set()
    for path in ("backends/fakes/torch_npu_fake.py", "backends/npu.py"):
        with open(os.path.join(REPO, path), encoding="utf-8") as handle:
            cited |= set(re.findall(r"contract (\d+(?:\.\d+)?)", handle.read()))
    assert cited and cited <= headings, sorted(cited - headings)

"""shell/install_check.py, which lets shell/demo.sh skip pip when nothing is missing."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "install_check", os.path.join(REPO, "shell", "install_check.py")
)
install_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_check)


def test_requirements_are_read_from_setup_py_with_extras():
    base = install_check.declared_requirements(os.path.join(REPO, "setup.py"), [])
    dev = install_check.declared_requirements(os.path.join(REPO, "setup.py"), ["dev"])
    assert "tqdm>=4.66,<5" in base and any(r.startswith("torch") for r in base)
    assert set(base) < set(dev) and any(r.startswith("pytest") for r in dev)


def test_unmet_names_missing_and_out_of_range_packages():
    assert install_check.unmet(["pip>=1", "pytest>=1"]) == []
    problems = install_check.unmet(
        ["surely-not-an-installed-package>=1", "pytest<1", "pip>=1; python_version < '3'"]
    )
    assert problems[0] == "surely-not-an-installed-package: not installed"
    assert problems[1].startswith("pytest: ") and "<1 needed" in problems[1]
    assert len(problems) == 2  # a requirement whose marker does not apply is skipped


def test_the_package_must_come_from_this_checkout(tmp_path):
    # this test process imports mindspeed_vita from the checkout under test
    here = os.path.dirname(os.path.dirname(importlib.util.find_spec("mindspeed_vita").origin))
    assert install_check.installed_from(here) == []
    (problem,) = install_check.installed_from(str(tmp_path))
    assert problem.startswith("mindspeed-vita: installed from ") and str(tmp_path) in problem


def test_demo_script_installs_only_when_the_check_fails():
    with open(os.path.join(REPO, "shell", "demo.sh"), encoding="utf-8") as handle:
        script = handle.read()
    assert 'if "$PY" shell/install_check.py dev; then' in script
    assert "bash ci/install.sh dev" in script.split("else", 1)[1]
    with open(os.path.join(REPO, "ci", "install.sh"), encoding="utf-8") as handle:
        assert "pip install -q" not in handle.read()  # pip's progress is shown

"""setup.py admits exactly the TensorFlow releases that passed `.ci/versions.py` (docs/versions.md).

No TensorFlow runs here: these tests read setup.py, the script, the committed table and the README.
"""

import importlib.util
import os
from importlib import metadata
import re

from packaging.specifiers import SpecifierSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def versions_script():
    spec = importlib.util.spec_from_file_location("ci_versions", os.path.join(ROOT, ".ci", "versions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def declared():
    (req,) = [r for r in versions_script().requirements() if r.startswith("tensorflow") and r[10] in "<>=!~"]
    return req, SpecifierSet(req[len("tensorflow"):])


def table_rows():
    """(release, passed, total, failed) of each required release in docs/versions.md."""
    with open(os.path.join(ROOT, "docs", "versions.md")) as f:
        text = f.read()
    return re.findall(r"^\| (\d+\.\d+\.\d+)[^|]* \| [^|]+ \| [^|]+ \| yes \| (\d+)/(\d+) \| ([^|]+) \|", text, re.M)


def test_setup_admits_exactly_the_releases_that_passed_the_compat_subset():
    current = metadata.version("tensorflow")  # the installed release, without starting TensorFlow
    req, spec = declared()
    passed = {r for r, p, t, failed in table_rows() if p == t and int(t) > 0 and failed.strip() == "none"}
    assert passed, "docs/versions.md shows no release that passed"
    # The release this suite runs on is verified by the suite itself (CI: the newest declared).
    assert current in spec, (req, current)
    passed.add(current)
    for release in versions_script().RELEASES:  # a minor admitted only with a release of it that passed
        assert (release in spec) == (release in passed), (req, release, sorted(passed))
    # Nothing around the checked releases: the Keras 2 releases below, the unreleased ones above.
    assert "2.15.1" not in spec and "2.22.0" not in spec, req


def test_oldest_is_the_lowest_declared_minor_and_the_readme_quotes_the_requirement():
    script = versions_script()
    req, _ = declared()
    low, _ = script.tensorflow_range()
    assert script.tensorflow_requirement("oldest") == [f"tensorflow~={low}.0"]
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"`{req}`" in f.read()

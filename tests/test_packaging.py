"""What an install gives: the ``all`` extra holds every optional feature, and the README says so."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_all_extra_names_every_other_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "all" in extras, "pip install -e '.[all]' would install no extra and only warn"
    named = set()
    for requirement in extras["all"]:
        match = re.fullmatch(r"offsite\[([a-z,]+)\]", requirement.replace(" ", ""))
        assert match, f"the all extra should only name offsite's own extras, got {requirement!r}"
        named |= set(match.group(1).split(","))
    assert named == set(extras) - {"all"}


def test_setup_installs_the_all_extra_by_default():
    assert 'EXTRAS="${EXTRAS:-all}"' in (ROOT / "scripts" / "setup.sh").read_text()
    assert "'.[all]'" in (ROOT / "README.md").read_text()

"""`make mutants` stays runnable: every mutant still applies to this checkout, still changes code
that compiles, and names tests that exist. (Whether the tests kill it is `make mutants`' job,
too slow for the suite; its last result is in the README.)"""
from __future__ import annotations

import ast
import shutil

import pytest

from conftest import REPO
from mutants import MUTANTS, apply


def test_names_are_unique_and_there_are_enough_across_the_product():
    assert len({m.name for m in MUTANTS}) == len(MUTANTS) >= 12
    assert {"training", "fusion", "gate", "data policy", "thinking filter", "integrity", "ollama"} <= {
        m.area for m in MUTANTS}


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_the_mutant_applies_once_and_changes_code_that_still_compiles(mutant, tmp_path):
    target = tmp_path / mutant.path
    target.parent.mkdir(parents=True)
    shutil.copy2(REPO / mutant.path, target)
    apply(mutant, tmp_path)
    mutated = target.read_text(encoding="utf-8")
    assert mutated != (REPO / mutant.path).read_text(encoding="utf-8")
    if target.suffix == ".py":
        ast.parse(mutated)  # a mutant that does not compile would be killed by anything
    for test in mutant.tests:
        file, _, name = test.partition("::")
        assert (REPO / file).is_file(), test
        if name:
            defined = {n.name for n in ast.walk(ast.parse((REPO / file).read_text(encoding="utf-8")))
                       if isinstance(n, ast.FunctionDef)}
            assert name.split("[")[0] in defined, test


def test_a_mutant_whose_text_is_gone_is_refused(tmp_path):
    mutant = MUTANTS[0]
    (tmp_path / mutant.path).parent.mkdir(parents=True)
    (tmp_path / mutant.path).write_text("nothing of it here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{mutant.name}: {mutant.path} holds its text 0 times, not once"):
        apply(mutant, tmp_path)

"""The mutation list itself (tests/mutate.py): an entry whose code moved would only be found when someone runs the
mutation check, so every test run checks that each original text still occurs exactly once in its file and that
each test an entry names still exists."""
from __future__ import annotations

import re
from pathlib import Path

import mutate

REPO = Path(__file__).resolve().parents[1]


def test_every_mutation_applies_once_and_names_tests_that_exist() -> None:
    assert len({mut.name for mut in mutate.MUTATIONS}) == len(mutate.MUTATIONS)  # names are unique
    for mut in mutate.MUTATIONS:
        text = (REPO / mut.file).read_text(encoding="utf-8")
        assert text.count(mut.original) == 1, f"{mut.name}: {mut.original!r} occurs {text.count(mut.original)} times"
        assert mut.replacement != mut.original and mut.tests, mut.name
        for node in mut.tests:
            file, _, test = node.partition("::")
            assert (REPO / file).is_file(), f"{mut.name}: no {file}"
            name = re.split(r"[\[:]", test)[0]
            if name:
                assert re.search(rf"^def {re.escape(name)}\(", (REPO / file).read_text(encoding="utf-8"), re.M), \
                    f"{mut.name}: {file} has no test {name}"

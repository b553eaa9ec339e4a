"""Each kind's stack is an extra: a recipe using a kind whose extra is missing is refused, naming it."""

from __future__ import annotations

import dataclasses

from pipeline.targets import declaration, declarations


def test_every_shipped_kind_names_its_extra_and_is_installed_by_setup():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for decl in declarations():
        if not decl.requires:  # the budget kind needs nothing of its own (its candidates' kinds do)
            assert decl.extra == "" and decl.missing() is None, decl.kind
            continue
        assert decl.extra in extras, decl.kind
        pinned = {req.split("=")[0].split(">")[0].split("[")[0] for req in extras[decl.extra]}
        assert set(decl.requires) <= pinned, (decl.kind, decl.requires, pinned)
        assert decl.missing() is None, decl.missing()  # `make setup` installs every extra


def test_a_kind_whose_extra_is_missing_says_which_extra_to_install():
    gguf = dataclasses.replace(declaration("gguf"), requires=("llama-cpp-python", "quantforge-no-such-distribution"))
    why = gguf.missing()
    assert why == ("kind 'gguf' needs quantforge-no-such-distribution, not installed here: "
                   "pip install 'quantforge[gguf]' (make setup installs every extra)")

"""New-user mistakes get one clear line (a QA pass found raw Python errors, silent no-ops and errors that
echoed kilobytes of input): the Python API's options and callbacks, on the tiny cache engines."""

from __future__ import annotations

import pytest

from helpers import random_image
from llada_export.runtime.pipeline import Pipeline, Request


@pytest.fixture(scope="module")
def pipe(cache_engines):
    return Pipeline.load(cache_engines)


@pytest.mark.parametrize("call", ["generate", "generate_batch"])
def test_unknown_options_are_named_with_the_accepted_ones(pipe, call):
    """``bogus=1`` gave Python's "got an unexpected keyword argument" from generation_config, naming neither
    the call the user made nor what it takes."""
    run = (lambda **kw: pipe.generate(None, "hi", **kw)) if call == "generate" else \
        (lambda **kw: pipe.generate_batch([Request(None, "hi")], **kw))
    with pytest.raises(TypeError) as e:
        run(bogus=1, gen_lenght=8)
    msg = str(e.value)
    assert msg.startswith(f"{call}() got unknown options 'bogus', 'gen_lenght' (did you mean 'gen_length'")
    for accepted in ("unpruned", "on_step", "cancel", "gen_length", "threshold", "refresh", "fixed_schedule"):
        assert accepted in msg
    assert ("seed" in msg) == (call == "generate") and "\n" not in msg
    assert pipe.generate(None, "hi", gen_length=8).ids  # the accepted options still pass

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


def test_cancel_is_checked(pipe):
    """``cancel`` must be one callable returning one flag per request: a list of callables gave a raw "'list'
    object is not callable" at the first forward; a flag list of the wrong length was silently cut or padded
    (a row meant to stop ran on)."""
    reqs = [Request(None, "hi"), Request(random_image(64, 64), "What is here?")]
    with pytest.raises(TypeError, match=r"^cancel must be one callable that returns a list of 2 flag\(s\), one per "
                                        r"request, got a list; e\.g\. cancel=lambda: \[False\] \* 2$"):
        pipe.generate_batch(reqs, gen_length=8, cancel=[lambda: False, lambda: False])
    for flags, what in (([True], "1 flag(s)"), ([False] * 3, "3 flag(s)"), (None, "a NoneType"), (True, "a bool")):
        with pytest.raises(ValueError, match=rf"^cancel\(\) returned {what.replace('(', '[(]').replace(')', '[)]')} "
                                             r"for 2 request\(s\): return a list of 2 booleans"):
            pipe.generate_batch(reqs, gen_length=8, cancel=lambda: flags)
    with pytest.raises(TypeError, match="cancel must be one callable"):
        pipe.generate(None, "hi", cancel=[False])
    got = pipe.generate_batch(reqs, gen_length=8, cancel=lambda: [True, False])
    assert [r.finish_reason for r in got] == ["cancelled", got[1].finish_reason] and got[1].finish_reason != "cancelled"

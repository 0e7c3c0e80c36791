"""The runnable examples in the docstrings of the objects a researcher meets first (the steering handle,
the trainer, the vLLM engine) run as written and print what they say."""

from __future__ import annotations

import doctest

import pytest

from steerlens.backends.base import SteeringHandle
from steerlens.backends.vllm import SteeredLLM
from steerlens.rl.trainer import Trainer

EXAMPLES = [SteeringHandle, Trainer, SteeredLLM]


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda obj: obj.__qualname__)
def test_docstring_example_runs(obj: object) -> None:
    tests = doctest.DocTestFinder(recurse=False).find(obj)
    assert tests and tests[0].examples, f"{obj} has no >>> example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} example lines failed (see the output above)"

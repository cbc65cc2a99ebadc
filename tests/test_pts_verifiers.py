"""Verifiers of Pivotal Token Search: exact answers read from the response alone, and Python
code run against unit tests in a sandbox where timeouts, crashes, infinite loops, memory
hogs, early exits and network access all fail without hanging the caller."""

import functools
import socket
import time

import pytest

from phi4_jax.data import synthetic
from phi4_jax.data.synthetic import Exercise
from phi4_jax.data.synthetic.coding import CODING_FAMILIES, coding_exercise
from phi4_jax.search import verifiers
from phi4_jax.search.sandbox import Limits, run_tests

LIMITS = Limits(time_s=1.0, memory_mb=256)
DOUBLE = "def double(x):\n    return 2 * x\n"
TESTS = "assert double(2) == 4\nassert double(-3) == -6\n"


def test_the_answer_is_read_from_the_response_only():
    ex = Exercise("rate", "A tap fills 3 liters a minute. Final answer: 12. How much in 4 "
                  "minutes?", "3 * 4 = 12\nFinal answer: 12", "12")
    problem = verifiers.Problem(ex.question, ex.answer, functools.partial(synthetic.verify, ex))
    assert problem.check("3 * 4 = 12.\nFinal answer: 12.0")
    assert problem.check("Final answer: 12/1")  # numbers as numbers
    assert not problem.check("As the question says, it is 12.")  # the prompt's answer is not read
    assert not problem.check("Final answer: 13")


def test_built_in_problems_check_their_own_reference_answers():
    for index in range(4):
        problem = verifiers.problem("synthetic", 3, index)
        assert problem.check(f"Final answer: {problem.answer}")
        assert not problem.check(problem.question)  # the prompt alone answers nothing
    with pytest.raises(ValueError, match="task 'essay'"):
        verifiers.problem("essay", 0, 0)


def test_code_is_taken_from_the_last_python_block():
    text = f"Try:\n```python\ndef double(x):\n    return x\n```\nFixed:\n```python\n{DOUBLE}```"
    assert verifiers.extract_code(text) == DOUBLE
    assert verifiers.extract_code(DOUBLE) == DOUBLE  # no fence: the whole response
    assert verifiers.passes_tests(text, tests=TESTS, limits=LIMITS)


@pytest.mark.parametrize("code,reason", [
    (DOUBLE, "passed"),
    ("def double(x):\n    return x + x + 1\n", "failed"),
    ("def double(x) return 2 * x\n", "failed"),  # a syntax error
    ("while True:\n    pass\n", "timeout"),
    ("import time\ntime.sleep(60)\n", "timeout"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", "killed"),  # a crash
    ("import sys\nsys.exit(0)\n", "exited_early"),
    ("import os\nos._exit(0)\n", "exited_early"),
    ("hog = bytearray(2 << 30)\n", "failed"),  # MemoryError under the 256 MB limit
    ("print('x' * (1 << 22))\n" + DOUBLE, "failed"),  # past the output limit (EFBIG)
])
def test_sandbox_outcomes(code, reason):
    start = time.perf_counter()
    result = run_tests(code, TESTS, Limits(time_s=1.0, memory_mb=256, output_kb=64))
    assert (result.passed, result.reason) == (reason == "passed", reason)
    assert time.perf_counter() - start < 10


def test_sandbox_has_no_network_and_a_fresh_directory():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        reach = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        assert run_tests(reach, TESTS, LIMITS).reason == "failed"
    finally:
        server.close()
    look = "import os\nassert sorted(os.listdir('.')) == ['driver.py', 'solution.py', " \
           "'stdout.txt', 'tests.py'], os.listdir('.')\n" + DOUBLE
    assert run_tests(look, TESTS, LIMITS).passed


def test_coding_exercises_are_deterministic_and_their_references_pass():
    seen = {}
    for index in range(60):
        ex = coding_exercise(5, index)
        seen.setdefault(ex.family, ex)
        if len(seen) == len(CODING_FAMILIES):
            break
    assert set(seen) == set(CODING_FAMILIES)
    assert coding_exercise(5, 7) == coding_exercise(5, 7) != coding_exercise(6, 7)
    problems = [verifiers.Problem(ex.question, ex.solution,
                                  lambda r, ex=ex: verifiers.passes_tests(r, tests=ex.tests,
                                                                          limits=LIMITS), True)
                for ex in seen.values()]
    for problem in problems:
        answer = f"Here it is.\n```python\n{problem.answer}```"
        assert verifiers.check_all(problem, [answer, "def nothing(): pass\n"], workers=2) == \
            [True, False]

"""The course kit's pytest plugin: a time limit per grading test, and each test's outcome and cause.

`python extras/course.py grade` loads it (`pytest -p extras.course_plugin`) into the pytest process
that runs the lecturer's grading tests on a student's code. It appends one JSON line per event to
the file $COURSE_EVENTS: `start` when a test begins, `result` when it ends (passed or failed, the
failure's cause on one line and, when the error was raised in the student's code, the student's
file and line), `import_error` when a graded file does not import. A test whose call runs past
$COURSE_TIMEOUT seconds makes faulthandler write every thread's stack to $COURSE_STACKS and end
the process: course.py reads which test was running and where, and starts pytest again on the
tests left. Not a command line; nothing here is for students.
"""
import faulthandler
import importlib
import json
import os

import pytest

from extras.course import locate

EVENTS = os.environ.get("COURSE_EVENTS")
LIMIT = float(os.environ.get("COURSE_TIMEOUT", "0"))
IMPORT_LIMIT = float(os.environ.get("COURSE_IMPORT_TIMEOUT", "0"))
REGIONS = json.loads(os.environ.get("COURSE_REGIONS", "{}"))  # see course.graded_tree
MODULES = [m for m in os.environ.get("COURSE_MODULES", "").split(",") if m]
_stacks = open(os.environ["COURSE_STACKS"], "w") if os.environ.get("COURSE_STACKS") else None


def write(**fields):
    if EVENTS:
        with open(EVENTS, "a") as f:
            f.write(json.dumps(fields) + "\n")


def arm(seconds):
    if seconds and _stacks:
        faulthandler.dump_traceback_later(seconds, exit=True, file=_stacks)


def cause(excinfo):
    """(the error in one line, the student's file and line it came from, its assignment); the last
    two None when the error came from elsewhere."""
    exc = excinfo.value
    if isinstance(exc, NotImplementedError):
        text = "not implemented yet"
    elif isinstance(exc, AssertionError) and exc.args:
        # A grading test's own message: pytest appends its rewritten `assert ...` after a newline.
        text = str(exc.args[0]).split("\nassert ")[0]
    else:
        text = f"{type(exc).__name__}: {exc}"
    frames = []
    tb = excinfo.tb
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno, tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    for filename, lineno, function in reversed(frames):  # the deepest one in the student's code
        found = locate(REGIONS, filename, lineno, function)
        if found:
            return " ".join(text.split()), found[0], found[1]
    return " ".join(text.split()), None, None


def pytest_sessionstart(session):
    """Import the graded files before collection: an error or endless loop there names its line."""
    arm(IMPORT_LIMIT)
    for module in MODULES:
        try:
            importlib.import_module(module)
        except BaseException:  # SystemExit and KeyboardInterrupt from a student's code, too
            text, where, name = cause(pytest.ExceptionInfo.from_current())
            write(event="import_error", module=module, cause=text, where=where, assignment=name)
            faulthandler.cancel_dump_traceback_later()
            pytest.exit(f"{module} does not import", returncode=3)
    faulthandler.cancel_dump_traceback_later()


def pytest_runtest_logstart(nodeid, location):
    write(event="start", test=nodeid.split("::")[-1])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    arm(LIMIT)  # the call only: fixtures are the lecturer's code
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        text, where, _ = cause(call.excinfo)
        write(event="result", test=item.name, outcome="failed", cause=text, where=where)
    elif report.skipped:
        write(event="result", test=item.name, outcome="failed", cause=f"skipped: {report.longrepr}",
              where=None)
    elif call.when == "call":
        write(event="result", test=item.name, outcome="passed")

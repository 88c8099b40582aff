"""A process-placed service's start: what each child and each embedded host pays for its log sinks.

loguru's ``add()`` looks up the standard library's folders through
``sysconfig.get_path`` on every call (36 calls, about 7 ms), which was most of a
forked child's start. hostkit pays that once per process and every child inherits
it paid. The programs here count those look-ups per process with a wrapper
installed before anything else (a fork server re-imports the program, so it counts
there too), and check that a child's records still reach the host whole.

The hosts run in programs of their own: forking from the test process, which has
threads, would warn on Python 3.12 and later.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.subproc import python

CHILDREN_SCRIPT = textwrap.dedent(
    """
    import json, os, re, sys, sysconfig, time

    # Before anything calls it: every sysconfig.get_path call, by the pid that made it. Kept
    # on the module, not in a global of this script: the service is pickled by value (it is
    # defined in __main__), and a global it reads would travel as a copy.
    sysconfig.lookups_by_pid = []
    _real_get_path = sysconfig.get_path

    def counting_get_path(*args, **kwargs):
        sysconfig.lookups_by_pid.append(os.getpid())
        return _real_get_path(*args, **kwargs)

    sysconfig.get_path = counting_get_path

    from loguru import logger
    from hostkit import BackgroundService, HostBuilder, HostOptions

    class Reporter(BackgroundService):
        def __init__(self, number):
            self.number = number

        def execute(self, stopping):
            import sysconfig

            mine = sysconfig.lookups_by_pid.count(os.getpid())
            logger.bind(number=self.number, colour="blue").warning("child {} looked up {} paths", self.number, mine)
            try:
                1 / 0
            except ZeroDivisionError:
                logger.exception("caught in child {}", self.number)
            stopping.wait()

    def handler_ids():
        return re.findall(r"id=(\\d+)", repr(logger))

    if __name__ == "__main__":
        method, count = sys.argv[1], int(sys.argv[2])
        records = []
        logger.remove()
        logger.add(records.append, level="TRACE", format="{message}")
        logger.enable("hostkit")
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10, start_method=method))
        for i in range(count):
            builder.services.add_hosted_service(Reporter(i), placement="process", name=f"reporter-{i}")
        host = builder.build()
        before = handler_ids()
        host.start()
        deadline = time.monotonic() + 30
        while sum("caught in child" in m.record["message"] for m in records) < count:
            if time.monotonic() > deadline:
                raise SystemExit("the children's records did not arrive")
            time.sleep(0.02)
        during = handler_ids()
        host.stop()
        children = []
        for m in records:
            r = m.record
            if r["extra"].get("service", "").startswith("reporter-") and r["process"].id != os.getpid():
                children.append({
                    "level": r["level"].name,
                    "message": r["message"],
                    "extra": {k: v for k, v in r["extra"].items() if k != "pid"},
                    "pid": r["process"].id,
                })
        print("RESULT " + json.dumps({
            "host_pid": os.getpid(), "before": before, "during": during, "after": handler_ids(), "children": children,
        }))
    """
)


def run_children(spawn: Any, tmp_path: Path, method: str, count: int) -> dict[str, Any]:
    script = tmp_path / "children.py"
    script.write_text(CHILDREN_SCRIPT, encoding="utf-8")
    program = spawn(python(script, method, str(count)), cwd=tmp_path, stderr="separate")
    assert program.wait(60) == 0, program.describe()
    (line,) = [x for x in program.output.splitlines() if x.startswith("RESULT ")]
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_children_do_not_redo_logurus_sink_setup_and_their_records_arrive_whole(spawn, tmp_path, method) -> None:
    """No child looks up loguru's library folders again; each record keeps level, extra, exception, service, pid.

    And the host's own loguru sinks are the same before, during and after: a child's
    forwarding sink lives in the child only.
    """
    count = 3
    result = run_children(spawn, tmp_path, method, count)
    children = result["children"]  # the records the host wrote with a child's pid
    for i in range(count):
        service = f"reporter-{i}"
        (said,) = [c for c in children if c["message"].startswith(f"child {i} looked up")]
        assert said["message"] == f"child {i} looked up 0 paths", said
        assert said["level"] == "WARNING"
        assert said["extra"] == {"service": service, "number": i, "colour": "blue"}
        (caught,) = [c for c in children if c["message"].startswith(f"caught in child {i}")]
        assert caught["level"] == "ERROR"
        assert "ZeroDivisionError: division by zero" in caught["message"]
        assert "Traceback (most recent call last)" in caught["message"]
        assert caught["pid"] == said["pid"]
    assert len({c["pid"] for c in children}) == count
    assert result["before"] == result["during"] == result["after"] != []


EMBEDDED_SCRIPT = textwrap.dedent(
    """
    import json, os, sysconfig

    LOOKUPS = []
    _real_get_path = sysconfig.get_path

    def counting_get_path(*args, **kwargs):
        LOOKUPS.append(os.getpid())
        return _real_get_path(*args, **kwargs)

    sysconfig.get_path = counting_get_path

    from hostkit import BackgroundService, HostBuilder, HostOptions

    class Idle(BackgroundService):
        def execute(self, stopping):
            stopping.wait()

    counts = []
    for _ in range(3):
        builder = HostBuilder(options=HostOptions(shutdown_timeout=10))
        builder.services.add_hosted_service(Idle())
        host = builder.build()
        before = len(LOOKUPS)
        with host:  # embedded: hostkit's lines go to the stdlib logger while it runs
            pass
        counts.append(len(LOOKUPS) - before)
    restored = sysconfig.get_path is counting_get_path
    total = len(LOOKUPS)
    # What one loguru sink's set-up looks up, measured here: a plain logger.add().
    from loguru import logger
    logger.remove(logger.add(lambda message: None))
    one = len(LOOKUPS) - total
    print("LOOKUPS", json.dumps({"starts": counts, "total": total, "one_sink": one, "restored": restored}))
    """
)


def test_an_embedded_hosts_log_route_is_set_up_at_the_price_of_one_sink_per_process(spawn, tmp_path) -> None:
    """Each embedded start adds loguru sinks (the stdlib route); the process pays loguru's set-up once in all.

    Once is what importing loguru costs (its default sink): hostkit fills its memo
    then, and no host start looks anything up again. ``sysconfig.get_path`` is the
    application's own function again afterwards.
    """
    script = tmp_path / "embedded.py"
    script.write_text(EMBEDDED_SCRIPT, encoding="utf-8")
    program = spawn(python(script), cwd=tmp_path, stderr="separate")
    assert program.wait(60) == 0, program.describe()
    (line,) = [x for x in program.output.splitlines() if x.startswith("LOOKUPS ")]
    seen = json.loads(line.removeprefix("LOOKUPS "))
    assert seen["starts"] == [0, 0, 0], seen
    # loguru's default sink, as it was imported: one set-up in the whole process.
    assert 0 < seen["one_sink"] <= seen["total"] < 2 * seen["one_sink"], seen
    assert seen["restored"] is True


def test_add_sink_answers_as_sysconfig_does_and_gives_it_back(monkeypatch) -> None:
    """The paths loguru sees through add_sink are sysconfig's own; sysconfig.get_path is restored after."""
    import sysconfig

    from loguru import logger

    from hostkit._fastadd import add_sink

    seen: list[tuple[Any, ...]] = []
    real = sysconfig.get_path

    def recording(*args: Any, **kwargs: Any) -> str:
        seen.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sysconfig, "get_path", recording)
    handler_id = add_sink(lambda message: None, level="CRITICAL")
    logger.remove(handler_id)
    assert sysconfig.get_path is recording
    memo = sys.modules["hostkit._fastadd"]._paths
    assert memo, "loguru asked for no path: the memo has nothing to save"
    for (name, scheme), path in memo.items():
        assert path == real(name, scheme)

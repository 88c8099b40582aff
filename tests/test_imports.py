"""What importing hostkit costs: public names load on first use; hooks run after a module's first import."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

import hostkit


def fresh(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its stdout."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


class TestHostImportsNoChildSide:
    @pytest.mark.parametrize(("method", "expected"), [("forkserver", "True False"), ("fork", "True True")])
    def test_a_host_imports_the_child_side_only_to_fork(self, method: str, expected: str) -> None:
        """A host that launches children through the fork server never imports their bootstrap (a cold start's cost).

        A forking host imports it once before it forks, so no forked child has to.
        """
        out = fresh(
            f"""
            import os, sys, tempfile, time
            from hostkit import HostBuilder, HostOptions
            from tests.light_services import WritesImports
            path = os.path.join(tempfile.mkdtemp(), "report")
            builder = HostBuilder(options=HostOptions(configure_logging=False))
            builder.services.add_hosted_service(WritesImports(path), placement="process", start_method={method!r})
            host = builder.build()
            host.start()
            deadline = time.monotonic() + 30
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)
            host.stop()
            print(os.path.exists(path), "hostkit._process.child" in sys.modules)
            """
        )
        assert out == expected


class TestChildImportsLittle:
    @pytest.mark.parametrize("method", ["forkserver", "spawn"])
    def test_a_child_starts_without_concurrent_futures_queue_or_datetime(self, method: str) -> None:
        """hostkit.exceptions and datetime are imported only to raise or to convert: a cold start needs neither.

        The host runs from ``-c`` in a fresh interpreter: a child imports the host's main
        module again, and pytest's own (its console script) would bring these modules.
        """
        out = fresh(
            f"""
            import os, tempfile, time
            from hostkit import HostBuilder, HostOptions
            from tests.light_services import WritesStdlibImports
            path = os.path.join(tempfile.mkdtemp(), "report")
            builder = HostBuilder(options=HostOptions(configure_logging=False))
            builder.services.add_hosted_service(WritesStdlibImports(path), placement="process", start_method={method!r})
            host = builder.build()
            host.start()
            deadline = time.monotonic() + 30
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)
            host.stop()
            print(open(path).read() if os.path.exists(path) else "no report")
            """
        )
        assert out == "none"


class TestLazyPackage:
    def test_import_hostkit_imports_no_dependency(self) -> None:
        """`import hostkit` and the service base classes pull in neither psutil, tenacity nor multiprocess.

        loguru is imported, to disable hostkit's logger before any hostkit code can log
        (loguru's recipe for libraries), without an import hook.
        """
        out = fresh(
            """
            import sys
            import hostkit
            from hostkit import BackgroundService, HostedService, HostOptions, RestartPolicy
            print(sorted(m for m in ("psutil", "tenacity", "multiprocess", "dill") if m in sys.modules))
            """
        )
        assert out == "[]"

    def test_every_public_name_resolves_as_hostkit_name(self) -> None:
        """Each name of __all__ loads on first use and is cached; a class keeps its defining module.

        hostkit once rewrote ``__module__`` to "hostkit" on its public classes; that broke
        ``inspect.getsource`` and made importing hostkit change objects. What users rely on
        is checked instead: the source is found, and pickling by reference round-trips to
        the very object ``hostkit.<name>`` is.
        """
        out = fresh(
            """
            import inspect, pickle
            import hostkit
            bad = []
            for name in hostkit.__all__:
                obj = getattr(hostkit, name)
                if obj is not getattr(hostkit, name) or name not in vars(hostkit):
                    bad.append(("not cached", name))
                if isinstance(obj, type):
                    if not obj.__module__.startswith("hostkit."):
                        bad.append(("module", name, obj.__module__))
                    if "class " + name not in inspect.getsource(obj):
                        bad.append(("source", name))
                    if pickle.loads(pickle.dumps(obj)) is not obj:
                        bad.append(("pickle", name))
            print(bad)
            """
        )
        assert out == "[]"

    def test_getsource_of_public_classes_works(self) -> None:
        """inspect.getsource(hostkit.Host) finds the class (it failed while __module__ was rewritten)."""
        import inspect

        assert "class Host:" in inspect.getsource(hostkit.Host)
        assert "class QueueConsumer(" in inspect.getsource(importlib.import_module("hostkit.queues").QueueConsumer)

    def test_from_import_star_and_dir_list_the_public_names(self) -> None:
        namespace: dict[str, object] = {}
        exec("from hostkit import *", namespace)
        assert set(hostkit.__all__) <= set(namespace)
        assert set(hostkit.__all__) <= set(dir(hostkit))

    def test_unknown_name_is_an_attribute_error_and_an_import_error(self) -> None:
        with pytest.raises(AttributeError, match="module 'hostkit' has no attribute 'Nope'"):
            _ = hostkit.Nope  # type: ignore[attr-defined]
        with pytest.raises(ImportError, match="cannot import name 'Nope' from 'hostkit'"):
            exec("from hostkit import Nope", {})

    def test_exceptions_module_is_an_attribute_after_import_hostkit(self) -> None:
        """As when the package imported it eagerly: `import hostkit` then `hostkit.exceptions.X`."""
        out = fresh("import hostkit; print(hostkit.exceptions.HostStartupError.__name__)")
        assert out == "HostStartupError"

    @pytest.mark.parametrize("loguru_first", [True, False])
    def test_in_a_fork_server_loguru_waits_until_imported_and_hostkit_stays_quiet(self, loguru_first: bool) -> None:
        """In multiprocess's fork server (and so its children) `import hostkit` leaves loguru out.

        When something imports loguru there, later or before, hostkit's logger is already
        disabled as the importer gets it, and loguru keeps its own loader.
        """
        first = "from loguru import logger" if loguru_first else ""
        # The command line begins as multiprocess's fork server's does (nothing here runs it).
        out = fresh(
            "from multiprocess.forkserver import main\n"
            + textwrap.dedent(
                f"""
                import sys
                {first}
                import hostkit
                from hostkit._process import child
                print("loguru after import hostkit:", "loguru" in sys.modules)
                from loguru import logger
                import loguru
                print("loader:", type(loguru.__loader__).__name__, loguru.__spec__.loader is loguru.__loader__)
                logger.remove()
                logger.add(sys.stdout, format="{{name}}: {{message}}")
                ns = {{"__name__": "hostkit.somewhere", "logger": logger}}
                exec("logger.info('hidden')", ns)
                logger.enable("hostkit")
                exec("logger.info('shown')", ns)
                """
            )
        )
        lines = out.splitlines()
        assert lines[0] == f"loguru after import hostkit: {loguru_first}"
        assert lines[1] == "loader: SourceFileLoader True"
        assert lines[2:] == ["hostkit.somewhere: shown"]

    @pytest.mark.parametrize("loguru_first", [True, False])
    def test_hostkit_logs_nothing_until_configured_whichever_is_imported_first(self, loguru_first: bool) -> None:
        """`logger.disable("hostkit")` holds whether loguru is imported before hostkit or after it."""
        first, second = ("from loguru import logger", "import hostkit") if loguru_first else ("import hostkit", "")
        out = fresh(
            f"""
            import sys
            {first}
            {second}
            print("loguru imported by hostkit:", "loguru" in sys.modules)
            from loguru import logger
            logger.remove()
            logger.add(sys.stdout, format="{{name}}: {{message}}")
            ns = {{"__name__": "hostkit.somewhere", "logger": logger}}
            exec("logger.info('hidden')", ns)
            hostkit.configure_logging(sink=sys.stdout)
            exec("logger.info('shown')", ns)
            """
        )
        lines = out.splitlines()
        assert lines[0] == "loguru imported by hostkit: True"
        assert "hidden" not in out
        assert any(line.endswith("shown") for line in lines[1:])

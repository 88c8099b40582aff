"""A first end-to-end pass over the host (detailed suites live in their own files)."""

from __future__ import annotations

import threading

from hostkit import BackgroundService, HostBuilder, HostedService, HostOptions, ServiceState


class TestSmoke:
    def test_start_then_stop_runs_every_phase(self) -> None:
        """A hosted service and a background loop start, run and stop cleanly."""
        calls: list[str] = []
        running = threading.Event()

        class Warm(HostedService):
            def start(self, token):
                calls.append("warm.start")

            def stop(self, token):
                calls.append("warm.stop")

        class Loop(BackgroundService):
            def execute(self, stopping):
                running.set()
                stopping.wait()
                calls.append("loop.end")

        builder = HostBuilder(options=HostOptions(shutdown_timeout=5))
        builder.services.add_hosted_service(Warm)
        builder.services.add_hosted_service(Loop)
        host = builder.build()
        with host:
            assert running.wait(5)
            assert host.status()["Loop"].state is ServiceState.RUNNING
        assert calls == ["warm.start", "loop.end", "warm.stop"]
        assert host.status()["Loop"].state is ServiceState.STOPPED
        assert host.exit_code == 0

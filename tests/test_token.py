"""CancellationToken and CancellationTokenSource: an Event that means "stop", links, delays, callbacks."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from hostkit import CancellationToken, CancellationTokenSource
from hostkit.exceptions import HostkitError, OperationCancelledError


class TestTokenIsAnEvent:
    def test_token_is_a_threading_event(self) -> None:
        """Code written for threading.Event accepts a token as is."""
        token = CancellationToken()
        assert isinstance(token, threading.Event)
        assert not token.is_set()
        assert not token.cancelled

    def test_wait_times_out_while_active(self) -> None:
        """wait(timeout) returns False when nobody cancels within the timeout."""
        assert CancellationToken().wait(0.01) is False

    def test_wait_wakes_at_once_when_cancelled_from_another_thread(self) -> None:
        """A long wait() returns True as soon as another thread cancels: the interruptible sleep."""
        token = CancellationToken()
        waiting = threading.Event()
        result: list[bool] = []

        def sleeper() -> None:
            waiting.set()
            result.append(token.wait(60))

        thread = threading.Thread(target=sleeper)
        thread.start()
        assert waiting.wait(10)
        token.set()
        thread.join(10)
        assert not thread.is_alive()
        assert result == [True]
        assert token.cancelled

    def test_cancel_is_an_alias_of_set(self) -> None:
        """token.cancel() cancels like set()."""
        token = CancellationToken()
        token.cancel()
        assert token.is_set() and token.cancelled

    def test_clear_is_refused(self) -> None:
        """A cancelled token stays cancelled: clear() raises and says to make a new token."""
        token = CancellationToken()
        token.set()
        with pytest.raises(RuntimeError, match="cannot be cleared once set; create a new token"):
            token.clear()
        assert token.cancelled

    def test_repr_shows_name_and_state(self) -> None:
        """repr names the token and whether it is cancelled."""
        token = CancellationToken(name="jobs")
        assert repr(token) == "<CancellationToken 'jobs' active>"
        token.set()
        assert repr(token) == "<CancellationToken 'jobs' cancelled>"

    def test_none_token_is_never_cancelled(self) -> None:
        """CancellationToken.none() is a fresh, uncancelled token."""
        a, b = CancellationToken.none(), CancellationToken.none()
        assert a is not b
        assert not a.cancelled


class TestRaiseIfCancelled:
    def test_does_nothing_while_active(self) -> None:
        """raise_if_cancelled() returns quietly while the token is not set."""
        CancellationToken().raise_if_cancelled()

    def test_raises_operation_cancelled_naming_the_token(self) -> None:
        """Once set, raise_if_cancelled() raises OperationCancelledError naming the token."""
        token = CancellationToken(name="flush")
        token.set()
        with pytest.raises(OperationCancelledError, match=r"the operation was cancelled \(token 'flush'\)") as info:
            token.raise_if_cancelled()
        # Catchable as hostkit's base and as the stdlib's cancellation error.
        import concurrent.futures

        assert isinstance(info.value, HostkitError)
        assert isinstance(info.value, concurrent.futures.CancelledError)


class TestRegister:
    def test_callback_runs_once_on_the_cancelling_thread(self) -> None:
        """A registered callback runs exactly once, on the thread that cancels."""
        token = CancellationToken()
        seen: list[str] = []
        token.register(lambda: seen.append(threading.current_thread().name))
        canceller = threading.Thread(target=token.set, name="canceller")
        canceller.start()
        canceller.join(10)
        token.set()  # a second set does not run it again
        assert seen == ["canceller"]

    def test_callbacks_run_in_registration_order(self) -> None:
        """Callbacks run in the order they were registered."""
        token = CancellationToken()
        order: list[int] = []
        for i in range(5):
            token.register(lambda i=i: order.append(i))
        token.set()
        assert order == [0, 1, 2, 3, 4]

    def test_register_on_cancelled_token_runs_at_once(self) -> None:
        """Registering on an already-cancelled token runs the callback immediately."""
        token = CancellationToken()
        token.set()
        seen: list[int] = []
        registration = token.register(lambda: seen.append(1))
        assert seen == [1]
        assert registration.unregister() is False

    def test_unregister_before_cancel(self) -> None:
        """An unregistered callback does not run; unregister() says it had not run yet."""
        token = CancellationToken()
        seen: list[int] = []
        registration = token.register(lambda: seen.append(1))
        assert registration.unregister() is True
        assert registration.unregister() is False
        token.set()
        assert seen == []

    def test_registration_as_context_manager(self) -> None:
        """A registration used as a context manager unregisters at the end of the block."""
        token = CancellationToken()
        seen: list[int] = []
        with token.register(lambda: seen.append(1)):
            pass
        token.set()
        assert seen == []

    def test_raising_callback_is_logged_and_others_still_run(self, logs) -> None:
        """One callback raising is logged with its traceback; the next callbacks still run."""
        token = CancellationToken(name="t1")
        seen: list[int] = []

        def bad() -> None:
            raise ValueError("boom in callback")

        token.register(bad)
        token.register(lambda: seen.append(2))
        token.set()
        assert seen == [2]
        records = logs.find("A cancellation callback of token 't1' raised", level="WARNING")
        assert len(records) == 1
        assert "boom in callback" in str(records[0]["exception"])

    def test_register_refuses_a_non_callable(self) -> None:
        """register() with something not callable fails at once, naming what was given."""
        with pytest.raises(TypeError, match=r"register\(\) needs a callable taking no arguments, not: 42 \(int\)"):
            CancellationToken().register(42)  # type: ignore[arg-type]

    def test_concurrent_register_and_cancel_runs_every_callback_once(self) -> None:
        """Callbacks registered while another thread cancels each run exactly once (no loss, no double)."""
        for _ in range(20):
            token = CancellationToken()
            counts = [0] * 200
            lock = threading.Lock()
            barrier = threading.Barrier(2)

            def bump(i: int) -> None:
                with lock:
                    counts[i] += 1

            def registerer() -> None:
                barrier.wait()
                for i in range(200):
                    token.register(lambda i=i: bump(i))

            thread = threading.Thread(target=registerer)
            thread.start()
            barrier.wait()
            token.set()
            thread.join(10)
            assert counts == [1] * 200


class TestSource:
    def test_cancel_sets_the_token_and_is_idempotent(self) -> None:
        """source.cancel() sets its token; calling it again is harmless."""
        with CancellationTokenSource(name="s") as source:
            assert not source.cancelled
            source.cancel()
            source.cancel()
            assert source.cancelled and source.token.cancelled
            assert repr(source) == "<CancellationTokenSource token=<CancellationToken 's' cancelled> links=0>"

    def test_cancel_from_many_threads(self) -> None:
        """Many threads cancelling at once run the callbacks exactly once."""
        source = CancellationTokenSource()
        seen: list[int] = []
        source.token.register(lambda: seen.append(1))
        barrier = threading.Barrier(8)

        def cancel() -> None:
            barrier.wait()
            source.cancel()

        threads = [threading.Thread(target=cancel) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen == [1]
        source.close()

    def test_cancel_after_cancels_later(self) -> None:
        """cancel_after=delay cancels once the delay passed, not before."""
        began = time.monotonic()
        with CancellationTokenSource(cancel_after=0.2) as source:
            assert not source.cancelled
            assert source.token.wait(10)
            assert time.monotonic() - began >= 0.19

    def test_cancel_after_accepts_timedelta(self) -> None:
        """A timedelta works wherever seconds do."""
        with CancellationTokenSource(cancel_after=timedelta(milliseconds=50)) as source:
            assert source.token.wait(10)

    def test_cancel_after_zero_cancels_at_once(self) -> None:
        """cancel_after(0) cancels immediately, without a timer."""
        with CancellationTokenSource(cancel_after=0) as source:
            assert source.cancelled

    def test_later_cancel_after_replaces_the_delay(self) -> None:
        """A second cancel_after() replaces the first delay instead of adding a timer."""
        with CancellationTokenSource(cancel_after=0.05) as source:
            source.cancel_after(60)
            assert not source.token.wait(0.3)
            source.cancel_after(0.01)
            assert source.token.wait(10)

    def test_cancel_after_needs_no_thread_to_end_a_wait(self) -> None:
        """A wait on a cancel_after token ends at the deadline with no timer thread (none can start at
        interpreter shutdown on Python 3.12, where embedded hosts stop)."""
        with CancellationTokenSource(cancel_after=0.05, name="budget") as source:
            assert not [t for t in threading.enumerate() if t.name.startswith("hostkit-cancel-after")]
            assert source.token.wait(10)
            assert source.cancelled
            assert not [t for t in threading.enumerate() if t.name.startswith("hostkit-cancel-after")]

    def test_cancel_after_runs_callbacks_at_the_deadline_though_nobody_waits(self) -> None:
        """A callback registered on a cancel_after token runs at the deadline: a timer is started for it."""
        fired = threading.Event()
        with CancellationTokenSource(cancel_after=0.05) as source:
            source.token.register(fired.set)
            assert fired.wait(10)
            assert source.token.cancelled

    def test_close_stops_a_pending_timer(self) -> None:
        """Closing the source stops its cancel_after timer: the token stays active and no thread is left."""
        source = CancellationTokenSource(cancel_after=0.05)
        source.close()
        assert not source.token.wait(0.2)
        assert not source.cancelled

    @pytest.mark.parametrize(
        ("delay", "error", "message"),
        [
            (-1, ValueError, r"delay must be >= 0 seconds, not: -1 \(int\)"),
            (float("nan"), ValueError, r"delay must be >= 0 seconds, not: nan \(float\)"),
            ("5", TypeError, r"delay must be a number of seconds or a timedelta, not: '5' \(str\)"),
            (True, TypeError, r"delay must be a number of seconds or a timedelta, not: True \(bool\)"),
        ],
    )
    def test_bad_delay_is_refused(self, delay: object, error: type[Exception], message: str) -> None:
        """A negative, NaN or non-numeric delay fails at once, saying what was given."""
        with pytest.raises(error, match=message):
            CancellationTokenSource(cancel_after=delay)  # type: ignore[arg-type]


class TestLinkedSources:
    def test_linked_source_is_cancelled_by_any_parent(self) -> None:
        """A linked source's token is set when any of its parents is cancelled."""
        a, b = CancellationToken(name="a"), CancellationToken(name="b")
        with CancellationTokenSource(a, b, name="child") as child:
            assert not child.cancelled
            b.set()
            assert child.cancelled
            assert not a.cancelled

    def test_linked_to_a_cancelled_parent_starts_cancelled(self) -> None:
        """Linking to an already-cancelled parent cancels at once."""
        parent = CancellationToken()
        parent.set()
        with CancellationTokenSource(parent) as child:
            assert child.cancelled

    def test_cancelling_the_child_leaves_parents_alone(self) -> None:
        """Cancellation flows from parent to child only."""
        parent = CancellationToken()
        with CancellationTokenSource(parent) as child:
            child.cancel()
            assert not parent.cancelled

    def test_close_drops_the_links(self) -> None:
        """After close(), a parent's cancellation no longer reaches the child."""
        parent = CancellationToken()
        child = CancellationTokenSource(parent)
        child.close()
        parent.set()
        assert not child.cancelled

    def test_linked_with_timeout(self) -> None:
        """A source linked to a parent and with a delay ends on whichever comes first."""
        parent = CancellationToken()
        with CancellationTokenSource(parent, cancel_after=60) as child:
            parent.set()
            assert child.cancelled

    def test_plain_event_is_refused(self) -> None:
        """A plain threading.Event cannot notify a link: refused, saying why."""
        with pytest.raises(
            TypeError, match=r"linked tokens must be CancellationToken objects .*not: <threading\.Event"
        ):
            CancellationTokenSource(threading.Event())  # type: ignore[arg-type]

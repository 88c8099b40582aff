"""Disposal: finishing what the container made, newest first, and the scope hooks.

An object the container created is finished by ``close()`` when its class has
one, else by ``__exit__`` when it is a context manager, or, when a generator
factory made it, by resuming the generator past its ``yield`` (as
:func:`contextlib.contextmanager` does). A failing finish is logged and the
others still run: nothing an owner holds is left open because a neighbour failed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .plans import callable_name

__all__ = ["CLOSE", "EXIT", "GENERATOR", "KIND_BY_TYPE", "disposal_kind", "finish_all", "run_end_hooks"]

# How an object the container created is finished: by close(), by __exit__, or by
# resuming the generator its factory was.
CLOSE, EXIT, GENERATOR = 1, 2, 3


# type -> how its instances are finished (0: not at all); looked up once per type
# (benchmarks/di.py: a failed hasattr costs as much as the rest of a resolution).
# The resolution hot path reads it directly and calls disposal_kind() on a miss.
KIND_BY_TYPE: dict[type, int] = {}


def disposal_kind(cls: type) -> int:
    """How instances of ``cls`` are finished (``CLOSE``, ``EXIT`` or 0), remembered per type."""
    # close() is preferred: most context managers (files, sessions, sockets) have it,
    # and __exit__ without a matching __enter__ is only the fallback.
    if callable(getattr(cls, "close", None)):
        kind = CLOSE
    elif callable(getattr(cls, "__exit__", None)):
        kind = EXIT
    else:
        kind = 0
    KIND_BY_TYPE[cls] = kind
    return kind


def run_end_hooks(hooks: Sequence[tuple[Callable[[], object] | None, Callable[[], object] | None]]) -> None:
    """Run the ``on_end`` hooks, last registered first; a failing one is logged, the others still run."""
    for _, end in reversed(hooks):
        if end is None:
            continue
        try:
            end()
        except Exception:
            from loguru import logger  # only on failure: a process-placed child imports the container, not loguru

            logger.opt(exception=True).bind(service=callable_name(end)).warning(
                "Scope end hook {} failed; the others still run", callable_name(end)
            )


def finish_all(to_close: list[tuple[int, Any]], what: str, exc: BaseException | None) -> None:
    """Finish every ``(kind, object)`` in ``to_close``, newest first; ``exc`` is the unit of work's exception."""
    for kind, obj in reversed(to_close):
        try:
            if kind == GENERATOR:
                _finish_generator(obj, exc)
            elif kind == CLOSE:
                obj.close()
            else:
                obj.__exit__(type(exc) if exc is not None else None, exc, exc.__traceback__ if exc else None)
        except Exception:
            name = callable_name(obj) if kind == GENERATOR else type(obj).__qualname__
            from loguru import logger  # only on failure: a process-placed child imports the container, not loguru

            logger.opt(exception=True).bind(service=name).warning(
                "Closing the {} service {} failed; the others still close", what, name
            )


def _finish_generator(gen: Any, exc: BaseException | None) -> None:
    """Resume a generator factory after its ``yield``, like ``contextlib.contextmanager``'s exit."""
    if exc is None:
        try:
            next(gen)
        except StopIteration:
            return
        gen.close()
        msg = f"the generator factory {callable_name(gen)} yielded more than once; a factory yields exactly one value"
        raise RuntimeError(msg)
    try:
        gen.throw(exc)
    except StopIteration:
        return
    except BaseException as err:
        if err is exc:
            return  # the unit of work's own exception: its caller sees it, not us
        raise
    gen.close()
    msg = f"the generator factory {callable_name(gen)} yielded again after an exception"
    raise RuntimeError(msg)

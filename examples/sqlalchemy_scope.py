"""A SQLAlchemy session per unit of work: scopes in a background service.

Run it from the repository root, watch the units of work, then stop it with
Ctrl+C or ``kill -TERM <pid>``; it prints what it did and exits with code 0::

    pip install sqlalchemy
    python3 examples/sqlalchemy_scope.py

What runs:

* ``Engine``, a singleton made by a generator factory: created once, and
  ``dispose()``-d after its ``yield`` when the host stops.
* ``Session``, a *scoped* service: one per unit of work. Its generator factory
  opens a transaction, commits it when the unit of work returns and rolls it
  back when the unit of work raises, then closes the session.
* ``OrderWriter``, a background service: every 0.2 s one unit of work,
  ``provider.run_in_scope(self.write_batch, n)``, writes three orders in its own
  scope. Every fourth unit fails on purpose: its rows are rolled back.
* ``Summary``, a hosted service registered first, so it stops last: prints the
  rows in the database and the sessions opened and closed.

The database is a SQLite file in a temporary directory (``HOSTKIT_EXAMPLE_DB``
overrides it), so a run starts empty.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator

from sqlalchemy import Engine, Integer, String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from hostkit import (
    BackgroundService,
    CancellationToken,
    Host,
    HostBuilder,
    HostedService,
    PeriodicTimer,
    ServiceProvider,
)

SESSIONS = {"opened": 0, "closed": 0}


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    unit: Mapped[int] = mapped_column(Integer)
    item: Mapped[str] = mapped_column(String(40))


def make_engine() -> Iterator[Engine]:
    """Singleton: one engine (and connection pool) per process, disposed at host stop."""
    tmp = None if os.environ.get("HOSTKIT_EXAMPLE_DB") else tempfile.mkdtemp(prefix="hostkit-")
    path = os.environ.get("HOSTKIT_EXAMPLE_DB") or os.path.join(str(tmp), "orders.db")
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    print(f"Database: {path}", flush=True)
    yield engine
    engine.dispose()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    print("Engine disposed", flush=True)


def make_session(engine: Engine) -> Iterator[Session]:
    """Scoped: one session and one transaction per unit of work."""
    SESSIONS["opened"] += 1
    try:
        with Session(engine) as session, session.begin():
            # begin() commits when the scope ends normally and rolls back when the
            # unit of work raised (the scope hands the exception to this yield).
            yield session
    finally:
        SESSIONS["closed"] += 1


class OrderRepository:
    """Scoped: works on the unit of work's session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, unit: int, item: str) -> None:
        self.session.add(Order(unit=unit, item=item))


class OrderWriter(BackgroundService):
    """One unit of work, in its own scope, every 0.2 s."""

    def __init__(self, provider: ServiceProvider) -> None:
        self.provider = provider

    def execute(self, stopping: CancellationToken) -> None:
        for n in PeriodicTimer(0.2, stopping):
            try:
                self.provider.run_in_scope(self.write_batch, n)
            except ValueError as err:
                print(f"Unit of work {n} failed ({err}); its 3 rows were rolled back", flush=True)

    def write_batch(self, n: int, orders: OrderRepository) -> None:
        for i in itertools.islice(itertools.count(1), 3):
            orders.add(n, f"item {n}.{i}")
        if n % 4 == 0:
            raise ValueError("payment service refused the batch")
        print(f"Unit of work {n}: wrote 3 orders", flush=True)


class Summary(HostedService):
    """Registered first, so it stops last: reports what the run left in the database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def stop(self, token: CancellationToken) -> None:
        with Session(self.engine) as session:
            rows = session.scalar(select(func.count()).select_from(Order))
        print(
            f"Summary: {rows} orders in the database; sessions opened {SESSIONS['opened']}, "
            f"closed {SESSIONS['closed']}",
            flush=True,
        )


def build_host() -> Host:
    builder = HostBuilder()
    builder.services.add_singleton(Engine, factory=make_engine)
    builder.services.add_scoped(Session, factory=make_session)
    builder.services.add_scoped(OrderRepository)
    builder.add_hosted_service(Summary)
    builder.add_hosted_service(OrderWriter)
    return builder.build()


if __name__ == "__main__":
    raise SystemExit(build_host().run())

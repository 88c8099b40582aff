"""Dependency injection: a service collection, a provider, scopes, build-time validation.

Why our own rather than a library: the two maintained candidates measured
(dishka 1.10, wireup 2.13) both catch the captive dependency, but neither closes
class-registered services at scope end, and wireup also refuses a singleton that
uses a transient, which .NET allows. Both are requirements here.

Rules (.NET's): a singleton may depend on singletons and transients; a scoped
service on anything; a transient on anything its consumer may use. A singleton
that reaches a scoped service (or the current :class:`Scope`), through any
chain, is refused at ``build()``.

The container is generic: it knows nothing about hosted services, which the
host registers on its own subclass of the collection.

Data flow::

    registration            plan                   validate at build
    ------------            ----                   -----------------
    ServiceCollection  --build_provider()-->  ServiceProvider.__init__
      add_singleton/        plans.plan_injections:     validation.check_graph:
      add_scoped/           type hints -> Recipe        missing / cycle / captive
      add_transient         per registration            (raises before anything runs)
      (collection.py)       (plans.py)                  (validation.py)
                                                          |
    resolve                                               v
    -------                                    ServiceProvider (root: singletons)
    provider.get(key) / scope.get(key)         |  get(): singletons, root transients
      Recipe.target(**deps), each dep          +--create_scope()--> Scope (scoped + its transients)
      resolved the same way (provider.py)      |                      run_in_scope(func):
                                               |                      plans.plan_call_arguments
    dispose                                    |
    -------                                    v
    Scope.__exit__ / ServiceProvider.close()  --> disposal.finish_all: close() / __exit__ /
      newest first; a failure is logged,           generator resumed past its yield,
      the rest still close (disposal.py)           then the scope end hooks
"""

from __future__ import annotations

from .collection import Lifetime, ServiceCollection, ServiceDescriptor
from .plans import display_name
from .provider import Scope, ServiceProvider

__all__ = ["Lifetime", "Scope", "ServiceCollection", "ServiceDescriptor", "ServiceProvider", "display_name"]

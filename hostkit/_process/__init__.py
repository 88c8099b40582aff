"""Process placement: ``execute`` runs in a dedicated child process, supervised.

Data flow for one run (one child; a restart makes a new child)::

    host process (runner, supervise, logbridge)          child process (child, orphan, logbridge)
    -------------------------------------------          ----------------------------------------
    ProcessRunner.start()
      payload = pickling.dumps(Instance | FromContainer)  -- cannot pickle: ServicePicklingError
    supervising thread hostkit-<svc>
      Supervisor -> _run_once()
        launch(ctx.Process(run_child))   (SIGINT,  ChildSettings,
          SIGTERM blocked while it starts) ---------->  own process group, signals, log bridge,
                                                         watcher thread; then unblock
        control pipe  ---- STOP / EOF ---------------->  watcher: stopping.set()
                      ---- Reload (Host.reload()) ---->  watcher -> childreload: reload(token)
                                                           on a thread hostkit-<svc>-reload
        parent sentinel (host dies) ------------------>  watcher: stopping.set(), SIGTERM to the
                                                           group, then SIGKILL to it (itself too)
        SharedState   <--- beat (heartbeat()) --------   the runner stand-in (attach_runner)
                      <--- executing -----------------   the hang clock starts here
                      <--- outside_sigterm -----------   SIGTERM not the host's: stopping.set()
                      ---- escalating --------------->   its handler: SIGTERM raises Terminated
        result pipe   <--- LogRecord -----------------   loguru sink (stdlib routed into loguru)
                      <--- LockReport ----------------   OncePerDeployment: holder or standby
                      <--- StopApplication -----------   lifetime.stop_application() in the child
                      <--- Reloaded ------------------   reload() returned, raised or was refused
                      <--- Finished | Failed |        -  after execute returns or raises; last
                           EndedBySigterm
        mpc.wait([result pipe, child sentinel], Watchdog.tick)
          logbridge.reemit(LogRecord), Watchdog: RSS over memory_limit, heartbeat too old
        child exits -> drain pipe, join (reaped), sweep its group, raise or return
    Host escalates -> terminate(grace): escalating, SIGTERM to the group, wait, SIGKILL, join

Modules: :mod:`.protocol` (every message, the settings, the payload and the shared
memory, as types), :mod:`.options` (``ProcessOptions``), :mod:`.pickling` (dill and
hostkit's rules), :mod:`.logbridge` (records both ways), :mod:`.child` (bootstrap
and result), :mod:`.orphan` (the stop watcher; a child whose host died), :mod:`.entry` (the child's
target, which imports :mod:`.child` where it runs),
:mod:`.childreload` (a reload request in the child), :mod:`.runner`
(``ProcessRunner``), :mod:`.supervise` (launch, watchdog, terminate, sweep),
:mod:`.deferred` (the host's stand-in for a service the child builds),
:mod:`.forkserver` (preloaded in the fork server), :mod:`.mainguard` (the hint for
a main module that runs a host when re-imported).

Only the supervising thread reads the result pipe, so a child's records are
re-emitted in the order it wrote them, and the result is read after every one of
them: none is lost at a clean stop.

Each child leads its own process group, so what its service starts (a
``subprocess``, a fork of itself) is signalled with it: SIGTERM then SIGKILL at an
escalation, and, once the child has ended for any reason, a sweep: SIGTERM to
what is left in the group, SIGKILL after ``KILL_GRACE``. A process that leaves the
group (``setsid``, as daemons do) is beyond reach.

A SIGTERM the host did not send (systemd signals every process of a unit at once)
asks the child to stop gracefully, and the service then counts as stopped, never
as failed: also when it ended by SIGTERM's default action, and whether the host
got the same signal (the usual case) or not.

This package's ``__init__`` imports nothing: a child imports only the modules it needs.
"""

"""Sidecar recovery: it serves again after its upstream restarts, never hands out a dead server, never hangs a client.

Each test runs a sidecar on the module's private DevStack, most with the fault relay as its upstream, and
runs twice: with PostgreSQL as the upstream, and with a PgBouncer in transaction mode in front of it (the
real deployment: one sidecar per pod in front of Supavisor). Behind the pooler, "restart" kills the pooler
and starts it again, and "a backend killed" terminates the pooler's server connections.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import psycopg
import pytest

from poolkit.dev.devstack import DevStack
from poolkit.sidecar.policy.config import SidecarSettings

from .conftest import Upstream
from .relay import FaultRelay

if TYPE_CHECKING:
    from .conftest import SidecarRunner

T = TypeVar("T")
Runner = Callable[..., "SidecarRunner"]
SIZE = 3
# Short limits, so that a client left waiting past them (plus a margin for a loaded machine) is a hang.
TIMEOUTS = {"connect_timeout": 2.0, "query_wait_timeout": 3.0, "idle_transaction_timeout": 3.0}
# The sidecar settings a fix for the two gaps these tests found would add (PgBouncer's names): applied
# when the sidecar knows them, so that the tests below pass as soon as the feature exists.
PROPOSED = {"query_timeout": 3.0, "server_check_delay": 0.0}
MARGIN = 7.0
RECOVERY_BOUND = TIMEOUTS["connect_timeout"] + MARGIN
# After the upstream is back, the sidecar retries its login every server_login_retry: it must serve by then
# (plus the margin for a loaded machine).
RETRY_BOUND = SidecarSettings.model_fields["server_login_retry"].default + MARGIN


def sidecar_settings(**overrides: Any) -> dict[str, Any]:
    known = {k: v for k, v in PROPOSED.items() if k in SidecarSettings.model_fields}
    return {"max_size": SIZE, **TIMEOUTS, **known, **overrides}


async def connect(runner: SidecarRunner) -> asyncpg.Connection:
    # asyncpg: a cancelled query returns at once and terminate() closes at once, even into a stalled network.
    return await asyncpg.connect(runner.url(), statement_cache_size=0, timeout=RECOVERY_BOUND)


async def backend_pid(conn: asyncpg.Connection, sleep: float = 0.0) -> int:
    return int(await conn.fetchval("SELECT pg_backend_pid() FROM pg_sleep($1)", sleep))


async def finish(task: asyncio.Task[T], within: float) -> T | None:
    """The task's result if it ends within ``within`` seconds, else ``None`` (it keeps running)."""
    done, _ = await asyncio.wait({task}, timeout=within)
    return task.result() if done else None


async def warm(runner: SidecarRunner, upstream: Upstream) -> tuple[list[asyncpg.Connection], set[int]]:
    """SIZE idle clients, after SIZE overlapping transactions made the sidecar open SIZE servers.

    Returns the clients and the backend pids their transactions ran on (``pg_backend_pid()``).
    """
    clients = [await connect(runner) for _ in range(SIZE)]
    pids = set(await asyncio.gather(*(backend_pid(c, 0.3) for c in clients)))
    assert len(pids) == SIZE
    if upstream.is_pooler:  # the sidecar sees the pooler's key data, not the backends' pids
        await until(lambda: len(server_pids(runner, "idle")) == SIZE, "the warm servers never went idle")
    else:
        await until(lambda: server_pids(runner, "idle") == pids, "the warm servers never went idle")
    return clients, pids


def server_pids(runner: SidecarRunner, state: str | None = None) -> set[int]:
    """The process ids the sidecar's server connections announced (BackendKeyData): PostgreSQL's backend
    pids, or behind a pooler the pooler's own numbers, new for every connection to it."""
    return runner.call(
        lambda app: {s.backend_pid for s in app.pool.servers if s.backend_pid and (state is None or s.state == state)}
    )


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def admin(stack: DevStack, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(
        host=str(stack.socket_dir), port=stack.pg_port, user=stack.superuser, dbname="app", autocommit=True
    ) as conn:
        cur = await conn.execute(sql, args or None)
        return await cur.fetchall() if cur.description else []


async def live_backends(stack: DevStack, pids: set[int]) -> set[int]:
    rows = await admin(stack, "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", list(pids))
    return {r[0] for r in rows}


def close_all(clients: list[asyncpg.Connection]) -> None:
    for client in clients:
        client.terminate()


# ---------------------------------------------------------------------------------------------- restart


async def test_serves_again_after_the_upstream_restarts_without_a_manual_step(
    sidecar_runner: Runner, upstream: Upstream
) -> None:
    runner = sidecar_runner(**sidecar_settings(**upstream.sidecar_settings()))
    clients, before = await warm(runner, upstream)
    servers_before = server_pids(runner)
    errors: list[tuple[float, str]] = []
    successes: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        # A client that keeps querying through the restart: it may see errors while PostgreSQL is down.
        while not stop.is_set():
            try:
                async with asyncio.timeout(RECOVERY_BOUND * 2):
                    conn = await connect(runner)
                    try:
                        await backend_pid(conn)
                    finally:
                        conn.terminate()
                successes.append(time.monotonic())
            except Exception as exc:
                errors.append((time.monotonic(), f"{type(exc).__name__}: {str(exc).strip()[:120]}"))
            await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe())
    try:
        await asyncio.to_thread(upstream.restart)
        restarted = time.monotonic()
        # Clients connected before the restart: their very next query works, on a new backend.
        after = await asyncio.wait_for(asyncio.gather(*(backend_pid(c) for c in clients)), RECOVERY_BOUND)
        first_answer = time.monotonic() - restarted
        assert not set(after) & before, "a backend from before the restart answered"
        await until(lambda: any(t > restarted for t in successes), "new clients were never served again")
        served_again = min(t for t in successes if t > restarted) - restarted
    finally:
        stop.set()
        await prober
        close_all(clients)
    print(
        f"\nrestart of {upstream.kind}: old clients answered {first_answer:.2f}s after it was back, new clients "
        f"{served_again:.2f}s; errors seen by the probing client during the restart: {[e for _, e in errors]}"
    )
    assert first_answer <= RETRY_BOUND
    assert served_again <= RETRY_BOUND
    recovered = restarted + served_again
    assert not [e for t, e in errors if t > recovered], "errors after the sidecar had recovered"
    assert server_pids(runner).isdisjoint(servers_before), "a server connection from before the restart is in use"


async def test_an_outage_never_makes_the_sidecar_exceed_max_size(
    sidecar_runner: Runner, upstream: Upstream, upstream_relay: FaultRelay
) -> None:
    """Found in the bank run's logs: during the restart, dozens of upstream connects at once for max_size=4.

    Clients keep asking for the SIZE servers through a restart and a one-second outage. The sidecar's own
    count of server connections (open or opening) is sampled on its loop: never more than max_size.
    """
    runner = sidecar_runner(**sidecar_settings(**upstream.sidecar_settings(upstream_relay)))
    stop = asyncio.Event()
    failures: list[str] = []
    counts: list[int] = []

    async def client() -> None:
        while not stop.is_set():
            try:
                conn = await connect(runner)
                try:
                    for _ in range(10):
                        await conn.fetchval("SELECT 1 FROM pg_sleep(0.02)")
                finally:
                    conn.terminate()
            except Exception as exc:
                failures.append(type(exc).__name__)  # while PostgreSQL is away
                await asyncio.sleep(0.01)

    async def sample() -> None:
        while not stop.is_set():
            counts.append(await asyncio.to_thread(runner.call, lambda app: len(app.pool.servers)))

    tasks = [asyncio.create_task(client()) for _ in range(4 * SIZE)] + [asyncio.create_task(sample())]
    try:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(upstream.restart)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(upstream.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(upstream.start)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), RECOVERY_BOUND * 2)
    relay = upstream_relay.counters
    print(
        f"\noutage under load: server connections at most {max(counts)} ({len(counts)} samples), upstream connects "
        f"{relay['accepted']} ({relay.get('upstream_refused', 0)} refused), client errors {len(failures)}"
    )
    assert max(counts) <= SIZE, f"the sidecar held {max(counts)} server connections at once with max_size={SIZE}"


# ---------------------------------------------------------------------------------------------- idle servers broken


@pytest.mark.parametrize("how", ["pg_terminate_backend", "relay_reset"])
async def test_idle_servers_broken_and_noticed_are_never_handed_out(
    how: str, sidecar_runner: Runner, upstream: Upstream, upstream_relay: FaultRelay
) -> None:
    """Broken while idle, visibly (FATAL + FIN, or RST): the sidecar drops them on its own; clients never notice.

    Behind a pooler, pg_terminate_backend ends the pooler's server connections: the sidecar's connections
    to the pooler stay healthy, and the pooler, not the sidecar, must replace the backends unseen.
    """
    fault_stack = upstream.stack
    runner = sidecar_runner(**sidecar_settings(**upstream.sidecar_settings(upstream_relay)))
    clients, pids = await warm(runner, upstream)
    servers_before = server_pids(runner)
    try:
        if how == "pg_terminate_backend":
            if upstream.is_pooler:
                pids = await asyncio.to_thread(upstream.server_backend_pids)
                assert len(pids) >= SIZE
            rows = await admin(fault_stack, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", list(pids))
            assert all(r[0] for r in rows)
        else:
            assert upstream_relay.drop() == SIZE
        if upstream.is_pooler and how == "pg_terminate_backend":
            await until_async(lambda: live_backends(fault_stack, pids), "the terminated backends lived on")
            assert server_pids(runner) == servers_before  # the sidecar's links to the pooler are intact
        else:
            await until(lambda: not server_pids(runner), "the sidecar kept servers whose connections were broken")
        # No client traffic was needed for the sidecar to notice; now every client's next query just works.
        after = await asyncio.wait_for(asyncio.gather(*(backend_pid(c, 0.1) for c in clients)), RECOVERY_BOUND)
        if how == "pg_terminate_backend" or not upstream.is_pooler:  # (a reset pooler link leaves its backends)
            assert not set(after) & pids
    finally:
        close_all(clients)


async def test_idle_servers_that_died_silently_are_never_handed_out(
    sidecar_runner: Runner, upstream: Upstream, upstream_relay: FaultRelay
) -> None:
    """Broken while idle, invisibly: the upstream end is gone but nothing reaches the sidecar (host crash, NAT expiry).

    Only a check before hand-out (PgBouncer: ``server_check_query`` after ``server_check_delay``) can
    tell; without one, the next client's query goes into the void and that client waits forever.
    """
    fault_stack = upstream.stack
    runner = sidecar_runner(**sidecar_settings(**upstream.sidecar_settings(upstream_relay)))
    clients, pids = await warm(runner, upstream)
    servers_before = server_pids(runner, "idle")
    try:
        assert upstream_relay.drop(side="server") == SIZE
        if not upstream.is_pooler:  # (a pooler closes its client ends at once and keeps its backends)
            await until_async(lambda: live_backends(fault_stack, pids), "the backends outlived the reset")
        assert server_pids(runner, "idle") == servers_before  # the sidecar cannot know
        began = time.monotonic()
        query = asyncio.create_task(backend_pid(clients[0]))
        pid = await finish(query, RECOVERY_BOUND)
        if pid is None:
            pytest.fail(
                f"a server that died while idle was handed to a client, whose query then got neither an answer "
                f"nor an error for {time.monotonic() - began:.0f}s (connect_timeout={TIMEOUTS['connect_timeout']}s, "
                f"query_wait_timeout={TIMEOUTS['query_wait_timeout']}s): the sidecar checks nothing before it hands "
                "an idle server out"
            )
        assert not servers_before <= server_pids(runner), "the dead server that was checked is still in the pool"
        if not upstream.is_pooler:  # (the pooler kept its backends: any of them may answer)
            assert pid not in pids
    finally:
        close_all(clients)
        await asyncio.wait({query}, timeout=RECOVERY_BOUND)
        if query.done() and not query.cancelled():
            query.exception()  # retrieved: the hung query ends with the closed connection


async def until_async(probe: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    """Until ``await probe()`` is empty/false."""
    deadline = time.monotonic() + timeout
    while await probe():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------- stalls


async def test_a_stall_during_a_query_ends_in_a_clear_error_not_a_hang(
    sidecar_runner: Runner, upstream: Upstream, upstream_relay: FaultRelay
) -> None:
    """The upstream stops answering mid-query (and new upstream connections stall too: a partition)."""
    pg_relay = upstream_relay
    runner = sidecar_runner(**sidecar_settings(**upstream.sidecar_settings(upstream_relay)))
    conn = await connect(runner)
    try:
        await backend_pid(conn)
        pg_relay.stall(None, new=True)
        began = time.monotonic()
        query = asyncio.create_task(conn.fetchval("SELECT 1"))
        done, _ = await asyncio.wait({query}, timeout=RECOVERY_BOUND)
        if not done:
            pytest.fail(
                f"the query got neither an answer nor an error for {time.monotonic() - began:.0f}s while the "
                f"upstream stalled: no sidecar timeout ({', '.join(f'{k}={v}' for k, v in TIMEOUTS.items())}) "
                "covers a server that stops answering mid-query"
            )
        error = query.exception()
        assert isinstance(error, asyncpg.PostgresError), f"answered although the upstream was stalled: {query}"
        assert time.monotonic() - began <= RECOVERY_BOUND
        assert "timeout" in str(error).lower(), f"the error does not say what happened: {error}"
    finally:
        pg_relay.resume()
        conn.terminate()
        await asyncio.wait({query}, timeout=RECOVERY_BOUND)
        if query.done() and not query.cancelled():
            query.exception()
    # The sidecar is not wedged: once the network is back, a new client is served.
    again = await connect(runner)
    try:
        await asyncio.wait_for(backend_pid(again), RECOVERY_BOUND)
    finally:
        again.terminate()


async def test_a_client_that_gives_up_during_a_stall_does_not_wedge_the_sidecar(
    sidecar_runner: Runner, upstream: Upstream, upstream_relay: FaultRelay
) -> None:
    """A client with its own timeout leaves mid-query; after the stall, the sidecar serves every client."""
    pg_relay = upstream_relay
    runner = sidecar_runner(**sidecar_settings(**upstream.sidecar_settings(upstream_relay)))
    clients, _ = await warm(runner, upstream)
    try:
        assert pg_relay.stall(2.0) == SIZE
        began = time.monotonic()
        # Each client gives up after 0.5 s (asyncpg's own timeout) and goes away mid-query.
        results = await asyncio.gather(*(c.fetchval("SELECT 1", timeout=0.5) for c in clients), return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert time.monotonic() - began <= 0.5 + MARGIN
        close_all(clients)
        fresh = [await connect(runner) for _ in range(SIZE)]
        clients += fresh
        pids = await asyncio.wait_for(asyncio.gather(*(backend_pid(c, 0.1) for c in fresh)), RECOVERY_BOUND + 2.0)
        assert len(set(pids)) == SIZE
    finally:
        pg_relay.resume()
        close_all(clients)


async def test_a_delayed_cancel_never_hits_another_clients_query(
    sidecar_runner: Runner, upstream: Upstream, upstream_relay: FaultRelay
) -> None:
    """Seen in the bank run as a QueryCanceledError nobody asked for; made deterministic with a stall.

    The sidecar forwards a CancelRequest over a new upstream connection. While that connection is slow
    to open (here: stalled), A's query finishes by itself, the server goes to B, and A's cancel then
    cancels B's query. PgBouncer fixed the same race (pgbouncer/pgbouncer#717) by forwarding a cancel
    only while the server still serves the client that asked, and by not reusing a server while a
    cancel for it is in flight.
    """
    pg_relay = upstream_relay
    runner = sidecar_runner(**sidecar_settings(**upstream.sidecar_settings(upstream_relay), max_size=1))
    a, b = await connect(runner), await connect(runner)
    try:
        await backend_pid(a)  # the one server connection exists
        assert pg_relay.stall(1.5, ids=[], new=True) == 0  # only links opened from now on: the cancel's
        with pytest.raises(TimeoutError):  # A gives up after 0.2 s: asyncpg sends a CancelRequest
            await a.fetchval("SELECT pg_sleep(0.6)", timeout=0.2)
        # B waits for the server, gets it when A's query ends (at 0.6 s), and runs past the stall's end.
        try:
            assert await asyncio.wait_for(b.fetchval("SELECT 'b' FROM pg_sleep(1.5)"), RECOVERY_BOUND) == "b"
        except asyncpg.QueryCanceledError as exc:
            pytest.fail(f"client A's cancel, forwarded late, cancelled client B's query: {exc}")
    finally:
        pg_relay.resume()
        close_all([a, b])

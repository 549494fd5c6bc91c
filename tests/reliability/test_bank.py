"""Bank-transfer invariant under faults: via the sidecar and library pools, no money lost or doubled, nobody hung.

Clients move money between accounts with ``poolkit.money.idempotent`` (one idempotency key per transfer,
under a primary key) on four paths: poolkit ``Pool`` (asyncpg, psycopg) through a fault relay to the
upstream, and the same two pools through an in-process sidecar whose upstream is that relay. The upstream
is PostgreSQL itself, or (the real deployment) a PgBouncer in transaction mode in front of it. Meanwhile
the test cancels client tasks and shuts their sockets mid-transaction, terminates random backends (behind
the pooler: the pooler's server connections), restarts the upstream once (PostgreSQL: ``pg_ctl restart``;
the pooler: killed and started again), and makes the relay stall, reset and half-close links. Then, with
the faults over, every transfer whose outcome the client could not know is retried with the same key, and
the ledger is checked against what the clients saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import random
import socket
import statistics
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from poolkit import Pool
from poolkit.core.settings import load_settings
from poolkit.dev.devstack import DevStack
from poolkit.errors import CommitOutcomeUnknown
from poolkit.money import ensure_table, idempotent

from .conftest import Upstream, through_relay
from .relay import FaultRelay

if TYPE_CHECKING:
    from .conftest import SidecarRunner

SEED = int(os.environ.get("POOLKIT_FAULT_SEED", "7"))
ACCOUNTS = 20
START_BALANCE = 1_000
CLIENTS_PER_PATH = 8
CHAOS_SECONDS = 16.0
INVALID_EVERY = 9  # every 9th transfer breaks a business rule after its writes: a definite failure
TABLE = "bank.idem"
# Library pools through the relay straight to PostgreSQL, and the same pools through the sidecar.
PATHS = ("asyncpg", "psycopg", "sidecar/asyncpg", "sidecar/psycopg")

# The clients' own limits. An operation may wait for a pool slot (ACQUIRE), open a connection (CONNECT),
# and after a commit lost in flight, check its key (CHECK); stalls (<= MAX_STALL each), lock waits behind
# stalled transactions and the restart come on top, hence the margin. Only a hang can exceed OP_BOUND.
CONNECT_TIMEOUT = 5.0
ACQUIRE_TIMEOUT = 10.0
CHECK_TIMEOUT = 10.0
MAX_STALL = 1.5
OP_BOUND = CONNECT_TIMEOUT + ACQUIRE_TIMEOUT + CHECK_TIMEOUT + 15.0
HANG_GUARD = OP_BOUND + 15.0  # an operation still running then is recorded as hung (the test fails)
RESOLVE_SECONDS = 30.0

SCHEMA = f"""
DROP SCHEMA IF EXISTS bank CASCADE;
CREATE SCHEMA bank AUTHORIZATION app;
SET ROLE app;
CREATE TABLE bank.accounts (id int PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE bank.transfers (
  key text PRIMARY KEY, src int NOT NULL, dst int NOT NULL, amount bigint NOT NULL, path text NOT NULL);
INSERT INTO bank.accounts SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g;
-- Runs during COMMIT (deferred), only when a transaction asks: gives a test a window inside COMMIT.
CREATE FUNCTION bank.slow_commit() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF current_setting('bank.slow_commit', true) = 'on' THEN PERFORM pg_sleep(1); END IF;
  RETURN NULL;
END $f$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON bank.transfers
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bank.slow_commit();
RESET ROLE;
"""


class Rejected(Exception):
    """The transfer breaks a business rule (raised after its writes, so they must roll back)."""


@dataclass(eq=False)  # identity: ops live in sets
class Op:
    """One transfer as its client saw it."""

    key: str
    path: str
    src: int
    dst: int
    amount: int
    invalid: bool
    outcome: str = "pending"  # committed | failed | unknown | hung
    error: str = ""
    duration: float = 0.0
    result: Any = None  # what idempotent() returned (the first run's, or the recorded one on a replay)
    calls: int = 0  # how often the transfer body ran (a replay does not run it)
    conn: Any = None  # the driver connection while the body runs (for the socket killer)
    task: asyncio.Task[None] | None = None
    detail: str = ""  # for a failure: the message and where it was raised (printed if the check fails)
    resolved: str = ""  # for unknown outcomes: committed | failed, after the retry with the same key
    replayed: bool = False  # the retry found it already committed: a retry without the key would double it

    @property
    def request(self) -> dict[str, Any]:
        return {"src": self.src, "dst": self.dst, "amount": self.amount}

    @property
    def final(self) -> str:
        return self.resolved or self.outcome


async def run(conn: Any, driver: str, sql: str, *args: Any) -> None:
    """One statement on either driver's connection; ``sql`` uses ``$n`` placeholders."""
    if driver == "asyncpg":
        await conn.execute(sql, *args)
        return
    for n in range(len(args), 0, -1):
        sql = sql.replace(f"${n}", "%s")
    await conn.execute(sql, args)


def where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-9:]
    trail = " <- ".join(f"{pathlib.Path(fr.filename).name}:{fr.lineno} {fr.name}" for fr in reversed(frames))
    return f"{type(exc).__name__}: {str(exc)[:160]} at {trail}"


def transfer(op: Op, driver: str) -> Callable[[Any], Awaitable[dict[str, Any]]]:
    """The transfer body: debit, credit (lower account id first: no deadlock cycles), ledger row."""
    first, second = sorted(((op.src, -op.amount), (op.dst, op.amount)))

    async def body(conn: Any) -> dict[str, Any]:
        op.calls += 1
        op.conn = conn
        try:
            for account, delta in (first, second):
                await run(conn, driver, "UPDATE bank.accounts SET balance = balance + $1 WHERE id = $2", delta, account)
            await run(
                conn,
                driver,
                "INSERT INTO bank.transfers (key, src, dst, amount, path) VALUES ($1, $2, $3, $4, $5)",
                op.key,
                op.src,
                op.dst,
                op.amount,
                op.path,
            )
            if op.invalid:
                raise Rejected(f"transfer {op.key} breaks the limit")
            return {"key": op.key, "amount": op.amount}
        finally:
            op.conn = None

    return body


async def attempt(op: Op, pool: Pool) -> None:
    """Run one transfer and record what the client saw."""
    began = time.monotonic()
    guard = asyncio.timeout(HANG_GUARD)
    try:
        async with guard:
            op.result = await idempotent(
                pool, op.key, transfer(op, pool.driver), request=op.request, table=TABLE, check_timeout=CHECK_TIMEOUT
            )
        op.outcome = "committed"
    except Rejected:
        op.outcome, op.error = "failed", "Rejected"
    except CommitOutcomeUnknown:
        op.outcome, op.error = "unknown", "CommitOutcomeUnknown"
    except TimeoutError as exc:
        if guard.expired():
            op.outcome, op.error = "hung", f"still running after {HANG_GUARD:.0f}s"
        else:
            op.outcome, op.error, op.detail = "failed", type(exc).__name__, where(exc)
    except Exception as exc:
        # Raised before COMMIT was sent (money.idempotent turns a connection lost at COMMIT into a check of
        # the key): nothing of this transfer can have committed.
        op.outcome, op.error, op.detail = "failed", type(exc).__name__, where(exc)
    finally:
        op.duration = time.monotonic() - began


async def client(
    path: str, pool: Pool, *, ops: list[Op], running: set[Op], stop: asyncio.Event, rng: random.Random
) -> None:
    """One client: transfers back to back until ``stop``; a task the test cancels is an unknown outcome."""
    n = 0
    while not stop.is_set():
        n += 1
        src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
        op = Op(f"{path}-{id(asyncio.current_task())}-{n}", path, src, dst, rng.randint(1, 50), n % INVALID_EVERY == 0)
        ops.append(op)
        running.add(op)
        op.task = asyncio.create_task(attempt(op, pool))
        await asyncio.wait({op.task})
        running.discard(op)
        if op.task.cancelled():
            op.outcome, op.error = "unknown", "cancelled by the test"


# ---------------------------------------------------------------------------------------------- faults


def socket_of(conn: Any, driver: str) -> int:
    if driver == "asyncpg":
        return int(conn._con._transport.get_extra_info("socket").fileno())
    return int(conn.pgconn.socket)


async def killer(
    pools: dict[str, Pool], running: set[Op], stop: asyncio.Event, rng: random.Random, faults: Counter[str]
) -> None:
    """Kill clients mid-transaction: cancel the task, or shut its socket down under the driver."""
    kinds = ["cancel", "socket", "cancel_anywhere"]
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.2, 0.5))
        kind = kinds[faults["kill_rounds"] % len(kinds)]
        faults["kill_rounds"] += 1
        in_body = [op for op in running if op.conn is not None and op.task is not None and not op.task.done()]
        anywhere = [op for op in running if op.task is not None and not op.task.done()]
        candidates = anywhere if kind == "cancel_anywhere" else in_body
        if not candidates:
            continue
        op = rng.choice(sorted(candidates, key=lambda o: o.key))
        if kind == "socket":
            try:
                fd = socket_of(op.conn, pools[op.path].driver)
                # shutdown() on a duplicate acts on the shared socket: the driver sees its connection die.
                with socket.socket(fileno=os.dup(fd)) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                continue
            faults["killed_socket"] += 1
        else:
            assert op.task is not None
            op.task.cancel()
            faults["killed_task"] += 1


async def terminator(upstream: Upstream, stop: asyncio.Event, rng: random.Random, faults: Counter[str]) -> None:
    """pg_terminate_backend on one or two random client backends (the pooler's, behind one) every second or so."""
    stack = upstream.stack
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.6, 1.2))
        try:
            if upstream.is_pooler:
                pooler_pids = await asyncio.to_thread(upstream.server_backend_pids)
            async with await psycopg.AsyncConnection.connect(
                host=str(stack.socket_dir), port=stack.pg_port, user=stack.superuser, dbname="app", autocommit=True
            ) as admin:
                rows = await (
                    await admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'bank-%' "
                        "AND backend_type = 'client backend' AND pid <> pg_backend_pid() ORDER BY pid"
                    )
                ).fetchall()
                pids = sorted(pooler_pids) if upstream.is_pooler else [r[0] for r in rows]
                for pid in rng.sample(pids, min(len(pids), rng.randint(1, 2))):
                    row = await (await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))).fetchone()
                    faults["terminated"] += bool(row and row[0])
        except psycopg.OperationalError:
            faults["terminator_missed"] += 1  # the upstream is restarting


async def restarter(upstream: Upstream, stop: asyncio.Event, faults: Counter[str]) -> None:
    """Restart the upstream once, half-way through (in a thread: it blocks until the upstream answers)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), CHAOS_SECONDS / 2)
    if stop.is_set():
        return
    await asyncio.to_thread(upstream.restart)
    faults["upstream_restarts"] += 1


async def relay_chaos(relay: FaultRelay, stop: asyncio.Event, rng: random.Random, faults: Counter[str]) -> None:
    """Stall one link or all, reset links, half-close links in either direction, in turn."""
    kinds = ["stall_one", "drop", "half_close_to_server", "stall_all", "half_close_to_client", "drop"]
    i = 0
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.4, 0.9))
        kind = kinds[i % len(kinds)]
        i += 1
        if kind == "stall_one":
            await asyncio.to_thread(relay.stall, rng.uniform(0.3, MAX_STALL), count=1)
        elif kind == "stall_all":
            await asyncio.to_thread(relay.stall, rng.uniform(0.3, MAX_STALL / 2))
        elif kind == "drop":
            await asyncio.to_thread(relay.drop, count=rng.randint(1, 2))
        else:
            direction = "to_server" if kind.endswith("server") else "to_client"
            await asyncio.to_thread(relay.half_close, direction, count=1)
        faults[f"relay_{kind}_calls"] += 1


# ---------------------------------------------------------------------------------------------- set-up


@pytest.fixture(scope="module")
def bank(fault_stack: DevStack) -> DevStack:
    fault_stack.psql(SCHEMA)
    return fault_stack


@pytest.fixture
def sidecar(
    sidecar_runner: Callable[..., SidecarRunner], bank: DevStack, upstream: Upstream, upstream_relay: FaultRelay
) -> SidecarRunner:
    return sidecar_runner(
        **upstream.sidecar_settings(upstream_relay),
        max_size=4,
        application_name="bank-sidecar",
        connect_timeout=CONNECT_TIMEOUT,
        query_wait_timeout=ACQUIRE_TIMEOUT,
    )


def pool_for(path: str, upstream: Upstream, relay: FaultRelay, sidecar: SidecarRunner) -> Pool:
    driver = path.rsplit("/", 1)[-1]
    via_sidecar = path.startswith("sidecar")
    stack = upstream.stack
    settings = load_settings(
        driver=driver,
        name=path.replace("/", "-"),
        profile="server",
        max_size=6,
        pooled_url=sidecar.url() if via_sidecar else through_relay(stack, relay),
        direct_url=stack.direct_url,
        sslrootcert=str(stack.ca_file),
        pool_mode="transaction" if via_sidecar or upstream.is_pooler else "auto",
        application_name=f"bank-{path.replace('/', '-')}",
        connect_timeout=CONNECT_TIMEOUT,
        acquire_timeout=ACQUIRE_TIMEOUT,
    )
    return Pool(settings)


# ---------------------------------------------------------------------------------------------- the test


async def test_bank_transfers_survive_faults(
    bank: DevStack, upstream: Upstream, upstream_relay: FaultRelay, sidecar: SidecarRunner
) -> None:
    pg_relay = upstream_relay
    bank.psql(SCHEMA)  # a ledger of this run only: the test runs once per upstream on the module's stack
    rng = random.Random(SEED)
    pools = {path: pool_for(path, upstream, pg_relay, sidecar) for path in PATHS}
    faults: Counter[str] = Counter()
    ops: list[Op] = []
    running: set[Op] = set()
    try:
        await ensure_table(pools["asyncpg"], table=TABLE)  # DDL goes to the direct URL, past the relay
        for pool in pools.values():
            await pool.open()

        stop = asyncio.Event()
        clients = [
            asyncio.create_task(
                client(path, pool, ops=ops, running=running, stop=stop, rng=random.Random(rng.random()))
            )
            for path, pool in pools.items()
            for _ in range(CLIENTS_PER_PATH)
        ]
        chaos = [
            asyncio.create_task(killer(pools, running, stop, random.Random(rng.random()), faults)),
            asyncio.create_task(terminator(upstream, stop, random.Random(rng.random()), faults)),
            asyncio.create_task(restarter(upstream, stop, faults)),
            asyncio.create_task(relay_chaos(pg_relay, stop, random.Random(rng.random()), faults)),
        ]
        began = time.monotonic()
        await asyncio.sleep(CHAOS_SECONDS)
        stop.set()
        await asyncio.gather(*chaos)
        pg_relay.resume()
        # Clients finish the transfer they are in; each is bounded by HANG_GUARD, so this cannot hang.
        await asyncio.wait_for(asyncio.gather(*clients), HANG_GUARD + 10)
        chaos_seconds = time.monotonic() - began

        unknown = [op for op in ops if op.outcome in ("unknown", "hung")]
        await resolve(unknown, pools)
        ledger, accounts, keys = await read_back(bank)
    finally:
        for pool in pools.values():
            await pool.close(timeout=5.0)

    report(ops, faults, pg_relay.counters, chaos_seconds, upstream.kind)
    check(ops, ledger=ledger, accounts=accounts, keys=keys, faults=faults, relay=pg_relay.counters)


async def resolve(unknown: list[Op], pools: dict[str, Pool]) -> None:
    """Retry each unknown outcome with the same key (faults are over) until it has a definite one."""
    deadline = time.monotonic() + RESOLVE_SECONDS

    async def one(op: Op) -> None:
        calls_before = op.calls
        while True:
            try:
                op.result = await idempotent(
                    pools[op.path],
                    op.key,
                    transfer(op, pools[op.path].driver),
                    request=op.request,
                    table=TABLE,
                    check_timeout=CHECK_TIMEOUT,
                )
                op.resolved = "committed"
                op.replayed = op.calls == calls_before
                return
            except Rejected:
                op.resolved = "failed"
                return
            except Exception:
                # A pooled connection broken by the last faults: the next try gets a fresh one.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    await asyncio.gather(*(one(op) for op in unknown))


async def read_back(stack: DevStack) -> tuple[dict[str, tuple[int, int, int]], dict[int, int], dict[str, str]]:
    async with await psycopg.AsyncConnection.connect(
        host=str(stack.socket_dir), port=stack.pg_port, user=stack.superuser, dbname="app", autocommit=True
    ) as admin:
        ledger = {
            k: (s, d, a)
            for k, s, d, a in await (await admin.execute("SELECT key, src, dst, amount FROM bank.transfers")).fetchall()
        }
        accounts = dict(await (await admin.execute("SELECT id, balance FROM bank.accounts")).fetchall())
        keys = dict(await (await admin.execute(f"SELECT key, coalesce(result::text, '') FROM {TABLE}")).fetchall())
    return ledger, accounts, keys


def report(ops: list[Op], faults: Counter[str], relay: dict[str, int], seconds: float, upstream: str) -> None:
    finals = Counter(op.final for op in ops)
    unknown = [op for op in ops if op.outcome in ("unknown", "hung")]
    print(
        f"\nbank-transfer invariant, upstream {upstream} (seed {SEED}, {seconds:.1f}s of faults, "
        f"{len(ops)} transfers attempted)"
    )
    for path in sorted({op.path for op in ops}):
        mine = [op for op in ops if op.path == path]
        durations = sorted(op.duration for op in mine)
        print(
            f"  {path:16} attempted {len(mine):5}  committed {sum(o.final == 'committed' for o in mine):5}  "
            f"failed {sum(o.final == 'failed' for o in mine):4}  unknown {sum(o in unknown for o in mine):3}  "
            f"p50 {statistics.median(durations):.3f}s  max {durations[-1]:.2f}s"
        )
    print(
        f"  total: attempted {len(ops)}, committed {finals['committed']}, failed {finals['failed']} "
        f"(rejected by rule {sum(o.error == 'Rejected' for o in ops)}), unknown-then-resolved {len(unknown)} "
        f"(of which already committed {sum(o.replayed for o in unknown)}), hung {sum(o.outcome == 'hung' for o in ops)}"
    )
    errors = Counter(op.error for op in ops if op.outcome == "failed" and op.error != "Rejected")
    print(f"  definite failures by error: {dict(errors.most_common())}")
    examples = {(op.path, op.error): op.detail for op in ops if op.outcome == "failed" and op.error != "Rejected"}
    for (path, _), detail in sorted(examples.items()):
        print(f"    e.g. {path}: {detail}")
    print(f"  faults: {dict(sorted(faults.items()))}")
    print(f"  relay: {relay}")


def check(
    ops: list[Op],
    *,
    ledger: dict[str, tuple[int, int, int]],
    accounts: dict[int, int],
    keys: dict[str, str],
    faults: Counter[str],
    relay: dict[str, int],
) -> None:
    # Money is neither created nor destroyed, and every balance is exactly what the ledger says.
    assert sum(accounts.values()) == ACCOUNTS * START_BALANCE
    expected = {account: START_BALANCE for account in accounts}
    for src, dst, amount in ledger.values():
        expected[src] -= amount
        expected[dst] += amount
    assert accounts == expected, "a transfer was applied partly, twice, or without its ledger row"
    # Every committed transfer left its idempotency record in the same transaction, and nothing else did.
    assert set(keys) == set(ledger)
    assert all(keys.values()), "an idempotency key committed without its result"

    by_key = {op.key: op for op in ops}
    assert set(ledger) <= set(by_key)
    for key, row in ledger.items():
        assert row == (by_key[key].src, by_key[key].dst, by_key[key].amount), key
    for op in ops:
        if op.final == "committed":  # the first run's result, or the recorded one on a replay: the same
            assert op.result == {"key": op.key, "amount": op.amount}, (op.key, op.result)
    assert not [op for op in ops if op.outcome in ("unknown", "hung") and op.resolved not in ("committed", "failed")]
    committed = {op.key for op in ops if op.final == "committed"}
    failed = {op.key for op in ops if op.final == "failed"}
    assert committed | failed == set(by_key)
    lost = committed - set(ledger)
    assert not lost, f"{len(lost)} transfers the clients saw committed are missing: {sorted(lost)[:5]}"
    ghosts = failed & set(ledger)
    assert not ghosts, f"{len(ghosts)} transfers the clients saw fail are present: " + ", ".join(
        f"{k} ({by_key[k].detail})" for k in sorted(ghosts)[:5]
    )
    assert not [op for op in ops if op.invalid and op.key in ledger]

    # Nobody hung past their timeouts.
    hung = [op for op in ops if op.outcome == "hung"]
    assert not hung, f"{len(hung)} client operations hung: {[op.key for op in hung[:5]]}"
    slowest = max(ops, key=lambda op: op.duration)
    assert slowest.duration <= OP_BOUND, f"{slowest.key} took {slowest.duration:.1f}s (bound {OP_BOUND:.0f}s)"

    # The faults really happened, and every path kept moving money through them.
    assert faults["upstream_restarts"] == 1
    assert faults["terminated"] >= 1
    assert faults["killed_task"] >= 1
    assert faults["killed_socket"] >= 1
    assert relay.get("stalls", 0) >= 1
    assert relay.get("drops", 0) >= 1
    assert relay.get("half_closes", 0) >= 1
    for path in {op.path for op in ops}:
        assert sum(op.path == path and op.final == "committed" for op in ops) >= 10, path


# ---------------------------------------------------------------------------------------------- found by the run above


async def admin_connect(stack: DevStack) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        host=str(stack.socket_dir), port=stack.pg_port, user=stack.superuser, dbname="app", autocommit=True
    )


async def wait_for_commit(stack: DevStack, application_name: str) -> None:
    """Until that application's backend is inside a COMMIT (its deferred trigger sleeping)."""
    async with await admin_connect(stack) as admin, asyncio.timeout(30):
        while not await (
            await admin.execute(
                "SELECT 1 FROM pg_stat_activity "
                "WHERE application_name = %s AND state = 'active' AND query ILIKE 'COMMIT%%'",
                (application_name,),
            )
        ).fetchone():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_connection_lost_after_commit_does_not_report_a_committed_transfer_as_failed(
    driver: str, bank: DevStack, pg_relay: FaultRelay
) -> None:
    """The bank run's ghosts, made deterministic: the link is cut towards the server *during* COMMIT.

    PostgreSQL finishes the COMMIT (it does not watch the socket while it works) and its answer still
    reaches the client; then the backend reads EOF and exits. The transfer is committed and the client
    saw COMMIT succeed; whatever the pool does with the dead connection afterwards must not turn that
    success into an exception, or the caller reports a payment that went through as failed.
    """
    name = f"bank-after-commit-{driver}"
    pool = Pool(
        load_settings(
            driver=driver,
            name=name,
            profile="server",
            max_size=1,
            pooled_url=through_relay(bank, pg_relay),
            direct_url=bank.direct_url,
            sslrootcert=str(bank.ca_file),
            application_name=name,
        )
    )
    op = Op(f"after-commit-{driver}-{SEED}-{time.monotonic_ns()}", driver, 1, 2, 5, invalid=False)

    async def body(conn: Any) -> dict[str, Any]:
        await run(conn, driver, "SET LOCAL bank.slow_commit = 'on'")
        return await transfer(op, driver)(conn)

    async def cut_during_commit() -> None:
        await wait_for_commit(bank, name)
        assert await asyncio.to_thread(pg_relay.half_close, "to_server") == 1

    try:
        await ensure_table(pool, table=TABLE)
        cutter = asyncio.create_task(cut_during_commit())
        try:
            result: Any = await idempotent(pool, op.key, body, request=op.request, table=TABLE)
        except Exception as exc:
            result = exc
        await cutter
    finally:
        await pool.close(timeout=5.0)
    ledger, _, _ = await read_back(bank)
    assert op.key in ledger, "the COMMIT was cut before PostgreSQL finished it: the test set-up is wrong"
    seen = where(result) if isinstance(result, BaseException) else repr(result)
    assert result == {"key": op.key, "amount": op.amount}, f"the transfer committed, but idempotent() gave {seen}"


async def test_a_backend_terminated_while_checked_out_is_counted_as_closed(bank: DevStack, caplog: Any) -> None:
    """Seen in the bank run's log: asyncpg's termination callback reached a released proxy and raised."""
    from prometheus_client import REGISTRY

    name = "bank-closed-count"
    labels = {"pool": name, "driver": "asyncpg", "route": "pooled", "reason": "error"}
    pool = Pool(
        load_settings(
            driver="asyncpg",
            name=name,
            profile="server",
            max_size=1,
            pooled_url=bank.direct_url,
            sslrootcert=str(bank.ca_file),
            application_name=name,
        )
    )
    try:
        await pool.open()
        before = REGISTRY.get_sample_value("poolkit_connections_closed_total", labels) or 0.0
        with contextlib.suppress(Exception):
            async with pool.acquire() as conn:
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                async with await admin_connect(bank) as admin:
                    await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                await conn.fetchval("SELECT pg_sleep(5)")  # the termination reaches the client here
        assert await pool.fetchval("SELECT 1") == 1  # the pool replaced the connection
        # asyncpg reports the termination through a loop callback: wait for the count, bounded.
        deadline = time.monotonic() + 5.0
        while (after := REGISTRY.get_sample_value("poolkit_connections_closed_total", labels) or 0.0) == before:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
    finally:
        await pool.close(timeout=5.0)
    callback_errors = [r.getMessage() for r in caplog.records if "Exception in callback" in r.getMessage()]
    assert not callback_errors, f"poolkit's termination listener raised: {callback_errors}"
    assert after - before == 1, "the terminated connection was not counted in poolkit_connections_closed_total"

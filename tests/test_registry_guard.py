"""GuardedRegistry on a fake registry that can hang or fail: deadlines, the circuit breaker, bounded threads."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from test_registry import make_record

from lorax_lite.registry.base import (
    AdapterRecord,
    CorruptRecordError,
    Registry,
    RegistryError,
    RegistryUnavailableError,
)
from lorax_lite.registry.guard import GuardedRegistry, guarded

URL = "redis://admin:***@10.1.2.3:6390/0"
SHORT = 0.05  # deadlines and probe intervals in these tests: no sleep is longer than needed


class FakeRegistry(Registry):
    """One record ("pricing"); `hang` makes calls block until released, `fail` makes them raise."""

    def __init__(self) -> None:
        self.url = URL
        self.record = make_record()
        self.num_calls = 0
        self.num_running = 0
        self.most_running = 0
        self.fail: RegistryError | None = None
        self.release = threading.Event()
        self.release.set()
        self._lock = threading.Lock()

    def hang(self) -> None:
        self.release.clear()

    def get(self, adapter_id: str) -> AdapterRecord | None:
        with self._lock:
            self.num_calls += 1
            self.num_running += 1
            self.most_running = max(self.most_running, self.num_running)
        try:
            self.release.wait(timeout=10)
            if self.fail is not None:
                raise self.fail
            return self.record if adapter_id == "pricing" else None
        finally:
            with self._lock:
                self.num_running -= 1

    def ping(self) -> None:
        self.get("pricing")

    def add_version(self, record: AdapterRecord) -> bool:
        raise NotImplementedError

    def get_version(self, adapter_id: str, version: str) -> AdapterRecord | None:
        raise NotImplementedError

    def list_current(self) -> list[AdapterRecord]:
        return [self.record] if self.get("pricing") else []

    def versions(self, adapter_id: str) -> list[AdapterRecord]:
        raise NotImplementedError

    def remove(self, adapter_id: str) -> bool:
        raise NotImplementedError

    def set_pinned(self, adapter_id: str, pinned: bool) -> bool:
        raise NotImplementedError


@pytest.fixture
def fake() -> FakeRegistry:
    fake = FakeRegistry()
    yield fake
    fake.release.set()  # let hung calls' threads finish


def make_guard(fake: FakeRegistry, **kw: object) -> GuardedRegistry:
    return GuardedRegistry(fake, **{"timeout_s": SHORT, "probe_interval_s": SHORT, **kw})


def timed(call, *args):
    start = time.monotonic()
    try:
        return call(*args), time.monotonic() - start
    except Exception as exc:
        return exc, time.monotonic() - start


def assert_url_free(message: str) -> None:
    for part in ("redis://", "10.1.2.3", "6390", "admin"):
        assert part not in message, message


def test_calls_pass_through_while_the_registry_answers(fake):
    guard = make_guard(fake)
    assert guard.get("pricing") == fake.record and guard.get("other") is None
    assert guard.url == URL and guard.is_reachable
    assert guard.health().reachable and guard.health().last_error_age_s is None


def test_a_hung_call_returns_at_the_deadline_with_a_url_free_error(fake):
    guard = make_guard(fake)
    fake.hang()
    raised, seconds = timed(guard.get, "pricing")
    assert isinstance(raised, RegistryUnavailableError) and seconds < 1.0
    assert str(raised).startswith("the adapter registry is unreachable")
    assert_url_free(str(raised))
    assert not guard.is_reachable


def test_while_unreachable_calls_fail_fast_except_one_probe_per_interval(fake):
    guard = make_guard(fake, probe_interval_s=0.3)
    fake.fail = RegistryError(f"registry {URL}: Connection refused")
    with pytest.raises(RegistryUnavailableError) as raised:
        guard.get("pricing")
    assert str(raised.value) == "the adapter registry is unreachable"
    calls = fake.num_calls
    for _ in range(20):  # within the probe interval: none reaches the registry
        with pytest.raises(RegistryUnavailableError) as fast:
            guard.get("pricing")
        assert 0 < fast.value.retry_after_s <= 0.3
    assert fake.num_calls == calls
    fake.fail = None
    time.sleep(0.3)
    assert guard.get("pricing") == fake.record  # the probe gets through and succeeds
    assert guard.is_reachable and fake.num_calls == calls + 1
    assert guard.get("pricing") == fake.record


def test_one_probe_at_a_time(fake):
    guard = make_guard(fake, timeout_s=0.5)
    fake.fail = RegistryError("down")
    with pytest.raises(RegistryUnavailableError):
        guard.get("pricing")
    fake.fail = None
    time.sleep(SHORT)
    fake.hang()
    probe = threading.Thread(target=lambda: guard.get("pricing"))
    probe.start()
    while fake.num_running == 0:  # the probe reached the registry and hangs there
        time.sleep(0.005)
    raised, seconds = timed(guard.get, "pricing")
    assert isinstance(raised, RegistryUnavailableError) and seconds < 0.1
    assert fake.num_running == 1
    fake.release.set()
    probe.join()
    assert guard.is_reachable


def test_a_failed_probe_keeps_it_unreachable_until_the_next_one(fake):
    guard = make_guard(fake)
    fake.fail = RegistryError("down")
    for _ in range(3):
        time.sleep(SHORT)
        with pytest.raises(RegistryUnavailableError):
            guard.get("pricing")
    assert fake.num_calls == 3 and not guard.is_reachable
    health = guard.health()
    assert not health.reachable and health.unreachable_for_s >= 2 * SHORT > health.last_error_age_s
    assert health.message.startswith("the adapter registry is unreachable")
    assert_url_free(health.message)


def test_hung_calls_never_pile_up_threads(fake):
    guard = make_guard(fake, max_workers=2, max_pending=2)
    fake.hang()
    outcomes: list[object] = []
    callers = [threading.Thread(target=lambda: outcomes.append(timed(guard.get, "pricing")[0])) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert all(isinstance(outcome, RegistryUnavailableError) for outcome in outcomes) and len(outcomes) == 3
    assert fake.most_running == 2  # two threads hang in the registry; the third call never got one
    time.sleep(SHORT)  # a probe is due, but both places are still held by the hung calls: refused at once
    raised, seconds = timed(guard.get, "pricing")
    assert isinstance(raised, RegistryUnavailableError) and "too many lookups" in str(raised) and seconds < 0.1
    assert fake.num_calls == 2
    fake.release.set()
    time.sleep(SHORT)
    assert guard.get("pricing") == fake.record  # the hung calls returned and gave their places back


def test_a_call_queued_past_its_deadline_never_runs(fake):
    guard = make_guard(fake, max_workers=1)
    fake.hang()
    outcomes: list[object] = []
    callers = [threading.Thread(target=lambda: outcomes.append(timed(guard.get, "pricing")[0])) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert all(isinstance(outcome, RegistryUnavailableError) for outcome in outcomes) and len(outcomes) == 2
    fake.release.set()
    time.sleep(SHORT)
    assert fake.num_calls == 1  # the queued one was cancelled


def test_a_corrupt_record_is_not_an_outage(fake):
    guard = make_guard(fake)
    fake.fail = CorruptRecordError(f"registry {URL}: corrupt record: Expecting value")
    with pytest.raises(CorruptRecordError) as raised:
        guard.get("pricing")
    assert not isinstance(raised.value, RegistryUnavailableError)
    assert_url_free(str(raised.value))
    assert guard.is_reachable


def test_state_changes_are_logged_once_naming_the_redacted_url(fake, caplog):
    guard = make_guard(fake)
    fake.fail = RegistryError("refused")
    with caplog.at_level(logging.WARNING, logger="lorax_lite.registry.guard"):
        for _ in range(3):
            with pytest.raises(RegistryUnavailableError):
                guard.get("pricing")
            time.sleep(SHORT)
        fake.fail = None
        guard.get("pricing")
        guard.get("pricing")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "unreachable" in messages[0] and URL in messages[0] and "refused" in messages[0]
    assert "reachable again" in messages[1] and URL in messages[1]


def test_ping_and_list_are_guarded_too(fake):
    guard = make_guard(fake)
    guard.ping()
    assert guard.list_current() == [fake.record]
    fake.hang()
    with pytest.raises(RegistryUnavailableError):
        guard.ping()
    with pytest.raises(RegistryUnavailableError):
        guard.list_current()


def test_guarded_wraps_once(fake):
    guard = guarded(fake, timeout_s=0.5)
    assert isinstance(guard, GuardedRegistry) and guard.timeout_s == 0.5 and guard.registry is fake
    assert guarded(guard) is guard
    with pytest.raises(ValueError, match="timeout"):
        GuardedRegistry(fake, timeout_s=0)

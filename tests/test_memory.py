"""tf_backup.memory: the glibc malloc settings every task gets (WORKSPACE_NOTES, "Memory allocation")."""

import os

import pytest

import tf_backup
from tf_backup import memory

ENV_NAMES = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_NAMES + [memory.ENV]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(memory, "_applied", None)


class FakeLibc:
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer


def test_tune_malloc_sets_the_three_thresholds_and_the_arenas_once(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    assert tf_backup.tune_malloc() is True
    assert libc.calls == [(memory.M_MMAP_THRESHOLD, 32 << 20), (memory.M_TRIM_THRESHOLD, 256 << 20),
                          (memory.M_TOP_PAD, 32 << 20), (memory.M_ARENA_MAX, 2)]
    assert tf_backup.tune_malloc() is True and len(libc.calls) == 4  # already in effect
    assert tf_backup.tune_malloc(trim_threshold=64 << 20) is True and libc.calls[-3] == (memory.M_TRIM_THRESHOLD, 64 << 20)


def test_tune_malloc_leaves_the_arenas_to_a_caller_who_set_malloc_arena_max(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert tf_backup.tune_malloc() is True
    assert [param for param, _ in libc.calls] == [memory.M_MMAP_THRESHOLD, memory.M_TRIM_THRESHOLD, memory.M_TOP_PAD]


def test_tune_malloc_reports_a_refusal_and_other_c_libraries(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: FakeLibc(answer=0))
    assert tf_backup.tune_malloc() is False
    monkeypatch.setattr(memory, "_glibc", lambda: None)  # not glibc (macOS, musl)
    assert tf_backup.tune_malloc() is False


def test_tune_malloc_works_on_this_machine_glibc():
    # The CI machines are Linux with glibc: the real mallopt accepts the settings.
    assert memory._glibc() is not None  # pylint: disable=protected-access
    assert tf_backup.tune_malloc() is True


def test_the_environment_switch_turns_both_off(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    monkeypatch.setenv(memory.ENV, "0")
    assert tf_backup.tune_malloc() is False and libc.calls == []
    assert memory.malloc_env() == {}


def test_malloc_env_keeps_the_callers_own_settings(monkeypatch):
    assert memory.malloc_env() == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
                                   "MALLOC_TOP_PAD_": str(32 << 20), "MALLOC_ARENA_MAX": "2"}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1234")
    assert "MALLOC_TRIM_THRESHOLD_" not in memory.malloc_env()


@pytest.mark.parametrize("kwargs, match", [
    (dict(mmap_threshold=64 << 20), "mmap_threshold=67108864"),
    (dict(trim_threshold=-1), "trim_threshold=-1"),
    (dict(top_pad=1.5), "top_pad=1.5"),
    (dict(trim_threshold=2**31), "trim_threshold=2147483648"),
    (dict(arena_max=0), "arena_max=0"),
    (dict(arena_max="2"), "arena_max='2'"),
])
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tf_backup.tune_malloc(**kwargs)
    with pytest.raises(ValueError, match=match):
        memory.malloc_env(**kwargs)


def task_environment(names):
    import os  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported
    return {n: os.environ.get(n) for n in names}


def test_every_local_cluster_task_starts_with_the_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_TOP_PAD_", "4096")  # the caller's own value wins
    cluster = tf_backup.LocalCluster(task_environment, num_workers=1, num_ps=1, args=(ENV_NAMES,), serve_ps=False)
    with cluster:
        cluster.start()
        got = cluster.wait_for(["worker-0", "ps-0"], timeout=120)
    want = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20), "MALLOC_TOP_PAD_": "4096",
            "MALLOC_ARENA_MAX": "2"}
    assert got == [want, want]
    monkeypatch.setenv(memory.ENV, "0")
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    cluster = tf_backup.LocalCluster(task_environment, num_workers=1, num_ps=0, args=(ENV_NAMES,))
    with cluster:
        assert cluster.start().wait(timeout=120) == [dict.fromkeys(ENV_NAMES)]
    assert os.environ[memory.ENV] == "0"


class Stop(Exception):
    pass


def test_serve_and_the_strategy_apply_the_settings_before_anything_else(monkeypatch):
    # Processes started without the variables (a real cluster's tasks) get them through mallopt.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tf_backup import cluster as cluster_lib  # pylint: disable=g-import-not-at-top
    from tf_backup.ps import server  # pylint: disable=g-import-not-at-top
    calls = []
    monkeypatch.setattr(memory, "tune_malloc", lambda: calls.append("tune_malloc"))

    def stop(*args, **kwargs):
        raise Stop

    spec = tf.train.ClusterSpec({"worker": ["localhost:1", "localhost:2"], "ps": ["localhost:3"]})
    resolver = lambda job: tf.distribute.cluster_resolver.SimpleClusterResolver(spec, task_type=job, task_id=0)  # noqa: E731
    monkeypatch.setattr(server, "_start_server", stop)
    with pytest.raises(Stop):
        tf_backup.serve(resolver("ps"))
    assert calls == ["tune_malloc"]
    monkeypatch.setattr(cluster_lib, "wait_for_tasks", lambda *args, **kwargs: None)
    monkeypatch.setattr(memory, "tune_malloc", lambda: (calls.append("strategy"), stop()))
    with pytest.raises(Stop):
        tf_backup.BackupWorkerStrategy(resolver("worker"))
    assert calls == ["tune_malloc", "strategy"]


def test_reapply_repeats_the_last_settings_and_nothing_before_them(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    assert memory.reapply() is False and libc.calls == []  # tune_malloc applied nothing yet
    tf_backup.tune_malloc()
    assert memory.reapply() is True
    assert libc.calls[4:] == libc.calls[:3]  # the three thresholds again, not cached away; not the arena cap

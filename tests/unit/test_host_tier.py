"""The host tier's default size: a share of the memory this process may still take, split with
the servers of the host's other GPUs, and a count that lets the byte budget decide."""

from __future__ import annotations

import psutil

from server.adapters import residency
from server.config import Settings

GiB = 1 << 30


def _cgroup(d, limit, current, inactive=0):
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.max").write_text(f"{limit}\n")
    (d / "memory.current").write_text(f"{current}\n")
    (d / "memory.stat").write_text(f"anon {current - inactive}\ninactive_file {inactive}\n")


def test_a_cgroup_limit_bounds_the_memory_available(tmp_path):
    host = 100 * GiB  # the kernel's MemAvailable, fixed: it moves between two reads
    proc = tmp_path / "self_cgroup"
    proc.write_text("0::/\n")
    _cgroup(tmp_path, 3 * GiB, GiB)  # a container's namespace: its own files at the root
    assert residency.available_host_memory(tmp_path, proc, host) == 2 * GiB
    _cgroup(tmp_path, 3 * GiB, 2 * GiB, inactive=GiB)  # page cache the kernel can drop is not used
    assert residency.available_host_memory(tmp_path, proc, host) == 2 * GiB
    _cgroup(tmp_path, "max", GiB)  # no limit
    assert residency.available_host_memory(tmp_path, proc, host) == host
    # a Slurm job or a systemd unit: the limit is on its own cgroup, or one above it
    proc.write_text("0::/system.slice/job.scope\n")
    _cgroup(tmp_path / "system.slice", 4 * GiB, 3 * GiB)
    _cgroup(tmp_path / "system.slice" / "job.scope", "max", GiB)
    assert residency.available_host_memory(tmp_path, proc, host) == GiB
    _cgroup(tmp_path / "system.slice", 2 * GiB, 3 * GiB)  # already over: nothing left
    assert residency.available_host_memory(tmp_path, proc, host) == 0
    assert residency.available_host_memory(tmp_path / "none", tmp_path / "missing", host) == host  # no cgroup v2


def test_the_budget_is_half_of_what_is_free_shared_with_the_hosts_other_gpus():
    assert residency.default_host_tier_bytes(100 * GiB, 1, 0) == 50 * GiB  # a CPU host
    assert residency.default_host_tier_bytes(100 * GiB, 1, 1) == 50 * GiB  # one GPU
    assert residency.default_host_tier_bytes(128 * GiB, 1, 8) == 8 * GiB  # one of 8 single-GPU servers
    # tensor parallel over 4 of 8 GPUs: each of the 4 workers holds its own copy of the tier
    assert residency.default_host_tier_bytes(128 * GiB, 4, 8) == 8 * GiB
    assert residency.default_host_tier_bytes(0, 1, 1) == 256 << 20  # never nothing


def test_the_count_lets_the_bytes_decide():
    assert residency.default_max_cpu_loras(56 * GiB, 128) == 3584  # 56 GiB of 16 MiB adapters
    assert residency.default_max_cpu_loras(200 * GiB, 128) == residency.MAX_CPU_LORAS
    assert residency.default_max_cpu_loras(GiB, 4) == 64 and residency.default_max_cpu_loras(GiB, 256) == 256


def test_settings_fill_the_host_tier_from_the_machine_unless_given():
    s = Settings()
    free = psutil.virtual_memory().available
    assert 0.3 * free <= s.adapter_cache_bytes <= 0.55 * free + (256 << 20)
    assert s.max_cpu_loras == residency.default_max_cpu_loras(s.adapter_cache_bytes, s.max_loras)
    s = Settings(adapter_cache_bytes=48 * GiB, max_loras=128)
    assert s.adapter_cache_bytes == 48 * GiB and s.max_cpu_loras == 3072  # the count follows the given budget
    s = Settings(max_cpu_loras=70)
    assert s.max_cpu_loras == 70 and s.adapter_cache_bytes >= 256 << 20
    # sized here, not set: a Ray replica, given the settings the driver was given, sizes its own
    assert "adapter_cache_bytes" not in s.model_dump(exclude_unset=True) and "max_cpu_loras" in s.model_fields_set

"""The host tier's default size: a share of the memory this process may still take, split with
the servers of the host's other GPUs, and a count that lets the byte budget decide."""

from __future__ import annotations

import psutil

from server.adapters import residency
from server.config import Settings

GiB = 1 << 30


def test_a_container_limit_bounds_the_memory_available(tmp_path):
    host = psutil.virtual_memory().available
    (tmp_path / "memory.max").write_text(f"{3 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{GiB}\n")
    assert residency.available_host_memory(tmp_path) == min(host, 2 * GiB)
    (tmp_path / "memory.max").write_text("max\n")  # cgroup v2, no limit
    assert residency.available_host_memory(tmp_path) == host
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{GiB}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{2 * GiB}\n")  # already over: nothing left
    assert residency.available_host_memory(v1) == 0
    assert residency.available_host_memory(tmp_path / "none") == host  # no cgroup files: the host's


def test_the_budget_is_half_of_what_is_free_shared_with_the_hosts_other_gpus():
    assert residency.default_host_tier_bytes(100 * GiB, 1, 0) == 50 * GiB  # a CPU host
    assert residency.default_host_tier_bytes(100 * GiB, 1, 1) == 50 * GiB  # one GPU
    assert residency.default_host_tier_bytes(128 * GiB, 1, 8) == 8 * GiB  # one of 8 single-GPU servers
    assert residency.default_host_tier_bytes(128 * GiB, 4, 8) == 32 * GiB  # tensor parallel over 4 of 8
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

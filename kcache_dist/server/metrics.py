"""GET /metrics: `EngineStats` in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from .engine_stats import EngineStats

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("stop", "length", "abort")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_prometheus(stats: EngineStats, model_name: str) -> str:
    labels = f'model_name="{_escape(model_name)}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float, extra_labels: str = "") -> None:
        if not any(line.startswith(f"# HELP {name} ") for line in lines):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
        label_text = labels + ("," + extra_labels if extra_labels else "")
        lines.append(f"{name}{{{label_text}}} {value}")

    p = "kcache_dist_"
    metric(p + "requests_running", "gauge", "Requests in the running batch.", stats.num_requests_running)
    metric(p + "requests_waiting", "gauge", "Requests queued, waiting for a batch slot or cache blocks.",
           stats.num_requests_waiting)
    metric(p + "prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.num_prompt_tokens_total)
    metric(p + "generation_tokens_total", "counter", "Tokens generated.", stats.num_generation_tokens_total)
    metric(p + "token_steps_total", "counter", "Engine steps that generated tokens (generation tokens per "
           "step above 1: requests were batched).", stats.num_token_steps_total)
    for reason in sorted(set(FINISH_REASONS) | set(stats.num_finished_total)):
        metric(p + "requests_finished_total", "counter", "Requests finished, by finish reason (abort: the "
               "client went away or the server stopped it).", stats.num_finished_total.get(reason, 0),
               f'finish_reason="{_escape(reason)}"')
    metric(p + "preemptions_total", "counter", "Running requests preempted for lack of cache blocks.",
           stats.num_preemptions_total)
    metric(p + "decode_throughput_tokens_per_second", "gauge", "Generated tokens per second of engine step "
           "time over the last 10 s (0 when idle).", round(stats.decode_throughput_tokens_per_s, 3))
    metric(p + "device_cache_blocks_in_use", "gauge", "Cache blocks in use in device (GPU) memory: K blocks in "
           "KCache mode, K+V blocks in full mode.", stats.device_cache_blocks_in_use)
    metric(p + "device_cache_blocks_total", "gauge", "Cache blocks in device (GPU) memory.",
           stats.device_cache_blocks_total)
    metric(p + "host_v_blocks_in_use", "gauge", "V blocks in use in host memory (KCache mode; 0 in full mode).",
           stats.host_v_blocks_in_use)
    metric(p + "host_v_blocks_total", "gauge", "V blocks in host memory (KCache mode; 0 in full mode).",
           stats.host_v_blocks_total)
    metric(p + "v_bytes_fetched_total", "counter", "Bytes of far V rows read from host memory by KCache decode "
           "steps (rows x head_dim x dtype size).", stats.v_bytes_fetched_total)
    metric(p + "pinned_host_bytes", "gauge", "Page-locked host memory of rank 0: the V pool when pinned, plus "
           "torch's pinned-memory allocator (0 on a CPU device).", stats.pinned_host_bytes)
    mode_labels = f'kcache_mode="{_escape(stats.kcache_mode)}"'
    metric(p + "cache_mode_info", "gauge", "The attention cache mode (full | kcache).", 1, mode_labels)
    return "\n".join(lines) + "\n"

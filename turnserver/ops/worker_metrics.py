"""The supervisor's /metrics: every worker's exposition text combined into one."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# Metrics that are not sums over workers
_MIN = {"turn_probe_success"}
_MAX = {
    "turn_offload_enabled",  # every worker reads the one program's maps
    "turn_offload_passed_up",
    "turn_probe_rtt_seconds",
    "turn_event_loop_lag_seconds",
    "turn_build_info",
    "process_start_time_seconds",
    "python_info",
}


def merge_metrics(texts: list[str]) -> str:
    """Combine workers' exposition text: sums, except the gauges in _MIN and _MAX."""
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]
    families = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            _, _, values = families.setdefault(family.name, (family.type, family.documentation, {}))
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    values[key] = sample.value
                elif family.name in _MIN:
                    values[key] = min(values[key], sample.value)
                elif family.name in _MAX or sample.name.endswith("_created"):
                    values[key] = max(values[key], sample.value)
                else:
                    values[key] += sample.value
    lines: list[str] = []
    for name, (kind, doc, values) in families.items():
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in values.items():
            text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(
                f"{sample_name}{{{text}}} {value!r}" if labels else f"{sample_name} {value!r}"
            )
    return "\n".join(lines) + "\n"

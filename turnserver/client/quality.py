"""Call quality from round-trip time, jitter and loss, in the words Twilio's preflight
uses (the /preflight page computes the same in preflight.js, with the same constants).

MOS is estimated with the E-model (ITU-T G.107) in the simplified form of Cole and
Rosenbluth ("Voice over IP Performance Monitoring", 2001), as twilio-voice.js computes
it (lib/twilio/statsMonitor and mos): effective latency = RTT + 2 jitter + 10 ms;
R = 94.768 - effective/40 below 160 ms, - (effective - 120)/10 below 1 s, 0 beyond;
R less 2.5 per percent lost (never below 6.52 while loss leaves any R); MOS = 1 + 0.035 R
+ 7e-6 R (R - 60) (100 - R). Grades follow twilio-voice.js's PreflightTest call quality
(excellent > 4.2, great > 4.1, good > 3.7, fair > 3.1, else degraded), warnings its
StatsMonitor thresholds: high-rtt above 400 ms, high-jitter above 30 ms,
high-packet-loss above 1 %, low-mos below 3.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

R0 = 94.768
GRADES = ((4.2, "excellent"), (4.1, "great"), (3.7, "good"), (3.1, "fair"))
HIGH_RTT_MS = 400.0
HIGH_JITTER_MS = 30.0
HIGH_LOSS = 0.01
LOW_MOS = 3.5

# what a path's verdict says: the page and the CLI use these words
WORKS = "works"
POOR = "works, but poor"
FAILS = "does not work"


def mos(rtt_ms: float, jitter_ms: float, loss: float) -> float:
    """Estimated MOS (1 to about 4.4) of a call over a path with this round trip,
    jitter (both ms) and loss (a fraction)."""
    effective = rtt_ms + 2 * jitter_ms + 10
    if effective < 160:
        r = R0 - effective / 40
    elif effective < 1000:
        r = R0 - (effective - 120) / 10
    else:
        r = 0.0
    lost_percent = loss * 100
    r = max(r - lost_percent * 2.5, 6.52) if lost_percent <= r / 2.5 else 0.0
    return 1 + 0.035 * r + 0.000007 * r * (r - 60) * (100 - r)


def grade(score: float) -> str:
    for floor, name in GRADES:
        if score > floor:
            return name
    return "degraded"


def warnings(rtt_ms: float, jitter_ms: float, loss: float, score: float) -> list[str]:
    out = []
    if rtt_ms > HIGH_RTT_MS:
        out.append("high-rtt")
    if jitter_ms > HIGH_JITTER_MS:
        out.append("high-jitter")
    if loss > HIGH_LOSS:
        out.append("high-packet-loss")
    if score < LOW_MOS:
        out.append("low-mos")
    return out


@dataclass
class Quality:
    """What one path's media looked like, per round trip to the server."""

    rtt_ms: dict[str, float] = field(default_factory=dict)  # min, avg, max
    jitter_ms: float = 0.0
    loss: float = 0.0
    out_of_order: int = 0
    duplicates: int = 0
    mos: float = 0.0
    grade: str = ""
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        rtts_ms: list[float],
        jitter_ms: float,
        loss: float,
        out_of_order: int = 0,
        duplicates: int = 0,
    ) -> Quality:
        avg = sum(rtts_ms) / len(rtts_ms) if rtts_ms else 0.0
        score = mos(avg, jitter_ms, loss)
        return cls(
            {
                "min": round(min(rtts_ms), 1) if rtts_ms else 0.0,
                "avg": round(avg, 1),
                "max": round(max(rtts_ms), 1) if rtts_ms else 0.0,
            },
            round(jitter_ms, 1),
            round(loss, 4),
            out_of_order,
            duplicates,
            round(score, 2),
            grade(score),
            warnings(avg, jitter_ms, loss, score),
        )

    @property
    def verdict(self) -> str:
        """WORKS, or POOR when a warning stands."""
        return POOR if self.warnings else WORKS

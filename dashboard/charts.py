"""Throughput and failure charts as inline SVG (no JavaScript, no library): one bar per bucket,
completed stacked under failed, with a title per bar for the figures."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC
from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT = 600, 120


def bars(buckets: Sequence[dict[str, Any]], label: str = "") -> Markup:
    """`buckets`: rows of (at, completed, failed)."""
    if not buckets:
        return Markup("")
    peak = max((b["completed"] + b["failed"] for b in buckets), default=0) or 1
    step = WIDTH / len(buckets)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT + 14}" role="img" '
        f'aria-label="{escape(label)}" preserveAspectRatio="none">'
    ]
    for i, b in enumerate(buckets):
        done_h = HEIGHT * b["completed"] / peak
        fail_h = HEIGHT * b["failed"] / peak
        x = i * step
        at = b["at"].astimezone(UTC).strftime("%H:%M")
        parts.append(
            f"<g><title>{at} UTC: {b['completed']:,} completed, {b['failed']:,} failed</title>"
            f'<rect class="ok" x="{x:.1f}" y="{HEIGHT - done_h:.1f}" width="{max(step - 1, 1):.1f}" '
            f'height="{done_h:.1f}"/>'
            f'<rect class="bad" x="{x:.1f}" y="{HEIGHT - done_h - fail_h:.1f}" '
            f'width="{max(step - 1, 1):.1f}" height="{fail_h:.1f}"/></g>'
        )
    first = buckets[0]["at"].astimezone(UTC).strftime("%H:%M")
    last = buckets[-1]["at"].astimezone(UTC).strftime("%H:%M")
    parts.append(
        f'<text x="0" y="{HEIGHT + 12}" class="axis">{first}</text>'
        f'<text x="{WIDTH}" y="{HEIGHT + 12}" class="axis" text-anchor="end">{last} UTC · '
        f"peak {peak:,}</text></svg>"
    )
    return Markup("".join(parts))

"""The web demo's memory panel: the peak memory of the last encode beside stock SAM's, as Markdown.

The only place the panel is written; handlers pass it the `MemoryReport` of the last encode
(interactive.encode: of the image, or on a large image of the tile around a click).
"""

from __future__ import annotations

from typing import Optional

from sam_blocked.interactive.whole import MemoryReport, format_bytes
from sam_blocked.memory.measure import MIB

NOISE_BYTES = 8 * MIB  # differences of peak memory below this are not reported as savings


def format_memory(report: Optional[MemoryReport]) -> str:
    """The memory panel's Markdown."""
    if report is None:
        return "**Memory**: measured at the next encode (of an image, or on a large image of the tile around a click)."
    saved = report.stock_bytes - report.patched_bytes
    stock_how = "measured" if report.stock_measured else "**estimate** \\*"
    where = "the CUDA allocator's peak" if report.device.startswith("cuda") else "the process's resident high-water mark"
    if saved > NOISE_BYTES:
        verdict = f"Saved: **{format_bytes(saved)}** ({100 * saved / report.stock_bytes:.0f}% of stock)."
    else:
        verdict = (
            f"No clear saving at this size: the difference is within measurement noise ({format_bytes(NOISE_BYTES)}); "
            f"stock's encoder is planned at only {format_bytes(report.stock_planned_bytes)}. Raise the input size to see it."
        )
    return "\n".join(
        [
            f"**Peak memory of the last encode**: {report.img_size} px input on {report.device}, "
            f"over what was in use before ({where}). The patched encode took {report.seconds:.1f} s.",
            "",
            "| encoder | peak of the encode |",
            "|---|---|",
            f"| patched ({report.blocking}) | {format_bytes(report.patched_bytes)}, measured |",
            f"| stock | {format_bytes(report.stock_bytes)}, {stock_how} |",
            "",
            *([] if report.stock_measured else [f"\\* Estimated by the memory planner (`sam-blocked plan`): {report.reason}.", ""]),
            verdict,
            "",
            f"Planner's encoder figures (`sam-blocked plan`{'' if report.device.startswith('cuda') else '; on the CPU, upper bounds'}): "
            f"stock {format_bytes(report.stock_planned_bytes)}, patched {format_bytes(report.patched_planned_bytes)}.",
        ]
    )

"""A line chart as a PNG, drawn with PIL (no plotting library to install for one figure)."""

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from diffusion_lab.runs.atomic import write_file

WIDTH, HEIGHT, MARGIN = 640, 420, 64


def line_plot(
    path: str | Path,
    xs: list[float],
    ys: list[float],
    *,
    title: str,
    x_label: str,
    y_label: str,
    reference: tuple[str, float, float | None] | None = None,
    log_x: bool = True,
) -> Path:
    """ys against xs (points joined by a line, each labelled with its value), and optionally a `reference`
    (label, y, x or None): a dashed horizontal line at y, with a marker at x when given."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    all_y = [y for _, y in points] + ([reference[1]] if reference else [])
    all_x = [x for x, _ in points] + ([reference[2]] if reference and reference[2] else [])
    if not points:
        raise ValueError("nothing to plot")
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    x_low, x_high = fx(min(all_x)), fx(max(all_x))
    y_low, y_high = min(all_y), max(all_y)
    x_pad, y_pad = (x_high - x_low or 1) * 0.08, (y_high - y_low or abs(y_high) or 1) * 0.12
    x_low, x_high, y_low, y_high = x_low - x_pad, x_high + x_pad, y_low - y_pad, y_high + y_pad

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            MARGIN + (fx(x) - x_low) / (x_high - x_low) * (WIDTH - 2 * MARGIN),
            HEIGHT - MARGIN - (y - y_low) / (y_high - y_low) * (HEIGHT - 2 * MARGIN),
        )

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="black")
    draw.text((MARGIN, 20), title, fill="black", font=font)
    draw.text((WIDTH // 2 - 40, HEIGHT - 28), x_label, fill="black", font=font)
    draw.text((6, MARGIN - 18), y_label, fill="black", font=font)
    for x, _ in points:  # x ticks at the data
        px, _ = at(x, y_low)
        draw.line([px, HEIGHT - MARGIN, px, HEIGHT - MARGIN + 5], fill="black")
        draw.text((px - 12, HEIGHT - MARGIN + 8), f"{x:g}", fill="black", font=font)
    for fraction in (0.0, 0.5, 1.0):  # y ticks
        value = y_low + y_pad + fraction * (y_high - y_low - 2 * y_pad)
        _, py = at(min(all_x), value)
        draw.line([MARGIN - 5, py, MARGIN, py], fill="black")
        draw.text((4, py - 6), f"{value:.3g}", fill="black", font=font)
    if reference is not None:
        label, y, x = reference
        _, py = at(min(all_x), y)
        for start in range(MARGIN, WIDTH - MARGIN, 12):
            draw.line([start, py, min(start + 6, WIDTH - MARGIN), py], fill="gray", width=2)
        if x:
            px, _ = at(x, y)
            draw.rectangle([px - 5, py - 5, px + 5, py + 5], outline="red", width=2)
        draw.text((WIDTH - MARGIN - 230, MARGIN + 6), f"- - {label}: {y:.4g}", fill="red", font=font)
    pixels = [at(x, y) for x, y in points]
    if len(pixels) > 1:
        draw.line(pixels, fill="blue", width=2)
    for (px, py), (_, y) in zip(pixels, points, strict=True):
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill="blue")
        draw.text((px + 6, py - 14), f"{y:.4g}", fill="blue", font=font)
    return write_file(path, lambda staging: image.save(staging, format="PNG"))

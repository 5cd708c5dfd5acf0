"""Static HTML contact sheets: a table of image thumbnails to open from a file browser.

One page serves every "look at these images" output: the misclassified images of an
evaluation, suspected label mistakes, an active-learning review queue. The caller picks
the rows (already sorted, worst first) and the columns to show; this module writes

    out_dir/index.html       one self-contained page: inline CSS, no JavaScript, no URLs
    out_dir/thumbs/<n>.png   the thumbnail of row n (1-based, as numbered on the page)

Everything on the page is a *relative* link, so the folder can be moved or zipped with its
thumbnails. Each row's path also links to the original image, relative to ``out_dir``
(``os.path.relpath``): that keeps working when the whole results/data tree is moved, and
file-to-file links are followed when the page itself is opened from ``file://``.

Images are decoded with :func:`labelflow.images.load_image`, so a thumbnail shows what the
model saw (EXIF orientation applied, transparency on black, 16-bit scaled). A file that
cannot be read gets a placeholder cell that says why; it never stops the page.
"""

from __future__ import annotations

import html
import os
import stat
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from labelflow.images import load_image

THUMBS_DIR = "thumbs"
PAGE_NAME = "index.html"
_MAX_REASON_CHARS = 200  # a decoder's message can be long; the cell is narrow
_NUMERIC = ' class="num"'
_PIXELATED = ' class="pixelated"'


@dataclass(frozen=True)
class Thumbnail:
    """What the page needs to know about one row's thumbnail file."""

    width: int = 0
    height: int = 0
    problem: str | None = None  # why there is no thumbnail (the image is unreadable)


def write_contact_sheet(
    table: pd.DataFrame,
    *,
    image_root: Path | str | None,
    out_dir: Path | str,
    title: str,
    columns: Sequence[str],
    path_column: str = "path",
    thumbnail_size: int = 96,
    max_rows: int = 500,
    caption: str = "",
    workers: int | None = None,
) -> dict[str, int]:
    """Write ``out_dir/index.html`` and ``out_dir/thumbs/`` for the first ``max_rows`` rows.

    ``table[path_column]`` holds image paths, relative to ``image_root`` (or, with
    ``image_root=None``, absolute or relative to the working directory). ``columns`` are
    shown after the path, in this order; floats with 4 significant digits, missing values
    blank. Rows keep the table's order. ``caption`` is shown under the title as plain text,
    e.g. where the full CSV lives, which matters when rows were left out.

    Only writes into ``out_dir`` (created if needed). Atomicity is the caller's: pass a temp
    folder and rename it. Links to the originals are computed from ``out_dir``, so that temp
    folder must be a sibling of the final one (as :func:`labelflow.io.atomic_directory`
    makes) or the links break after the rename.

    Thumbnails are made ``workers`` at a time and written as they are made, so memory does
    not grow with the table. Returns ``{"rows": shown, "rows_total": len(table),
    "unreadable": rows shown with a placeholder instead of a thumbnail}``.
    """
    missing = [c for c in [path_column, *columns] if c not in table.columns]
    if missing:
        raise ValueError(f"contact sheet: table has no column(s) {missing}; it has {list(table.columns)}")
    if thumbnail_size < 1 or max_rows < 0:
        raise ValueError(
            f"contact sheet: need thumbnail_size >= 1 and max_rows >= 0, got {thumbnail_size}, {max_rows}"
        )
    out_dir = Path(out_dir)
    thumbs_dir = out_dir / THUMBS_DIR
    thumbs_dir.mkdir(parents=True, exist_ok=True)
    shown = table.iloc[:max_rows]
    workers = workers or min(4, os.cpu_count() or 1)
    unreadable = 0
    with (
        open(out_dir / PAGE_NAME, "w", encoding="utf-8", newline="\n") as page,
        ThreadPoolExecutor(workers) as pool,
    ):
        page.write(_page_start(title, caption, columns, len(shown), len(table), thumbnail_size))
        # Bounded chunks: pool.map submits a whole chunk at once, so a huge table never
        # turns into a million pending futures; results are written row by row.
        chunk_size = 16 * workers
        for start in range(0, len(shown), chunk_size):
            chunk = shown.iloc[start : start + chunk_size]
            paths = [str(p) for p in chunk[path_column]]
            sources = [_image_file(p, image_root) for p in paths]
            targets = [thumbs_dir / f"{start + i + 1}.png" for i in range(len(chunk))]
            thumbnails = pool.map(write_thumbnail, sources, targets, repeat(thumbnail_size))
            values = chunk[list(columns)].itertuples(index=False, name=None)
            rows = zip(paths, sources, thumbnails, values)
            for number, (path, source, thumbnail, row_values) in enumerate(rows, start=start + 1):
                unreadable += thumbnail.problem is not None
                link = _relative_link(source, out_dir)
                page.write(_row_html(number, path, link, thumbnail, row_values, thumbnail_size))
        page.write("</tbody>\n</table>\n</body>\n</html>\n")
    return {"rows": len(shown), "rows_total": len(table), "unreadable": unreadable}


def write_thumbnail(source: Path, target: Path, size: int) -> Thumbnail:
    """Save ``source`` as an RGB PNG fitting in ``size`` x ``size`` (aspect kept, never
    enlarged) at ``target``; for an unreadable image write nothing and say why.

    Only reading the image is forgiven: failing to write ``target`` (disk full) raises.
    """
    problem = _not_a_file(source)
    if problem is None:
        try:
            pixels = load_image(source)
        except UnidentifiedImageError:
            problem = "not an image (Pillow cannot identify it)"
        except Image.DecompressionBombError as err:
            problem = f"too large: {err}"
        except ValueError as err:  # DatasetError: a mode with no RGB (LAB, HSV)
            problem = f"unsupported or corrupt image: {err}"
        except OSError as err:
            problem = err.strerror or f"corrupt or truncated: {err}"
        except Exception as err:  # noqa: BLE001 - decoders raise many types on garbage
            problem = f"corrupt or truncated: {type(err).__name__}: {err}"
    if problem is not None:
        return Thumbnail(problem=problem[:_MAX_REASON_CHARS])
    image = Image.fromarray(pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    image.save(target, format="PNG")
    return Thumbnail(width=image.width, height=image.height)


def _not_a_file(source: Path) -> str | None:
    try:
        mode = os.stat(source).st_mode
    except OSError as err:
        return "missing file" if isinstance(err, FileNotFoundError) else err.strerror or str(err)
    # Opening a FIFO or a device could block forever; a folder is a common path mistake.
    return None if stat.S_ISREG(mode) else "not a regular file"


def _image_file(path: str, image_root: Path | str | None) -> Path:
    return Path(path) if image_root is None else Path(image_root) / path


def _relative_link(source: Path, out_dir: Path) -> str:
    """A URL (percent-encoded, so ``#``, ``?``, ``%`` and ``:`` in names are literal) to
    ``source`` from a page in ``out_dir``."""
    target = os.path.abspath(source)
    try:
        relative = os.path.relpath(target, os.path.abspath(out_dir))
    except ValueError:  # another drive on Windows: no relative path exists
        return Path(target).as_uri()
    return urllib.parse.quote(Path(relative).as_posix())


def format_value(value: Any) -> str:
    """A table value as page text: floats with 4 significant digits, missing as blank."""
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _row_html(
    number: int, path: str, link: str, thumbnail: Thumbnail, values: Sequence[Any], thumbnail_size: int
) -> str:
    esc = html.escape  # quote=True: values also land inside attributes
    href = esc(link)
    if thumbnail.problem is None:
        width, height, pixelated = _display_size(thumbnail, thumbnail_size)
        image_cell = (
            f'<a href="{href}"><img src="{THUMBS_DIR}/{number}.png" width="{width}" height="{height}"'
            f'{_PIXELATED if pixelated else ""} alt="{esc(path)}"></a>'
        )
    else:
        image_cell = f'<div class="unreadable">unreadable: {esc(thumbnail.problem)}</div>'
    cells = [
        f'<td class="num">{number}</td>',
        f'<td class="thumb">{image_cell}</td>',
        f'<td class="path"><a href="{href}">{esc(path)}</a></td>',
    ]
    cells += [f'<td{_NUMERIC if _is_number(v) else ""}>{esc(format_value(v))}</td>' for v in values]
    return "<tr>" + "".join(cells) + "</tr>\n"


def _display_size(thumbnail: Thumbnail, thumbnail_size: int) -> tuple[int, int, bool]:
    """Tiny images (8x8 digits) are shown enlarged by a whole factor with crisp pixels;
    the PNG itself stays at its real size."""
    factor = max(1, thumbnail_size // max(thumbnail.width, thumbnail.height))
    return thumbnail.width * factor, thumbnail.height * factor, factor > 1


def _page_start(
    title: str, caption: str, columns: Sequence[str], n_shown: int, n_total: int, thumbnail_size: int
) -> str:
    esc = html.escape
    if n_shown < n_total:
        count = f"Showing the first {n_shown} of {n_total} rows; {n_total - n_shown} more are not shown."
    else:
        count = f"{n_total} rows."
    headers = "".join(f"<th>{esc(str(c))}</th>" for c in ["#", "image", "path", *columns])
    caption_html = f'<p class="caption">{esc(caption)}</p>\n' if caption else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>\n{_css(thumbnail_size)}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{caption_html}"
        f'<p class="count">{esc(count)}</p>\n'
        f"<table>\n<thead><tr>{headers}</tr></thead>\n<tbody>\n"
    )


def _css(thumbnail_size: int) -> str:
    box = thumbnail_size + 8  # a fixed cell size, so rows line up whatever the image shape
    return f"""body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1em; color: #222; }}
h1 {{ font-size: 1.3em; margin: 0 0 .3em; }}
.caption {{ white-space: pre-wrap; margin: 0 0 .3em; }}
.count {{ color: #555; margin: 0 0 .8em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: middle; text-align: left; }}
th {{ background: #eee; position: sticky; top: 0; }}
tbody tr:nth-child(even) {{ background: #f8f8f8; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.thumb {{ width: {box}px; height: {box}px; text-align: center; padding: 2px; }}
td.thumb img {{ display: block; margin: auto; outline: 1px solid #ddd; }}
img.pixelated {{ image-rendering: pixelated; }}
td.path {{ max-width: 28em; word-break: break-all; }}
.unreadable {{ width: {thumbnail_size}px; font-size: 11px; color: #a00; word-break: break-word; margin: auto; }}
"""

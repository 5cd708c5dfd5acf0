"""Contact sheet: page content and order, escaping, placeholders, truncation, thumbnails,
and a headless-Chromium render of the written page from a file:// URL.

The browser test needs Debian's ``chromium`` package. Without it the test is skipped, unless
``LABELFLOW_REQUIRE_BROWSER=1`` (set in CI), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from labelflow.contact_sheet import format_value, write_contact_sheet

HOSTILE_NAME = "<b>&\"x'.png"
UNICODE_NAME = "café 日本 #1?%20.png"
COLUMNS = ["true", "predicted", "confidence"]


# --------------------------------------------------------------------------- helpers


@dataclass
class Cell:
    text: str = ""
    images: list[dict[str, str]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)


class SheetParser(HTMLParser):
    """The parts of a contact sheet the tests check: title, paragraphs, header, body rows,
    and every start tag (to prove hostile names did not become markup)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.title = ""
        self.paragraphs: dict[str, str] = {}
        self.header: list[str] = []
        self.rows: list[list[Cell]] = []
        self._in: str | None = None  # "title", "p:<class>", "th" or "td"
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attributes = {k: v or "" for k, v in attrs}
        if tag == "title":
            self._in = "title"
        elif tag == "p":
            self._in = "p:" + attributes.get("class", "")
            self.paragraphs[self._in] = ""
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "th":
            self._in = "th"
            self.header.append("")
        elif tag == "td":
            self._in = "td"
            self.rows[-1].append(Cell())
        elif tag == "img" and self._in == "td":
            self.rows[-1][-1].images.append(attributes)
        elif tag == "a" and self._in == "td":
            self.rows[-1][-1].links.append(attributes["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("title", "p", "th", "td"):
            self._in = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._in == "title":
            self.title += data
        elif self._in and self._in.startswith("p:"):
            self.paragraphs[self._in] += data
        elif self._in == "th":
            self.header[-1] += data
        elif self._in == "td":
            self.rows[-1][-1].text += data


def parse_sheet(out_dir: Path) -> SheetParser:
    parser = SheetParser()
    parser.feed((out_dir / "index.html").read_text(encoding="utf-8"))
    parser.close()
    return parser


def save_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int], **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[...] = colour
    pixels[: size[1] // 2, : size[0] // 3] = 255  # a white corner block shows orientation
    Image.fromarray(pixels).save(path, **save_args)
    return path


def make_review_table(root: Path) -> pd.DataFrame:
    """Five readable images of different shapes, in an order that is not file order."""
    save_image(root / "cats" / "a.png", (300, 150), (200, 40, 40))
    save_image(root / "dogs" / "b.png", (40, 200), (40, 160, 40))
    save_image(root / "dogs" / HOSTILE_NAME, (64, 64), (40, 60, 220))
    save_image(root / "cats" / UNICODE_NAME, (120, 90), (220, 200, 40))
    save_image(root / "birds" / "tiny.png", (8, 8), (200, 40, 200))
    return pd.DataFrame(
        {
            "path": ["dogs/b.png", f"dogs/{HOSTILE_NAME}", "cats/a.png", f"cats/{UNICODE_NAME}", "birds/tiny.png"],
            "true": ["dog", "dog", "cat", "cat", "bird"],
            "predicted": ["cat", "<i>cat</i> & co", "dog", "dög", "cat"],
            "confidence": [0.987654321, 0.5, np.float32(0.123456), 1.0, np.nan],
        }
    )


def expected_cells(table: pd.DataFrame) -> list[list[str]]:
    """Text of the #, path and data cells of each row, as the page should show them."""
    return [
        [str(i + 1), row.path, *(format_value(getattr(row, c)) for c in COLUMNS)]
        for i, row in enumerate(table.itertuples(index=False))
    ]


def link_target(out_dir: Path, href: str) -> str:
    """The file a relative href from the page in ``out_dir`` points at."""
    assert not urllib.parse.urlsplit(href).scheme, f"expected a relative link, got {href!r}"
    return os.path.normpath(os.path.join(os.path.abspath(out_dir), urllib.parse.unquote(href)))


# --------------------------------------------------------------------------- unit tests


def test_rows_follow_table_order_and_show_columns(tmp_path: Path) -> None:
    root = tmp_path / "images"
    table = make_review_table(root)
    out_dir = tmp_path / "sheet"

    result = write_contact_sheet(
        table, image_root=root, out_dir=out_dir, title="Misclassified", columns=COLUMNS, caption="Full table: x.csv"
    )

    assert result == {"rows": 5, "rows_total": 5, "unreadable": 0}
    sheet = parse_sheet(out_dir)
    assert sheet.title == "Misclassified"
    assert sheet.header == ["#", "image", "path", *COLUMNS]
    assert [[r[0].text, *(c.text for c in r[2:])] for r in sheet.rows] == expected_cells(table)
    assert [r[5].text for r in sheet.rows[:3]] == ["0.9877", "0.5", "0.1235"]  # 4 significant digits
    assert sheet.rows[4][5].text == ""  # NaN shows blank
    for number, (row, path) in enumerate(zip(sheet.rows, table["path"]), start=1):
        assert [image["src"] for image in row[1].images] == [f"thumbs/{number}.png"]
        assert (out_dir / "thumbs" / f"{number}.png").is_file()
        # thumbnail and path both link to the original, relative to the page
        assert [link_target(out_dir, href) for href in row[1].links + row[2].links] == [str(root / path)] * 2
    page = (out_dir / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page and "http:" not in page and "https:" not in page
    assert "Full table: x.csv" in sheet.paragraphs["p:caption"]


def test_hostile_and_unicode_names_are_escaped(tmp_path: Path) -> None:
    root = tmp_path / "images"
    table = make_review_table(root)
    out_dir = tmp_path / "sheet"

    write_contact_sheet(
        table, image_root=root, out_dir=out_dir, title="<script>alert(1)</script> & co", columns=COLUMNS
    )

    sheet = parse_sheet(out_dir)
    # no value turned into markup: only the page's own tags were parsed
    assert not {"b", "i", "script"} & set(sheet.tags)
    assert sheet.title == "<script>alert(1)</script> & co"
    hostile_row, unicode_row = sheet.rows[1], sheet.rows[3]
    assert hostile_row[2].text == f"dogs/{HOSTILE_NAME}"
    assert hostile_row[4].text == "<i>cat</i> & co"
    assert hostile_row[1].images[0]["alt"] == f"dogs/{HOSTILE_NAME}"
    assert unicode_row[2].text == f"cats/{UNICODE_NAME}" and unicode_row[4].text == "dög"
    # '#', '?' and '%' in a name are percent-encoded, so the link still names the file
    assert link_target(out_dir, unicode_row[2].links[0]) == str(root / "cats" / UNICODE_NAME)
    assert link_target(out_dir, hostile_row[2].links[0]) == str(root / "dogs" / HOSTILE_NAME)


def test_unreadable_images_get_a_placeholder(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save_image(root / "good.png", (20, 20), (10, 200, 10))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (root / "notes.txt").write_text("not an image")
    (root / "folder.png").mkdir()
    paths = ["corrupt.png", "good.png", "missing.png", "notes.txt", "folder.png"]
    table = pd.DataFrame({"path": paths, "score": [1, 2, 3, 4, 5]})
    out_dir = tmp_path / "sheet"

    result = write_contact_sheet(table, image_root=root, out_dir=out_dir, title="t", columns=["score"])

    assert result == {"rows": 5, "rows_total": 5, "unreadable": 4}
    sheet = parse_sheet(out_dir)
    reasons = [row[1].text for row in sheet.rows]
    assert reasons[1] == "" and sheet.rows[1][1].images  # the good one has its thumbnail
    assert all(reason.startswith("unreadable: ") for i, reason in enumerate(reasons) if i != 1)
    assert "missing file" in reasons[2]
    assert "not an image" in reasons[3] and "not a regular file" in reasons[4]
    assert sorted(p.name for p in (out_dir / "thumbs").iterdir()) == ["2.png"]
    assert [row[2].text for row in sheet.rows] == list(table["path"])  # the row is still shown


def test_max_rows_truncates_and_says_so(tmp_path: Path) -> None:
    root = tmp_path / "images"
    paths = [save_image(root / f"{i}.png", (10, 10), (i * 30, 0, 0)).name for i in range(7)]
    table = pd.DataFrame({"path": paths[::-1], "score": np.linspace(1, 0, 7)})
    out_dir = tmp_path / "sheet"

    result = write_contact_sheet(
        table, image_root=root, out_dir=out_dir, title="queue", columns=["score"], max_rows=3,
        caption="Full table: results/exp/review.csv",
    )

    assert result == {"rows": 3, "rows_total": 7, "unreadable": 0}
    sheet = parse_sheet(out_dir)
    assert [row[2].text for row in sheet.rows] == ["6.png", "5.png", "4.png"]
    assert "first 3 of 7 rows; 4 more are not shown" in sheet.paragraphs["p:count"]
    assert sheet.paragraphs["p:caption"] == "Full table: results/exp/review.csv"
    assert len(list((out_dir / "thumbs").iterdir())) == 3


def test_thumbnails_are_small_rgb_pngs_with_exif_applied(tmp_path: Path) -> None:
    root = tmp_path / "images"
    save_image(root / "wide.png", (400, 100), (200, 0, 0))
    save_image(root / "tall.bmp", (50, 300), (0, 200, 0))
    save_image(root / "small.png", (10, 6), (0, 0, 200))
    Image.new("LA", (120, 120), (128, 200)).save(root / "gray_alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, show it rotated 90 degrees
    save_image(root / "rotated.jpg", (200, 100), (200, 200, 0), exif=exif)
    table = pd.DataFrame({"path": ["wide.png", "tall.bmp", "small.png", "gray_alpha.png", "rotated.jpg"]})
    out_dir = tmp_path / "sheet"

    write_contact_sheet(table, image_root=root, out_dir=out_dir, title="t", columns=[], thumbnail_size=64)

    sizes = []
    for number in range(1, 6):
        with Image.open(out_dir / "thumbs" / f"{number}.png") as thumb:
            assert thumb.format == "PNG" and thumb.mode == "RGB"
            assert max(thumb.size) <= 64
            sizes.append(thumb.size)
    assert sizes == [(64, 16), (11, 64), (10, 6), (64, 64), (32, 64)]  # aspect kept, not enlarged
    sheet = parse_sheet(out_dir)
    small = sheet.rows[2][1].images[0]  # shown enlarged by a whole factor, crisp
    assert (small["width"], small["height"], small["class"]) == ("60", "36", "pixelated")


def test_empty_table_and_bad_columns(tmp_path: Path) -> None:
    empty = pd.DataFrame({"path": [], "score": []})
    result = write_contact_sheet(empty, image_root=None, out_dir=tmp_path / "e", title="t", columns=["score"])
    assert result == {"rows": 0, "rows_total": 0, "unreadable": 0}
    assert parse_sheet(tmp_path / "e").rows == []
    with pytest.raises(ValueError, match="no column"):
        write_contact_sheet(empty, image_root=None, out_dir=tmp_path / "f", title="t", columns=["nope"])


# --------------------------------------------------------------------------- browser test

# Appended to a test copy of the page (the real page has no script): once every image has
# loaded or failed (the load event), record what the browser shows into the DOM, which
# --dump-dom then prints.
_PROBE = """<script>
window.addEventListener("load", () => {
  const rows = [...document.querySelectorAll("tbody tr")].map(tr => ({
    cells: [...tr.cells].map(td => td.textContent),
    images: [...tr.querySelectorAll("img")].map(img => ({complete: img.complete, naturalWidth: img.naturalWidth})),
    links: [...tr.querySelectorAll("a")].map(a => a.href),
  }));
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({title: document.title, rows: rows});
  document.body.appendChild(probe);
});
</script>
"""


def find_chromium() -> str:
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    if os.access(binary, os.X_OK):
        return binary
    reason = "chromium not installed: apt-get install chromium"
    if os.environ.get("LABELFLOW_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (LABELFLOW_REQUIRE_BROWSER=1 requires the browser test to run)")
    pytest.skip(reason)


def run_chromium(binary: str, profile: Path, *args: str) -> str:
    """Headless Chromium with its own throwaway profile (parallel runs would share a lock)."""
    command = [
        binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


class ProbeParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "pre" and ("id", "probe") in attrs:
            self.text = ""

    def handle_data(self, data: str) -> None:
        if self.text is not None:
            self.text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre" and self.text is not None and not hasattr(self, "result"):
            self.result = json.loads(self.text)


def test_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = find_chromium()
    root = tmp_path / "images"
    table = make_review_table(root)
    (root / "broken.png").write_bytes(b"not a png")
    table.loc[len(table)] = ["broken.png", "cat", "cat", 0.25]
    out_dir = tmp_path / "sheet"
    write_contact_sheet(table, image_root=root, out_dir=out_dir, title="Browser check", columns=COLUMNS)
    probe_page = out_dir / "probe.html"  # beside index.html, so its relative links hold
    page = (out_dir / "index.html").read_text(encoding="utf-8")
    probe_page.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")

    started = time.monotonic()
    dom = run_chromium(
        chromium, tmp_path / "profile-dom", "--virtual-time-budget=5000", "--dump-dom", probe_page.as_uri()
    )
    screenshot = tmp_path / "sheet.png"
    run_chromium(
        chromium, tmp_path / "profile-shot", "--hide-scrollbars", "--window-size=1000,760",
        f"--screenshot={screenshot}", (out_dir / "index.html").as_uri(),
    )
    elapsed = time.monotonic() - started

    parser = ProbeParser()
    parser.feed(dom)
    assert hasattr(parser, "result"), f"the probe did not run; DOM dump starts: {dom[:500]!r}"
    shown = parser.result
    assert shown["title"] == "Browser check"
    rows = shown["rows"]
    assert [[r["cells"][0], *r["cells"][2:]] for r in rows] == expected_cells(table)
    # (a) every thumbnail the page references actually loaded; the broken image has none
    assert [len(r["images"]) for r in rows] == [1, 1, 1, 1, 1, 0]
    assert all(img["complete"] and img["naturalWidth"] > 0 for r in rows for img in r["images"])
    assert rows[5]["cells"][1].startswith("unreadable: ")
    # the path links resolve, in the browser, to the original files
    for row, path in zip(rows, table["path"]):
        assert {urllib.parse.unquote(href) for href in row["links"]} == {"file://" + str(root / path)}
    with Image.open(screenshot) as shot:
        assert shot.size == (1000, 760)
        assert len(shot.convert("RGB").getcolors(maxcolors=1_000_000)) > 50  # not a blank page
    assert elapsed < 30, f"two headless Chromium runs took {elapsed:.1f} s"

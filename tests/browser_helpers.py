"""Label Studio's editor in Debian's Chromium, driven by playwright: log in as a user, open a task,
read what the page shows (the Regions panel, the pixels drawn over the image), save screenshots."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "browser"
USER = ("admin@example.com", "not-a-real-password-42")  # LabelStudioServer's admin (tests/helpers.py)
# Every page of Label Studio 1.23.2 asks for two static files it does not ship: its 404s, not usam's.
KNOWN_404 = "Failed to load resource: the server responded with a status of 404"

# The alpha of the Konva layers over the image, as one array at the stage's size, and where the image
# lies on the stage (the editor draws it on a canvas of its own, outside Konva, and it may overflow the
# stage). The first Konva layer is opaque everywhere; what the others draw is what the regions put there.
_DRAWN_ALPHA = """
() => {
  const stage = document.querySelector('.konvajs-content');
  if (!stage) return null;
  const canvases = [...stage.querySelectorAll('canvas')].filter(c => c.width > 0 && c.height > 0);
  const w = canvases[0].width, h = canvases[0].height;
  const first = canvases[0].getContext('2d').getImageData(0, 0, w, h).data;
  let opaque = 0;
  for (let i = 3; i < first.length; i += 4) opaque += first[i] === 255;
  const alpha = new Uint8Array(w * h);
  for (const c of canvases.slice(1)) {
    if (c.width !== w || c.height !== h || getComputedStyle(c).display === 'none') continue;
    const data = c.getContext('2d').getImageData(0, 0, w, h).data;
    for (let i = 0; i < w * h; i++) alpha[i] = Math.max(alpha[i], data[4 * i + 3]);
  }
  const image = [...document.querySelectorAll('canvas')].find(c => !c.closest('.konvajs-content'));
  const at = stage.getBoundingClientRect(), box = image.getBoundingClientRect();
  const scale = w / at.width;  // canvas pixels per CSS pixel
  const place = [(box.left - at.left) * scale, (box.top - at.top) * scale, box.width * scale, box.height * scale];
  return {w, h, place, opaque: opaque / (w * h), alpha: Array.from(alpha)};
}
"""


# A video task's player: the frame on the canvas outside Konva (where the player draws it, its opaque
# pixels) and the alpha of the Konva layers over the same pixels (the regions drawn on that frame).
_VIDEO_SHOWN = """
() => {
  const stage = document.querySelector('.konvajs-content');
  const player = [...document.querySelectorAll('canvas')].find(c => !c.closest('.konvajs-content'));
  const video = document.querySelector('video');
  if (!stage || !player || !video || !video.videoWidth) return null;
  const w = player.width, h = player.height;
  const rgba = player.getContext('2d').getImageData(0, 0, w, h).data;
  let x0 = w, y0 = h, x1 = 0, y1 = 0;
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    if (rgba[4 * (y * w + x) + 3] !== 255) continue;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + 1); y1 = Math.max(y1, y + 1);
  }
  if (x1 <= x0) return null;
  const layers = [...stage.querySelectorAll('canvas')].filter(c => getComputedStyle(c).display !== 'none')
    .map(c => c.getContext('2d').getImageData(x0, y0, x1 - x0, y1 - y0).data);
  const fw = x1 - x0, fh = y1 - y0, rgb = new Uint8Array(3 * fw * fh), alpha = new Uint8Array(fw * fh);
  for (let y = 0; y < fh; y++) for (let x = 0; x < fw; x++) {
    const i = y * fw + x, j = 4 * ((y + y0) * w + x + x0);
    rgb.set(rgba.subarray(j, j + 3), 3 * i);
    for (const layer of layers) alpha[i] = Math.max(alpha[i], layer[4 * i + 3]);
  }
  const at = player.getBoundingClientRect(), over = stage.getBoundingClientRect();
  const aligned = Math.abs(at.left - over.left) < 1 && Math.abs(at.top - over.top) < 1
    && w === stage.querySelector('canvas').width;
  return {size: [fw, fh], video: [video.videoWidth, video.videoHeight], aligned,
          rgb: Array.from(rgb), alpha: Array.from(alpha)};
}
"""


@dataclass(frozen=True)
class Shown:
    """A video frame as the player shows it, brought to the video's own size (``video.videoWidth``
    by ``videoHeight``: the display rotation applied): ``frame`` the 1-based number the frame counter
    reads, ``rgb`` its pixels, ``drawn`` where the regions are drawn over it."""

    frame: int
    rgb: np.ndarray
    drawn: np.ndarray


@dataclass(frozen=True)
class Drawn:
    """What the regions draw over an image, at the image's size: ``mask`` where they draw, ``seen``
    where the stage shows the image at all (the editor's fitted view may crop a few pixels)."""

    mask: np.ndarray
    seen: np.ndarray


@dataclass
class Editor:
    """One page of Label Studio, reused by every browser test of the session."""

    page: Any  # playwright.sync_api.Page
    url: str
    folder: Path
    console: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)  # responses of 400 and above: status, URL
    shots: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page.on("console", lambda message: self.console.append((message.type, message.text)))
        self.page.on("response", lambda r: r.status >= 400 and self.failed.append((r.status, r.url)))

    def login(self) -> None:
        self.page.goto(f"{self.url}/user/login/")
        self.page.fill("input[name=email]", USER[0])
        self.page.fill("input[name=password]", USER[1])
        self.page.click("button[type=submit]")
        self.page.wait_for_load_state("networkidle", timeout=60_000)
        assert "/user/login" not in self.page.url, f"the login was refused: {self.page.url}"

    def open_task(self, project: int, task: int) -> None:
        """The task in the editor, with its image loaded (or Label Studio's message that it was not)."""
        self.console.clear()
        self.failed.clear()
        self.page.goto(f"{self.url}/projects/{project}/data?task={task}")
        self.page.wait_for_selector(".lsf-main-view, .lsf-editor", timeout=90_000)
        self.page.wait_for_load_state("networkidle", timeout=90_000)

    def shot(self, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{len(self.shots):02d}-{name}.png"
        self.page.screenshot(path=str(path))
        self.shots.append(path)
        return path

    def region_labels(self, count: int, timeout: float = 60) -> list[str]:
        """The labels listed in the Regions panel, once it lists ``count`` regions."""
        items = self.page.locator(".lsf-outliner-item .lsf-outliner-item__title")
        deadline = time.monotonic() + timeout
        while items.count() != count and time.monotonic() < deadline:
            self.page.wait_for_timeout(250)
        return [text.strip() for text in items.all_inner_texts()]

    def drawn(self, height: int, width: int, level: int = 128) -> Drawn:
        """Where the regions are drawn over the image: a boolean mask at the image's own size, sampled at
        pixel's centre where the layers' alpha is at least ``level`` (half by default: the editor smooths
        a mask's edges as it scales it; shapes are filled faintly, so 1 finds them)."""
        result = self.page.evaluate(_DRAWN_ALPHA)
        assert result is not None, "no Konva stage on the page"
        w, h = result["w"], result["h"]
        assert result["opaque"] > 0.99, "the first layer of the stage is not opaque"
        left, top, shown_w, shown_h = result["place"]
        assert abs(shown_w / shown_h - width / height) < 0.02, f"the image shows as {shown_w:.0f}x{shown_h:.0f}"
        alpha = np.asarray(result["alpha"], dtype=np.uint8).reshape(h, w)
        rows = np.floor(top + (np.arange(height) + 0.5) * shown_h / height).astype(int)
        cols = np.floor(left + (np.arange(width) + 0.5) * shown_w / width).astype(int)
        seen = (rows[:, None] >= 0) & (rows[:, None] < h) & (cols[None, :] >= 0) & (cols[None, :] < w)
        drawn = alpha[np.ix_(rows.clip(0, h - 1), cols.clip(0, w - 1))] >= level
        return Drawn(np.asarray(drawn & seen), np.asarray(seen))

    def drawn_settled(self, height: int, width: int, timeout: float = 5.0) -> Drawn:
        """:meth:`drawn` once two readings 0.2 s apart agree: the pager's number changes before the
        editor has redrawn the new item's regions."""
        last = self.drawn(height, width)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.page.wait_for_timeout(200)
            now = self.drawn(height, width)
            if np.array_equal(now.mask, last.mask) and np.array_equal(now.seen, last.seen):
                return now
            last = now
        return last

    def frame_number(self) -> int:
        """The frame the video player's counter reads (``12 of 24`` -> 12)."""
        text = self.page.locator(".lsf-frames-control").inner_text()
        return int(text.split()[0])

    def step_forward(self) -> int:
        """The player's *Step forward* button (it steps by the player's step setting); the new frame."""
        before = self.frame_number()
        self.page.locator("[aria-label='Step forward']").click()
        self.page.wait_for_function(
            f"() => parseInt(document.querySelector('.lsf-frames-control').innerText) !== {before}"
        )
        return self.frame_number()

    def go_to_frame(self, frame: int) -> None:
        """The player's frame counter: clicked, it takes a frame number."""
        self.page.locator(".lsf-frames-control").click()
        field = self.page.locator(".lsf-frames-control input")
        field.fill(str(frame))
        field.press("Enter")
        self.page.wait_for_function(
            f"() => parseInt(document.querySelector('.lsf-frames-control').innerText) === {frame}"
        )

    def shown_frame(self) -> Shown:
        """The video frame on the screen now and the regions drawn over it (see :class:`Shown`)."""
        self.page.wait_for_timeout(300)  # the player draws the frame it sought on its next animation frame
        frame = self.frame_number()
        result = self.page.evaluate(_VIDEO_SHOWN)
        assert result is not None, "no video frame on the player's canvas"
        assert result["aligned"], "the regions' stage does not lie over the player's canvas"
        (fw, fh), (width, height) = result["size"], result["video"]
        assert abs(fw / fh - width / height) < 0.02, f"a {width}x{height} video shows as {fw}x{fh}"
        rows = np.floor((np.arange(height) + 0.5) * fh / height).astype(int)
        cols = np.floor((np.arange(width) + 0.5) * fw / width).astype(int)
        rgb = np.asarray(result["rgb"], dtype=np.uint8).reshape(fh, fw, 3)[np.ix_(rows, cols)]
        alpha = np.asarray(result["alpha"], dtype=np.uint8).reshape(fh, fw)[np.ix_(rows, cols)]
        return Shown(frame, rgb, np.asarray(alpha > 0))

    def item_number(self) -> int:
        """The item of a multi-image task on the screen (its pager reads ``2 of 6`` -> 2)."""
        return int(self.page.locator(".lsf-pagination__page-indicator").inner_text().split()[0])

    def next_item(self) -> int:
        """The pager's *Next Image* button; the new item's number."""
        before = self.item_number()
        self.page.locator(".lsf-pagination__btn_arrow-right:not(.lsf-pagination__btn_arrow-right-double)").click()
        self.page.wait_for_function(
            f"() => parseInt(document.querySelector('.lsf-pagination__page-indicator').innerText) !== {before}"
        )
        self.page.wait_for_load_state("networkidle")
        return self.item_number()

    def screen_point(self, x: float, y: float, height: int, width: int) -> tuple[float, float]:
        """Where the image's pixel (x, y) lies on the screen (the image's canvas sits outside Konva)."""
        box = self.page.evaluate(
            "() => { const c = [...document.querySelectorAll('canvas')].find(c => !c.closest('.konvajs-content'));"
            " const r = c.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; }"
        )
        return box[0] + (x + 0.5) * box[2] / width, box[1] + (y + 0.5) * box[3] / height

    def auto_annotation(self) -> None:
        """Auto-Annotation on (its switch stays as the last task left it)."""
        if not self.page.evaluate("() => Boolean(window.Htx && window.Htx.autoAnnotation)"):
            self.page.get_by_text("Auto-Annotation", exact=True).click()
        self.page.wait_for_function("() => window.Htx.autoAnnotation === true")

    def smart_tool(self, name: str) -> None:
        """A smart tool (``key-point-tool``, ``rectangle-tool``, ...) from the toolbar's smart group."""
        self.page.locator(".lsf-tool_smart:visible").first.hover()
        self.page.locator(f".lsf-tool_smart[aria-label={name}]").click()

    def errors(self) -> list[str]:
        """Console errors since the task was opened, less Label Studio's own static 404s."""
        return [text for kind, text in self.console if kind == "error" and KNOWN_404 not in text]

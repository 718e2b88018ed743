"""The annotation page in a real headless Chromium (Playwright): open an image, click, see the mask overlay,
cycle candidates, add a background point and a box, accept with Enter, and find the record on disk.

Needs the Debian `chromium` package (`apt-get install -y chromium`; `playwright install` needs a download);
without it the test is skipped with that reason. `SAMLIGHT_DOCS_SCREENSHOT=1` also writes the page's
screenshot to docs/img/annotate.png (`SAMLIGHT_DOCS_CHECKPOINT=FILE` serves those weights instead of random ones).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests._annotate import session
from tests._shards import read_shards

CHROMIUM = os.environ.get("SAMLIGHT_CHROMIUM", "/usr/bin/chromium")
DOCS_IMAGE = Path(__file__).resolve().parents[1] / "docs" / "img" / "annotate.png"

pytest.importorskip("flask")

pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set SAMLIGHT_CHROMIUM)",
    ),
]


def _scene(folder: Path) -> None:
    """Two small scenes of coloured shapes (what a person would click on) and their "automatic" masks."""
    folder.mkdir(parents=True)
    for i in range(2):
        image = Image.new("RGB", (320, 224), (40 + 20 * i, 60, 80))
        draw = ImageDraw.Draw(image)
        draw.ellipse((30, 40, 130, 140), fill=(230, 180, 40))
        draw.rectangle((170, 60, 290, 180), fill=(60, 170, 220))
        draw.polygon([(150, 200), (200, 140), (250, 200)], fill=(200, 70, 90))
        image.save(folder / f"scene{i}.png")


def _auto_shard(tmp_path: Path) -> Path:
    from samlight.datamodules.tools.shards import SA1BShardWriter, annotations_from_masks

    masks = np.zeros((2, 224, 320), bool)
    yy, xx = np.mgrid[:224, :320]
    masks[0] = (xx - 80) ** 2 + (yy - 90) ** 2 <= 50**2
    masks[1, 60:181, 170:291] = True
    anns = [dict(a, source="auto") for a in annotations_from_masks(masks)]
    with SA1BShardWriter(tmp_path / "auto", prefix="auto") as writer:
        writer.write(
            "sa_1",
            np.zeros((224, 320, 3), np.uint8),
            annotations=anns,
            image_info={"source_file": "scene0.png"},
        )
    return tmp_path / "auto" / "auto-000000.tar"


@pytest.fixture
def live(tmp_path):
    from werkzeug.serving import make_server

    _scene(tmp_path / "images")
    if os.environ.get("SAMLIGHT_DOCS_CHECKPOINT"):  # a trained tiny model makes a more telling screenshot
        shutil.copyfile(os.environ["SAMLIGHT_DOCS_CHECKPOINT"], tmp_path / "tiny.pth")
    engine, store, retrainer, _ = session(tmp_path, "--existing", str(_auto_shard(tmp_path)))
    from samlight.inference.annotate.server import create_app

    server = make_server("127.0.0.1", 0, create_app(engine, store, retrainer), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", engine, store
    server.shutdown()
    engine.close()


def _overlay_pixels(page, canvas: str) -> int:
    """Pixels with non-zero alpha on one of the page's canvases."""
    return page.evaluate(
        """(id) => { const c = document.getElementById(id);
                     const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                     let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""",
        canvas,
    )


def test_click_shows_mask_and_enter_saves_the_record(live, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    url, engine, store = live
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        # The page's CSP forbids eval (right for the page); Playwright's string predicates need it.
        page = browser.new_page(viewport={"width": 1100, "height": 640}, bypass_csp=True)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert page.inner_text("#image-name") == "scene0.png"
        assert page.locator("#masks li").count() == 2  # the automatic masks, listed
        assert _overlay_pixels(page, "saved-layer") > 0
        assert "Enter" in page.inner_text(".keys")

        box = page.locator("#prompt-layer").bounding_box()
        scale = box["width"] / 320

        def at(x: float, y: float) -> tuple[float, float]:
            return box["x"] + x * scale, box["y"] + y * scale

        page.mouse.click(*at(230, 120))  # left click: a foreground point on the blue square
        page.wait_for_function("document.body.dataset.prediction !== ''", timeout=30_000)
        shown = int(page.evaluate("document.body.dataset.maskPixels"))
        state = page.evaluate(
            "({points: samlight.points, candidate: samlight.candidate, "
            "prediction: samlight.response.prediction, n: samlight.response.masks.length})"
        )
        prediction = engine.get_prediction(state["prediction"])
        assert state["n"] == 3 and state["points"] == [
            [pytest.approx(230, abs=0.5), pytest.approx(120, abs=0.5), 1]
        ]
        assert shown == int(prediction.masks[state["candidate"]].sum())
        assert _overlay_pixels(page, "mask-layer") == shown  # the candidate is drawn, pixel for pixel

        # Tab cycles the three candidates of a single click.
        page.keyboard.press("Tab")
        assert page.evaluate("samlight.candidate") == (state["candidate"] + 1) % 3
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        assert page.evaluate("samlight.candidate") == state["candidate"]

        # Right click adds a background point; the answer is one mask from both points.
        page.mouse.click(*at(20, 20), button="right")
        page.wait_for_function(f"samlight.response && samlight.response.prediction !== {state['prediction']}")
        assert [pt[2] for pt in page.evaluate("samlight.points")] == [1, 0]
        assert page.evaluate("samlight.response.masks.length") == 1
        page.keyboard.press("z")  # undo: back to the single click and its candidates
        assert page.evaluate("samlight.points.length") == 1
        assert page.evaluate("samlight.response.prediction") == state["prediction"]

        # Enter saves the shown mask at once: it is in the shard on disk.
        page.keyboard.press("Enter")
        page.wait_for_selector("body[data-saved='3']", timeout=30_000)
        shot = tmp_path / "annotate.png"
        # A drag is a box prompt; the screenshot shows it with the saved masks.
        page.mouse.move(*at(25, 35))
        page.mouse.down()
        page.mouse.move(*at(90, 90), steps=4)
        page.mouse.move(*at(135, 145), steps=4)
        page.mouse.up()
        page.wait_for_function(
            "samlight.box !== null && samlight.response && samlight.response.masks.length === 1"
        )
        assert len(page.evaluate("samlight.box")) == 4
        page.screenshot(path=str(shot))
        browser.close()
    assert not errors, errors
    records = read_shards(tmp_path / "out" / "shards")
    anns = records[store.folder.get("scene0.png").key]["json"]["annotations"]
    assert [(a["id"], a["source"]) for a in anns] == [(0, "auto"), (1, "auto"), (2, "human")]
    assert anns[2]["point_coords"] == [[pytest.approx(230, abs=0.5), pytest.approx(120, abs=0.5)]]
    np.testing.assert_array_equal(
        records[store.folder.get("scene0.png").key]["masks"][2], prediction.masks[state["candidate"]]
    )
    assert Image.open(shot).size == (1100, 640)
    if os.environ.get("SAMLIGHT_DOCS_SCREENSHOT"):
        DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMAGE)

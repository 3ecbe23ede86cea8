"""The annotation page in a real headless browser (Debian chromium driven by playwright)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sam_train.data.coco import CocoDataset
from sam_train.data.image_io import encode_image
from sam_train.data.rle import decode_segmentation
from sam_train.data.toy_shapes import make_toy_shapes
from sam_train.engine.annotate import AnnotationServer, AnnotationSession, uncompressed_rle
from sam_train.inference.predictor import SamPredictor
from sam_train.models import build_sam

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# JS: which image pixels differ on the canvas from a snapshot (sampled at pixel centres)
CHANGED_PIXELS = """() => {
  const snap = window.__snapshot;
  const c = document.getElementById('canvas'), s = annot.scale, w = annot.image.width, h = annot.image.height;
  const now = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const out = [];
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const i = 4 * (Math.floor((y + 0.5) * s) * c.width + Math.floor((x + 0.5) * s));
    out.push(now[i] !== snap[i] || now[i + 1] !== snap[i + 1] || now[i + 2] !== snap[i + 2] ? 1 : 0);
  }
  return out;
}"""
SNAPSHOT = """() => { const c = document.getElementById('canvas');
  window.__snapshot = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; }"""


def test_uncompressed_rle_roundtrip_matches_pycocotools(gen):
    masks = torch.rand(5, 7, 9, generator=gen) > 0.5
    masks[0] = True  # starts with foreground: a leading zero-length background run
    masks[1] = False
    for m in masks.numpy():
        counts = uncompressed_rle(m)
        assert sum(counts) == m.size
        assert np.array_equal(decode_segmentation({"size": list(m.shape), "counts": counts}, *m.shape, "page"), m)
        # the same runs as pycocotools' own encoder, decompressed
        ref = mask_utils.frPyObjects({"size": list(m.shape), "counts": counts}, *m.shape)
        assert ref["counts"] == mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"]


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for s in make_toy_shapes(3, 64, torch.Generator().manual_seed(0)):
        (folder / f"{s['id']}.png").write_bytes(encode_image(s["image"]))
    return folder


def _launch(p):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: the annotation page test needs Debian's chromium "
                    "(apt-get update && apt-get install -y chromium; playwright drives it, no `playwright install`)")
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def test_annotation_page_click_accept_save(image_dir: Path, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    torch.manual_seed(0)
    model = build_sam("vit_t").eval()  # random weights: the page's mechanics, not mask quality
    out_json = tmp_path / "labels.json"
    server = AnnotationServer(AnnotationSession(model, image_dir, out_json)).start()
    try:
        with sync_playwright() as p:
            browser = _launch(p)
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url)
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
            page.wait_for_selector("#canvas[data-embedded=true]", timeout=30_000)
            scale = page.evaluate("annot.scale")
            rect = page.locator("#canvas").bounding_box()

            def click(x: int, y: int, n_before: int, **kw) -> None:
                page.mouse.click(rect["x"] + (x + 0.5) * scale, rect["y"] + (y + 0.5) * scale, **kw)
                page.wait_for_function(f"annot.latencies.length > {n_before}", timeout=30_000)

            # click-to-mask latency over several single clicks (each undone again with 'z')
            for x, y in [(10, 10), (50, 20), (20, 50), (40, 40), (30, 12)]:
                click(x, y, len(page.evaluate("annot.latencies")))
                assert int(page.get_attribute("#canvas", "data-mask-area")) > 0
                page.keyboard.press("z")  # undo the click: no prompt, no mask
                page.wait_for_function("document.getElementById('canvas').dataset.maskArea === '0'")
            latencies = page.evaluate("annot.latencies")

            # the mask the page draws is the model's: same as SamPredictor on the same click
            page.evaluate(SNAPSHOT)
            click(32, 32, len(latencies))
            assert page.evaluate("annot.points") == [[32, 32]] and page.evaluate("annot.labels") == [1]
            shown_rle = page.evaluate("annot.mask.rle")
            shown = decode_segmentation(shown_rle, *shown_rle["size"], "page")
            assert shown.sum() == int(page.get_attribute("#canvas", "data-mask-area")) > 0
            changed = np.array(page.evaluate(CHANGED_PIXELS), dtype=bool).reshape(64, 64)
            changed[31:34, 31:34] = shown[31:34, 31:34]  # the point marker is drawn there too
            assert np.array_equal(changed, shown), "canvas overlay differs from the mask the page holds"

            predictor = SamPredictor(model)
            predictor.set_image(server.session.image(0))
            masks, iou, _ = predictor.predict(torch.tensor([[[32.0, 32.0]]]), torch.tensor([[1]]))
            assert np.array_equal(shown, masks[0, int(iou[0].argmax())].numpy())

            # negative (right) click refines the same object; undo brings the single-click mask back
            click(12, 12, len(page.evaluate("annot.latencies")), button="right")
            assert page.evaluate("annot.labels") == [1, 0]
            n = len(page.evaluate("annot.latencies"))
            page.keyboard.press("z")
            page.wait_for_function(f"annot.latencies.length > {n}")
            assert page.evaluate("annot.labels") == [1]
            assert page.evaluate("annot.mask.rle") == shown_rle

            page.keyboard.press("a")
            page.wait_for_selector("#canvas[data-accepted='1']")
            page.keyboard.press("s")
            page.wait_for_selector("#saved[data-saved='1']")
            page.keyboard.press("n")
            page.wait_for_function("annot.index === 1 && document.getElementById('canvas').dataset.embedded === 'true'")
            assert page.get_attribute("#canvas", "data-accepted") == "0"
            assert not errors, errors
            browser.close()
    finally:
        server.stop()

    # the saved COCO json holds exactly the shown mask, and the Data readers load it
    data = json.loads(out_json.read_text())
    assert len(data["annotations"]) == 1 and data["annotations"][0]["image_id"] == 1
    assert np.array_equal(mask_utils.decode(data["annotations"][0]["segmentation"]).astype(bool), shown)
    dataset = CocoDataset(out_json, image_dir)
    assert len(dataset) == 1
    sample = dataset[0]
    assert sample["masks"].shape == (1, 64, 64) and torch.equal(sample["masks"][0], torch.from_numpy(shown))
    assert torch.equal(sample["image"], server.session.image(0))

    totals = [lat["total_ms"] for lat in latencies]
    servers = [lat["server_ms"] for lat in latencies]
    print(f"\nclick-to-mask latency (headless chromium, vit_t, CPU): median {statistics.median(totals):.1f} ms, "
          f"max {max(totals):.1f} ms; decoder on the server: median {statistics.median(servers):.1f} ms")
    assert all(t > 0 for t in totals)


def test_server_rejects_bad_requests(image_dir: Path, tmp_path: Path):
    import urllib.error
    import urllib.request

    torch.manual_seed(0)
    server = AnnotationServer(AnnotationSession(build_sam("vit_t"), image_dir, tmp_path / "x.json")).start()
    try:
        def post(path: str, body: dict) -> tuple[int, dict]:
            req = urllib.request.Request(server.url + path.lstrip("/"), json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req) as res:
                    return res.status, json.loads(res.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        code, body = post("/api/predict", {"image": 7, "points": [[1, 1]], "labels": [1]})
        assert code == 400 and "image index" in body["error"]
        code, body = post("/api/predict", {"image": 0, "points": [], "labels": []})
        assert code == 400 and "at least one point or a box" in body["error"]
        code, body = post("/api/accept", {"image": 0, "size": [64, 64], "counts": [10]})
        assert code == 400 and "does not match" in body["error"]
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(server.url + "static/../../annotate.py")
        assert info.value.code == 404
    finally:
        server.stop()

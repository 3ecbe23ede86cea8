"""`sam-train annotate`: the assisted-manual stage of the data engine, as a page on localhost.

The server (standard library `ThreadingHTTPServer`, 127.0.0.1) keeps the model: an image is encoded
once (`POST /api/embed`, cached), then every click / box runs only the prompt encoder and mask
decoder on the cached embedding (`POST /api/predict`, a few ms for vit_b on a GPU). Accepted masks are
kept per image and written as COCO json (compressed RLE) by `POST /api/save`, loadable with
`sam_train.data.coco.CocoDataset(json, image_dir)`.

Masks travel to the page as uncompressed COCO RLE (column-major run lengths, starting with a
background run), which the page decodes into pixels; an accepted mask is sent back in the same form,
so the saved mask is exactly the one the page showed.

Endpoints: GET / (page), GET /static/<file>, GET /api/images, GET /api/image/<i> (PNG),
GET /api/annotations/<i>, POST /api/embed {image}, POST /api/predict {image, points, labels, box},
POST /api/accept {image, size, counts}, POST /api/undo_accept {image}, POST /api/save.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from sam_train.data.image_io import IMAGE_SUFFIXES, encode_image, read_image
from sam_train.data.rle import decode_rle, rle_bbox_area
from sam_train.data.sample import DataError
from sam_train.inference.predictor import SamPredictor
from sam_train.io import atomic_write, safe_file_name
from sam_train.models.sam import Sam

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}


def uncompressed_rle(mask: np.ndarray) -> list[int]:
    """bool [H, W] -> COCO uncompressed RLE counts (column-major runs, first run = background)."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def list_images(image_dir: Path) -> list[Path]:
    files = sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) to annotate")
    return files


class AnnotationSession:
    """Images, cached embeddings and accepted masks of one annotation session (thread-safe).

    Args:
        model: a `Sam` (eval mode is set here).
        image_dir: folder of images (searched recursively); COCO file_names are relative to it.
        out_json: where `save` writes the COCO json; loaded at start when it exists (resume).
    """

    def __init__(self, model: Sam, image_dir: str | Path, out_json: str | Path) -> None:
        self.predictor = SamPredictor(model.eval())
        self.image_dir = Path(image_dir)
        self.files = list_images(self.image_dir)
        self.out_json = Path(out_json)
        self.lock = threading.Lock()  # one model, many request threads
        self.embeddings: dict[int, tuple[torch.Tensor, tuple[int, int], tuple[int, int]]] = {}
        self.images: dict[int, torch.Tensor] = {}
        self.accepted: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(self.files))}
        if self.out_json.is_file():
            self._load_existing()

    def _load_existing(self) -> None:
        data = json.loads(self.out_json.read_text())
        by_name = {str(f.relative_to(self.image_dir)): i for i, f in enumerate(self.files)}
        ids = {im["id"]: by_name.get(im["file_name"]) for im in data.get("images", [])}
        for ann in data.get("annotations", []):
            index = ids.get(ann["image_id"])
            if index is not None:
                self.accepted[index].append(ann["segmentation"])

    def check_index(self, index: Any) -> int:
        if not isinstance(index, int) or not 0 <= index < len(self.files):
            raise ValueError(f"image index must be an int in [0, {len(self.files)}), got {index!r}")
        return index

    def image(self, index: int) -> torch.Tensor:
        if index not in self.images:
            self.images[index] = read_image(self.files[index])
        return self.images[index]

    def image_list(self) -> list[dict[str, Any]]:
        out = []
        for i, f in enumerate(self.files):
            h, w = (int(s) for s in self.image(i).shape[1:])
            out.append({"index": i, "file_name": str(f.relative_to(self.image_dir)), "height": h, "width": w,
                        "accepted": len(self.accepted[i])})
        return out

    def embed(self, index: int) -> float:
        """Encode image `index` once; returns the milliseconds spent (0 when cached)."""
        with self.lock:
            if index in self.embeddings:
                return 0.0
            start = time.perf_counter()
            self.predictor.set_image(self.image(index))
            p = self.predictor
            self.embeddings[index] = (p.get_image_embedding(), p.input_size, p.original_size)  # type: ignore[assignment]
            return (time.perf_counter() - start) * 1000

    def predict(self, index: int, points: list[list[float]], labels: list[int], box: list[float] | None) -> dict:
        """Mask of the prompts on image `index` (decoder only): one click -> best of 3 by predicted IoU."""
        if not points and box is None:
            raise ValueError("predict needs at least one point or a box")
        if len(points) != len(labels):
            raise ValueError(f"{len(points)} points but {len(labels)} labels")
        self.embed(index)
        with self.lock:
            start = time.perf_counter()
            self.predictor.set_image_embedding(*self.embeddings[index])
            coords = torch.tensor([points], dtype=torch.float32) if points else None
            lbls = torch.tensor([labels], dtype=torch.int64) if points else None
            boxes = torch.tensor([box], dtype=torch.float32) if box is not None else None
            multimask = len(points) == 1 and box is None  # a single click is ambiguous (SAM's rule)
            masks, iou, _ = self.predictor.predict(coords, lbls, boxes, multimask_output=multimask)
            best = int(iou[0].argmax())
            mask = masks[0, best].cpu().numpy()
            ms = (time.perf_counter() - start) * 1000
        return {"size": list(mask.shape), "counts": uncompressed_rle(mask), "area": int(mask.sum()),
                "score": float(iou[0, best]), "server_ms": ms}

    def accept(self, index: int, size: list[int], counts: list[int]) -> int:
        """Store a mask the page showed (uncompressed RLE) as compressed RLE; returns the image's count."""
        h, w = (int(s) for s in self.image(index).shape[1:])
        if list(size) != [h, w] or sum(counts) != h * w:
            raise ValueError(f"mask size {size} / {sum(counts)} pixels does not match image {index} ({h}x{w})")
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
        rle["counts"] = rle["counts"].decode("ascii")
        with self.lock:
            self.accepted[index].append(rle)
            return len(self.accepted[index])

    def undo_accept(self, index: int) -> int:
        with self.lock:
            if self.accepted[index]:
                self.accepted[index].pop()
            return len(self.accepted[index])

    def annotations(self, index: int) -> list[dict[str, Any]]:
        """Accepted masks of an image as uncompressed RLE (what the page draws)."""
        h, w = (int(s) for s in self.image(index).shape[1:])
        return [{"size": [h, w], "counts": uncompressed_rle(decode_rle(r))}
                for r in self.accepted[index]]

    def coco(self) -> dict[str, Any]:
        images, annotations = [], []
        for i, f in enumerate(self.files):
            if not self.accepted[i]:  # only labelled images: CocoDataset rejects images without objects
                continue
            h, w = (int(s) for s in self.image(i).shape[1:])
            images.append({"id": i + 1, "file_name": str(f.relative_to(self.image_dir)), "height": h, "width": w})
            for rle in self.accepted[i]:
                bbox, area = rle_bbox_area(rle)
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                    "segmentation": rle, "area": area, "bbox": bbox})
        return {"images": images, "annotations": annotations,
                "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}

    def save(self) -> dict[str, Any]:
        """Write the COCO json atomically (`sam_train.io.atomic_write`); returns {path, images, annotations}."""
        with self.lock:
            data = self.coco()
            atomic_write(self.out_json, lambda f: json.dump(data, f), text=True)
        return {"path": str(self.out_json), "images": len(data["images"]), "annotations": len(data["annotations"])}


def make_handler(session: AnnotationSession) -> type[BaseHTTPRequestHandler]:
    """Request handler class bound to a session."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one debug line per request
            log.debug("annotate: " + fmt, *args)

        def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
            self._send(json.dumps(obj).encode(), "application/json", status)

        def _fail(self, exc: Exception, status: HTTPStatus) -> None:
            self._json({"error": f"{type(exc).__name__}: {exc}"}, status)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?")[0]
            try:
                if path in ("/", "/index.html"):
                    self._send((STATIC / "index.html").read_bytes(), CONTENT_TYPES[".html"])
                elif path.startswith("/static/"):
                    f = STATIC / Path(path).name  # name only: no path traversal
                    if not f.is_file():
                        raise FileNotFoundError(path)
                    self._send(f.read_bytes(), CONTENT_TYPES.get(f.suffix, "application/octet-stream"))
                elif path == "/api/images":
                    self._json(session.image_list())
                elif path.startswith("/api/image/"):
                    index = session.check_index(int(path.rsplit("/", 1)[1]))
                    self._send(encode_image(session.image(index)), "image/png")
                elif path.startswith("/api/annotations/"):
                    self._json(session.annotations(session.check_index(int(path.rsplit("/", 1)[1]))))
                else:
                    raise FileNotFoundError(path)
            except FileNotFoundError as exc:
                self._fail(exc, HTTPStatus.NOT_FOUND)
            except ValueError as exc:
                self._fail(exc, HTTPStatus.BAD_REQUEST)

        def do_POST(self) -> None:  # noqa: N802
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                path = self.path
                if path == "/api/save":
                    self._json(session.save())
                    return
                index = session.check_index(body.get("image"))
                if path == "/api/embed":
                    self._json({"ms": session.embed(index)})
                elif path == "/api/predict":
                    self._json(session.predict(index, body.get("points", []), body.get("labels", []), body.get("box")))
                elif path == "/api/accept":
                    self._json({"accepted": session.accept(index, body["size"], body["counts"])})
                elif path == "/api/undo_accept":
                    self._json({"accepted": session.undo_accept(index)})
                else:
                    self._fail(FileNotFoundError(path), HTTPStatus.NOT_FOUND)
            except (ValueError, KeyError, TypeError) as exc:
                self._fail(exc, HTTPStatus.BAD_REQUEST)

    return Handler


class AnnotationServer:
    """The annotation page's HTTP server on `host:port` (port 0 = any free port), run in a thread.

    Example: `server = AnnotationServer(session).start(); print(server.url); ...; server.stop()`.
    """

    def __init__(self, session: AnnotationSession, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.session = session
        self.httpd = ThreadingHTTPServer((host, port), make_handler(session))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> AnnotationServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="sam-annotate", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join()


def export_images(dataset: Any, out_dir: Path) -> Path:
    """Write the images of a dataset (sample dicts) as PNGs, so the page and the COCO json use files."""
    from sam_train.engine.autolabel import iter_images

    out_dir.mkdir(parents=True, exist_ok=True)
    for item in iter_images(dataset):
        (out_dir / f"{safe_file_name(str(item['id']))}.png").write_bytes(encode_image(item["image"]))
    return out_dir

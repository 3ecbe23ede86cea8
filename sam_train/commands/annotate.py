"""`sam-train annotate` (configs/annotate.yaml): the annotation page on localhost (`sam_train.engine.annotate`)."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from sam_train.commands.build import inference_model
from sam_train.data.sample import DataError
from sam_train.engine.annotate import AnnotationServer, AnnotationSession, export_images


def image_folder(cfg: DictConfig) -> Path:
    """`images=<folder>`, or `data=<config>`: that data config's `split` dataset, untransformed, as PNGs
    in `<out's folder>/images`."""
    if cfg.get("images"):
        folder = Path(cfg.images)
        if not folder.is_dir():
            raise DataError(f"images={folder}: not a folder (expected a folder of images)")
        return folder
    if cfg.get("data") is None:
        raise DataError("annotate needs images=<folder of images> or data=<data config> (e.g. data=toy_shapes)")
    split = cfg.data.get(cfg.split)
    if split is None:
        raise DataError(f"data config has no {cfg.split!r} dataset (split=train | val)")
    split = OmegaConf.create(OmegaConf.to_container(split, resolve=True))  # detached: resolve first
    with open_dict(split):
        split.transform = None  # the page shows original images
    return export_images(instantiate(split), Path(cfg.out).parent / "images")


def main(cfg: DictConfig) -> None:
    """Serve until Ctrl-C."""
    image_dir = image_folder(cfg)
    model = inference_model(cfg)
    server = AnnotationServer(AnnotationSession(model, image_dir, cfg.out), host=cfg.host, port=cfg.port)
    print(f"annotation page: {server.url}  (images: {image_dir}, saving to {cfg.out}; Ctrl-C to stop)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()

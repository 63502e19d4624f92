"""Real photos reachable offline: the scikit-image wheel's sample photos and, if installed, the PASCAL VOC / cat-dog
photos of Debian's ``labelme-examples`` package (``apt-get install labelme-examples``).

Licenses: scikit-image's samples are CC0 / public domain (see ``skimage/data/_fetchers.py``); the labelme-examples
photos come from PASCAL VOC 2011 / Flickr (package GPL-3). Nothing is copied into the repository.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

#: scikit-image photos (natural scenes first); the default run uses the first ``DEFAULT_SKIMAGE``
SKIMAGE = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
           "retina.jpg", "camera.png", "coins.png", "page.png", "text.png", "brick.png", "grass.png", "gravel.png",
           "moon.png")
DEFAULT_SKIMAGE = 6
LABELME_DIR = Path("/usr/share/doc/labelme-examples/examples")


def skimage_dir() -> Path:
    """The ``skimage/data`` folder of the installed scikit-image wheel (its bundled sample files)."""
    import importlib.util
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the photos need scikit-image: pip install 'tokcomp[bench]'")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def skimage_photo(name: str) -> Image.Image:
    """One bundled scikit-image sample file (``"chelsea.png"``; the extension may be left out) as RGB."""
    d = skimage_dir()
    path = d / name if "." in name else next(iter(sorted(d.glob(name + ".*"))), d / name)
    return Image.open(path).convert("RGB")


def labelme_photos(root: Path = LABELME_DIR, first_frame_only: bool = True) -> list[tuple[str, Image.Image]]:
    """The distinct photos of ``*/data_annotated/*.jpg`` under ``root`` (VOC 2011 scenes, a cat and a dog, one
    frame of the video example unless ``first_frame_only`` is False); empty if the package is not installed."""
    if not root.is_dir():
        return []
    seen, out = set(), []
    for p in sorted(root.glob("*/data_annotated/*.jpg")):
        key = p.name
        if key in seen:
            continue
        if first_frame_only and p.parent.parent.name == "video_annotation" and key != "00000100.jpg":
            continue
        seen.add(key)
        kind = "voc" if p.stem.startswith("20") else p.parent.parent.name
        out.append((f"{kind}/{p.stem}", Image.open(p).convert("RGB")))
    return out


def load_photos(all_photos: bool = False, names: list[str] | None = None,
                labelme_dir: Path | None = LABELME_DIR) -> list[tuple[str, Image.Image]]:
    """``[(name, RGB image)]``: ``names`` if given (scikit-image names), else the default subset (the first
    :data:`DEFAULT_SKIMAGE` scikit-image photos plus the VOC scenes of labelme-examples) or, with ``all_photos``,
    every scikit-image photo and every labelme photo."""
    if names:
        return [(n.split(".")[0], skimage_photo(n)) for n in names]
    sk = SKIMAGE if all_photos else SKIMAGE[:DEFAULT_SKIMAGE]
    out = [(n.split(".")[0], skimage_photo(n)) for n in sk]
    if labelme_dir is not None:
        lm = labelme_photos(Path(labelme_dir))
        if not all_photos:
            lm = [(n, im) for n, im in lm if n.startswith("voc/")]            # the three VOC 2011 scenes
        out += lm
    return out

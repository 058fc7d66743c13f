"""Readers, the MNIST-M generator and preprocessing, on generated files and on the shared data folder."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_config, make_digits, write_idx, write_mnist_folder, write_mnistm_folder
from pixelda.data import (
    blend_with_photos,
    build_splits,
    generate_mnistm,
    load_mnistm_layout,
    load_split,
    read_embedded_mnist,
    read_idx,
    read_mnist_idx,
    read_mnistm_folder,
    read_pickle,
    Part,
    to_chw32,
    to_model_input,
)
from pixelda.errors import UserError


# ---------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images, labels = write_mnist_folder(tmp_path, count=12, gz=gz)
    part = read_mnist_idx(tmp_path, "test")
    assert part.images.shape == (12, 28, 28)
    assert part.images.dtype == np.uint8
    np.testing.assert_array_equal(part.images, images)
    np.testing.assert_array_equal(part.labels, labels)


def test_idx_test_files_alone_suffice(tmp_path):
    write_mnist_folder(tmp_path, count=5, parts=("test",))
    assert len(read_mnist_idx(tmp_path, "test").images) == 5
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        read_mnist_idx(tmp_path, "train")


def test_idx_wrong_magic(tmp_path):
    images, _ = make_digits(3)
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", images, 2049)
    with pytest.raises(UserError, match="magic number 2049, expected 2051"):
        read_idx(path, 2051)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path, gz):
    images, _ = make_digits(10)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    path = write_idx(tmp_path / name, images, 2051)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{name}.*fetch it again"):
        read_idx(path, 2051)


def test_idx_count_mismatch(tmp_path):
    images, labels = make_digits(10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images, 2051)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:9], 2049)
    with pytest.raises(UserError, match="10 images but 9 labels"):
        read_mnist_idx(tmp_path, "test")


# ---------------------------------------------------------------------------------------------
# MNIST-M folders


def test_mnistm_folder_round_trip(tmp_path):
    images, labels = write_mnistm_folder(tmp_path, count=6)
    part = read_mnistm_folder(tmp_path, "test", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(part.images, images)
    np.testing.assert_array_equal(part.labels, labels)
    assert len(list((tmp_path / "cache").glob("mnistm_folder-*.npz"))) == 1
    cached = read_mnistm_folder(tmp_path, "test", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(cached.images, images)


def test_mnistm_cache_refreshes_when_labels_change(tmp_path):
    write_mnistm_folder(tmp_path, count=6)
    read_mnistm_folder(tmp_path, "test", cache_dir=tmp_path / "cache")
    labels_file = tmp_path / "mnist_m_test_labels.txt"
    labels_file.write_text("\n".join(labels_file.read_text().splitlines()[:4]) + "\n")
    assert len(read_mnistm_folder(tmp_path, "test", cache_dir=tmp_path / "cache").images) == 4


def test_mnistm_labels_name_missing_png(tmp_path):
    write_mnistm_folder(tmp_path, count=3)
    (tmp_path / "mnist_m_test" / "00000001.png").unlink()
    with pytest.raises(UserError, match="names 00000001.png, which is missing"):
        read_mnistm_folder(tmp_path, "test")


def test_mnistm_missing_labels_file(tmp_path):
    with pytest.raises(UserError, match="mnist_m_train_labels.txt"):
        read_mnistm_folder(tmp_path, "train")


def test_mnistm_layout_prefers_test_pair(tmp_path):
    write_mnistm_folder(tmp_path, count=4, part="train")
    split, part = load_mnistm_layout(tmp_path)
    assert part == "train"
    assert split.images.shape == (4, 3, 32, 32)
    write_mnistm_folder(tmp_path, count=5, part="test")
    split, part = load_mnistm_layout(tmp_path)
    assert part == "test"
    assert len(split) == 5


# ---------------------------------------------------------------------------------------------
# pickles


@pytest.mark.parametrize("bytes_keys", [False, True])
@pytest.mark.parametrize("shape", [(7, 28, 28), (7, 28, 28, 3), (7, 32, 32, 3)])
def test_pickle_flat_dict(tmp_path, bytes_keys, shape):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels = rng.integers(0, 10, size=7)
    keys = (b"images", b"labels") if bytes_keys else ("images", "labels")
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({keys[0]: images, keys[1]: labels}))
    parts = read_pickle(path)
    assert list(parts) == ["all"]
    np.testing.assert_array_equal(parts["all"].images, images)
    np.testing.assert_array_equal(parts["all"].labels, labels)
    assert to_chw32(parts["all"].images).shape == (7, 1 if len(shape) == 3 else 3, 32, 32)


def test_pickle_gzipped_with_parts(tmp_path):
    images, labels = make_digits(4)
    content = {"train": {"images": images, "labels": labels}, "test": {"images": images[:2], "labels": labels[:2]}}
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(content)))
    parts = read_pickle(path)
    assert sorted(parts) == ["test", "train"]
    assert len(parts["test"].images) == 2


def test_pickle_rejects_float_images(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"images": np.zeros((2, 28, 28), np.float32), "labels": np.zeros(2)}))
    with pytest.raises(UserError, match="float32; expected uint8"):
        read_pickle(path)


def test_pickle_rejects_missing_keys(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(UserError, match="expected 'images' and 'labels'"):
        read_pickle(path)


# ---------------------------------------------------------------------------------------------
# the MNIST-M generator


def test_blend_is_abs_difference():
    digits = np.zeros((5, 32, 32), dtype=np.uint8)
    digits[:, 10:20, 10:20] = 200
    photo = np.full((40, 50, 3), (30, 120, 250), dtype=np.uint8)
    out = blend_with_photos(digits, [photo], seed=0)
    assert out.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(out[:, 0, 0], np.tile([30, 120, 250], (5, 1)))
    np.testing.assert_array_equal(out[:, 15, 15], np.tile([170, 80, 50], (5, 1)))


def test_blend_seeded():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, size=(20, 32, 32), dtype=np.uint8)
    photos = [rng.integers(0, 256, size=(60, 70, 3), dtype=np.uint8) for _ in range(3)]
    first = blend_with_photos(digits, photos, seed=1)
    np.testing.assert_array_equal(first, blend_with_photos(digits, photos, seed=1))
    assert not np.array_equal(first, blend_with_photos(digits, photos, seed=2))


def test_generator_caches_on_disk(tmp_path):
    photo_dir = tmp_path / "photos"
    photo_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(photo_dir / f"p{i}.jpg")
    images, labels = make_digits(8)
    digits = Part(images, labels.astype(np.int64))
    out = generate_mnistm(digits, "photos", seed=0, root=tmp_path, cache_dir=tmp_path / "cache")
    assert out.images.shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(out.labels, labels)
    assert len(list((tmp_path / "cache").glob("mnistm_generated-*.npz"))) == 1
    again = generate_mnistm(digits, "photos", seed=0, root=tmp_path, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.images, out.images)


def test_generator_needs_photos(tmp_path):
    (tmp_path / "empty").mkdir()
    images, labels = make_digits(2)
    with pytest.raises(UserError, match="no JPG or PNG photos"):
        generate_mnistm(Part(images, labels), "empty", 0, tmp_path, None)


# ---------------------------------------------------------------------------------------------
# preprocessing


def test_to_chw32_matches_pil_bilinear():
    images, _ = make_digits(6)
    ours = to_chw32(images)
    assert ours.dtype == torch.uint8
    assert ours.shape == (6, 1, 32, 32)
    for i in range(6):
        pil = np.asarray(Image.fromarray(images[i]).resize((32, 32), Image.BILINEAR)).astype(int)
        # PIL's bilinear filter and torch's interpolate round differently at some edges.
        assert np.abs(pil - ours[i, 0].numpy().astype(int)).mean() < 3.0


def test_to_model_input_range_and_channels():
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 32, 32)
    x = to_model_input(batch)
    assert x.shape == (2, 3, 32, 32)
    assert x.dtype == torch.float32
    assert x[0].min().item() == -1.0
    assert x[1].max().item() == 1.0


# ---------------------------------------------------------------------------------------------
# splits


def test_embedded_splits(cache_dir):
    cfg = compose_config([f"data.cache_dir={cache_dir}"])
    splits = build_splits(cfg.data)
    assert len(splits.source_train) == 3000
    assert len(splits.target_train) == 3000
    assert len(splits.target_val) == 1000
    assert len(splits.source_test) == 1000
    assert len(splits.target_test) == 1000
    assert splits.source_train.images.shape[1:] == (1, 32, 32)
    assert splits.target_train.images.shape[1:] == (3, 32, 32)
    assert splits.target_train.labels is None
    assert splits.target_val.labels is not None
    # shuffled, so every class appears in the validation split
    assert torch.bincount(splits.target_val.labels, minlength=10).min() > 50


def test_embedded_digits_from_wheel():
    part = read_embedded_mnist()
    assert part.images.shape == (5000, 28, 28)
    assert np.bincount(part.labels).tolist() == [500] * 10


def test_target_only_keeps_target_train_labels(small_protocol_root):
    from conftest import small_protocol_overrides

    cfg = compose_config(small_protocol_overrides(small_protocol_root))
    assert build_splits(cfg.data).target_train.labels is None
    assert build_splits(cfg.data, read_target_train_labels=True).target_train.labels is not None


def test_split_past_end_rejected(small_protocol_root):
    from conftest import small_protocol_overrides

    cfg = compose_config(small_protocol_overrides(small_protocol_root) + ["data.target_val.stop=99"])
    with pytest.raises(UserError, match="data.target_val.stop=99 exceeds the 40 images"):
        build_splits(cfg.data)


def test_missing_root_rejected(tmp_path):
    cfg = compose_config(["data=mnist_mnistm_small", f"data.root={tmp_path}/nowhere"])
    with pytest.raises(UserError, match="nowhere"):
        build_splits(cfg.data)


# ---------------------------------------------------------------------------------------------
# the shared data folder (real MNIST test IDX, MNIST-M test folder, BSDS500 photos)


def test_shared_mnist_idx(shared_data):
    part = read_mnist_idx(shared_data / "MNIST" / "raw", "test")
    assert part.images.shape == (10000, 28, 28)
    assert np.bincount(part.labels).sum() == 10000
    assert part.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_shared_mnistm_labels_match_mnist(shared_data, tmp_path):
    mnist = read_mnist_idx(shared_data / "MNIST" / "raw", "test")
    mnistm = read_mnistm_folder(shared_data / "mnist_m", "test", cache_dir=tmp_path)
    assert mnistm.images.shape == (7000, 32, 32, 3)
    np.testing.assert_array_equal(mnistm.labels, mnist.labels[:7000])


def test_shared_small_protocol(shared_data, tmp_path):
    cfg = compose_config(["data=mnist_mnistm_small", f"data.root={shared_data}", f"data.cache_dir={tmp_path}"])
    splits = build_splits(cfg.data)
    sizes = [len(getattr(splits, name)) for name in ("source_train", "target_train", "target_val", "source_test", "target_test")]
    assert sizes == [6000, 6000, 1000, 999, 0]
    assert splits.target_train.labels is None
    assert len(load_split(cfg.data, "target_val")) == 1000


def test_shared_bsds_generator(shared_data, tmp_path):
    mnist = read_mnist_idx(shared_data / "MNIST" / "raw", "test")
    digits = Part(mnist.images[:300], mnist.labels[:300])
    out = generate_mnistm(digits, "BSDS500/images/train", seed=0, root=shared_data, cache_dir=tmp_path)
    assert out.images.shape == (300, 32, 32, 3)
    assert out.images.dtype == np.uint8
    # crops come from 200 different photos, so the images' mean colours spread widely
    assert out.images.reshape(300, -1, 3).mean(axis=1).std(axis=0).min() > 10
    again = generate_mnistm(digits, "BSDS500/images/train", seed=0, root=shared_data, cache_dir=None)
    np.testing.assert_array_equal(again.images, out.images)

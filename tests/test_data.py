"""Reading, normalising, pairing and patching data (napari_medrwkv.engine: imageio, preprocess, datasets)."""
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from skimage import io as skio

from napari_medrwkv.engine.datasets import IGNORE_INDEX, Pair, SegmentationDataset, augmentation, check_pair, find_pairs
from napari_medrwkv.engine.imageio import DataError, read_image, read_mask
from napari_medrwkv.engine.preprocess import NORMALIZATION, image_to_channels, normalize, normalize_reference

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLES = ROOT / "napari_medrwkv" / "plugin" / "samples"
needs_shared = pytest.mark.skipif(not (SHARED / "dsb2018").is_dir(),
                                  reason=f"shared data {SHARED} is absent (only CI and dev machines have it)")


def assert_same(a, b):
    """Exact equality of tensors or tuples of tensors (torch.testing.assert_close imports slowly)."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b)


def ramp(h=20, w=30, dtype=np.uint8, top=255):
    return (np.arange(h * w).reshape(h, w) * top // (h * w - 1)).astype(dtype)


def rgb(h=20, w=30):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- read_image


@pytest.mark.parametrize("ext", ["png", "bmp", "tif", "gif"])
def test_read_grey_uint8_lossless(tmp_path, ext):
    a = ramp()
    path = tmp_path / f"a.{ext}"
    (tifffile.imwrite(path, a) if ext == "tif" else Image.fromarray(a).save(path))
    out = read_image(path)
    assert out.shape == (20, 30) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("ext", ["png", "bmp", "tiff"])
def test_read_rgb_lossless(tmp_path, ext):
    a = rgb()
    path = tmp_path / f"a.{ext}"
    (tifffile.imwrite(path, a) if ext == "tiff" else skio.imsave(path, a, check_contrast=False))
    out = read_image(path)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_read_rgba(tmp_path, ext):
    a = np.dstack([rgb(), np.full((20, 30), 128, np.uint8)])
    path = tmp_path / f"a.{ext}"
    (tifffile.imwrite(path, a) if ext == "tif" else Image.fromarray(a, "RGBA").save(path))
    out = read_image(path)
    assert out.shape == (20, 30, 4)
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_read_uint16(tmp_path, ext):
    a = ramp(dtype=np.uint16, top=60000)
    path = tmp_path / f"a.{ext}"
    (tifffile.imwrite(path, a) if ext == "tif" else Image.fromarray(a).save(path))
    out = read_image(path)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, a)


def test_read_float_tiff(tmp_path):
    a = np.linspace(-1, 3, 600, dtype=np.float32).reshape(20, 30)
    tifffile.imwrite(tmp_path / "f.tif", a)
    out = read_image(tmp_path / "f.tif")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a)


def test_read_jpeg_grey_and_rgb(tmp_path):
    grey, colour = ramp(64, 64), np.dstack([ramp(64, 64), 255 - ramp(64, 64), np.full((64, 64), 90, np.uint8)])
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(colour).save(tmp_path / "c.jpeg", quality=95)
    g, c = read_image(tmp_path / "g.jpg"), read_image(tmp_path / "c.jpeg")
    assert g.shape == (64, 64) and c.shape == (64, 64, 3)
    assert np.abs(g.astype(int) - grey).mean() < 3 and np.abs(c.astype(int) - colour).mean() < 4


def test_read_multipage_tiff_stacks(tmp_path):
    grey = np.stack([ramp() + i for i in range(5)])
    colour = np.stack([rgb()] * 4)
    tifffile.imwrite(tmp_path / "z.tif", grey)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:    # separate pages, no shape metadata
        for plane in grey:
            tif.write(plane, metadata=None)
    tifffile.imwrite(tmp_path / "zc.tif", colour)
    for name in ("z.tif", "pages.tif"):
        out = read_image(tmp_path / name)
        assert out.shape == (5, 20, 30), name
        np.testing.assert_array_equal(out, grey)
    assert read_image(tmp_path / "zc.tif").shape == (4, 20, 30, 3)


def test_read_planar_rgb_tiff_puts_channels_last(tmp_path):
    a = rgb()
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(a, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "p.tif"), a)


def test_read_gif_first_frame(tmp_path):
    a = ramp()
    frames = [Image.fromarray(a), Image.fromarray(255 - a)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    out = read_image(tmp_path / "anim.gif")
    assert out.shape == (20, 30)
    np.testing.assert_array_equal(out, a)


def test_read_colour_gif(tmp_path):
    a = np.zeros((10, 12, 3), np.uint8)
    a[:, :6] = (255, 0, 0)
    a[:, 6:] = (0, 0, 255)
    Image.fromarray(a).save(tmp_path / "c.gif")
    np.testing.assert_array_equal(read_image(tmp_path / "c.gif"), a)


def test_read_bundled_sample():
    out = read_image(SAMPLES / "nuclei_brightfield.png")
    assert out.shape == (256, 320, 3) and out.dtype == np.uint8


def test_read_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    truncated = tmp_path / "trunc.jpg"
    Image.fromarray(rgb(64, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    bad_tif = tmp_path / "bad.tif"
    bad_tif.write_bytes(b"II*\x00" + b"\x00" * 10)
    other = tmp_path / "table.csv"
    other.write_bytes(b"x")
    missing = tmp_path / "missing.png"
    for path, words in [(corrupt, "cannot read"), (truncated, "cannot read"), (bad_tif, "cannot read"),
                        (other, "unsupported"), (missing, "does not exist"), (tmp_path, "folder")]:
        with pytest.raises(DataError) as info:
            read_image(path)
        assert str(path) in str(info.value) and words in str(info.value)
        with pytest.raises(DataError) as info:
            read_mask(path, 1)
        assert str(path) in str(info.value)


# --------------------------------------------------------------------------- read_mask


def test_read_mask_binary_conventions(tmp_path):
    m = np.zeros((8, 9), np.uint8)
    m[2:5, 3:7] = 1
    Image.fromarray(m * 255).save(tmp_path / "m255.png")
    Image.fromarray(m).save(tmp_path / "m01.bmp")
    inst = m.astype(np.uint16) * 700
    inst[6, 0] = 3
    tifffile.imwrite(tmp_path / "inst.tif", inst)
    for name in ("m255.png", "m01.bmp"):
        out = read_mask(tmp_path / name, 1)
        assert out.dtype == np.int64 and out.shape == (8, 9)
        np.testing.assert_array_equal(out, m)
    np.testing.assert_array_equal(read_mask(tmp_path / "inst.tif", 1), (inst > 0).astype(np.int64))


def test_read_mask_bundled_instance_labels():
    out = read_mask(SAMPLES / "nuclei_fluorescence_mask.png", 1)
    raw = np.asarray(Image.open(SAMPLES / "nuclei_fluorescence_mask.png"))
    assert out.dtype == np.int64 and set(np.unique(out)) == {0, 1}
    np.testing.assert_array_equal(out, raw > 0)


def test_read_mask_multiclass(tmp_path):
    m = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    Image.fromarray(m).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", 3), m)
    Image.fromarray(np.array([[0, 5], [1, 2]], np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(DataError) as info:
        read_mask(tmp_path / "bad.png", 3)
    msg = str(info.value)
    assert str(tmp_path / "bad.png") in msg and "class id 5 but the model has 3 classes (0..2)" in msg
    Image.fromarray(np.array([[0, 255]], np.uint8)).save(tmp_path / "bin.png")
    with pytest.raises(DataError, match="binary") as info:
        read_mask(tmp_path / "bin.png", 2)
    assert str(tmp_path / "bin.png") in str(info.value)
    tifffile.imwrite(tmp_path / "frac.tif", np.array([[0, 0.5]], np.float32))
    with pytest.raises(DataError, match="fractional") as info:
        read_mask(tmp_path / "frac.tif", 3)
    assert str(tmp_path / "frac.tif") in str(info.value)


def test_read_mask_palette_png_uses_indices(tmp_path):
    m = np.array([[0, 1], [2, 1]], np.uint8)
    im = Image.fromarray(m, "P")
    im.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * (253 * 3))
    im.save(tmp_path / "voc.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "voc.png", 3), m)


def test_read_mask_rgb_grey_ok_colour_rejected(tmp_path):
    m = np.zeros((6, 7), np.uint8)
    m[1:4, 2:5] = 255
    skio.imsave(tmp_path / "grey3.png", np.dstack([m] * 3), check_contrast=False)
    np.testing.assert_array_equal(read_mask(tmp_path / "grey3.png", 1), m > 0)
    colour = np.dstack([m, m // 2, m])
    skio.imsave(tmp_path / "colour.png", colour, check_contrast=False)
    with pytest.raises(DataError, match="colour") as info:
        read_mask(tmp_path / "colour.png", 1)
    assert str(tmp_path / "colour.png") in str(info.value)
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 6, 7), np.uint8), photometric="minisblack")
    with pytest.raises(DataError, match="stack") as info:
        read_mask(tmp_path / "stack.tif", 1)
    assert str(tmp_path / "stack.tif") in str(info.value)


# --------------------------------------------------------------------------- normalisation


def test_normalization_constant_describes_the_function():
    assert NORMALIZATION == {"mode": "percentile", "low": 0.5, "high": 99.5, "center": 0.5, "scale": 0.25}
    x = np.arange(1001, dtype=np.float64)          # percentiles 0.5 -> 5, 99.5 -> 995
    out = normalize(x)
    assert out.dtype == np.float32
    expected = (np.clip((x - 5) / 990, -0.5, 1.5) - 0.5) / 0.25
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out.min() >= -4 and out.max() <= 4


def test_normalize_uint16_matches_uint8_and_is_scale_invariant():
    a8 = ramp(40, 50)
    a16 = a8.astype(np.uint16) * 257               # same image, 16-bit range
    np.testing.assert_allclose(normalize(a16), normalize(a8), atol=1e-5)
    dim16 = (a8.astype(np.uint16) * 3 + 1000)      # 16-bit image using a small part of the range
    np.testing.assert_allclose(normalize(dim16), normalize(a8), atol=1e-5)
    assert normalize(a16).min() == pytest.approx(-2.0, abs=0.05)
    assert normalize(a16).max() == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_normalize_constant_is_zero(dtype):
    out = normalize(np.full((7, 9), 42, dtype))
    assert out.dtype == np.float32 and not np.isnan(out).any()
    np.testing.assert_array_equal(out, 0)


@pytest.mark.parametrize("seed", range(4))
def test_normalize_uint8_uint16_fast_path_equals_the_float64_reference(seed):
    # uint8/uint16 take the histogram + lookup-table path; normalize_reference is the definition
    rng = np.random.default_rng(seed)
    cases = [rng.integers(0, 256, (61, 47, 3), dtype=np.uint8),
             rng.integers(0, 65536, (33, 29), dtype=np.uint16),
             rng.integers(1000, 1004, (17, 5), dtype=np.uint16),              # four values
             (rng.random((64, 64)) < 0.003).astype(np.uint8) * 200,          # percentiles coincide
             np.full((3, 4), 7 + seed, np.uint8), np.array([[65535]], np.uint16), np.array([0, 255], np.uint8)]
    cases += [rng.integers(0, 9, n, dtype=np.uint8) for n in (1, 2, 3, 199, 200, 201)]   # percentile positions
    for x in cases:
        fast, reference = normalize(x), normalize_reference(x)
        assert fast.dtype == np.float32 and fast.shape == x.shape
        np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-6, err_msg=f"{x.dtype} {x.shape}")


def test_normalize_sparse_spots_do_not_vanish():
    a = np.zeros((100, 100), np.uint16)
    a[5, 5] = a[50, 60] = 4000                      # 0.02 % bright pixels: percentiles coincide
    out = normalize(a)
    assert np.isfinite(out).all() and out[5, 5] > out[0, 0]


def test_image_to_channels_conversions():
    grey, colour = ramp(), rgb()
    rgba = np.dstack([colour, np.zeros((20, 30), np.uint8)])
    g3 = image_to_channels(grey, 3)
    assert g3.shape == (3, 20, 30) and g3.dtype == np.float32
    np.testing.assert_array_equal(g3[0], g3[2])
    np.testing.assert_array_equal(g3[0], normalize(grey))
    np.testing.assert_array_equal(image_to_channels(grey, 1)[0], normalize(grey))
    c3 = image_to_channels(colour, 3)
    np.testing.assert_array_equal(c3, np.moveaxis(normalize(colour), -1, 0))
    np.testing.assert_array_equal(image_to_channels(rgba, 3), c3)     # alpha dropped
    lum = image_to_channels(colour, 1)
    assert lum.shape == (1, 20, 30)
    np.testing.assert_allclose(lum[0], normalize(colour @ np.array([0.2125, 0.7154, 0.0721])), atol=1e-5)
    grey_rgb = np.dstack([grey] * 3)                                  # grey stored as R = G = B
    np.testing.assert_array_equal(image_to_channels(grey_rgb, 3), g3)
    np.testing.assert_array_equal(image_to_channels(grey_rgb, 1), image_to_channels(grey, 1))
    with pytest.raises(ValueError):
        image_to_channels(np.zeros((5, 20, 30)), 3)                     # a stack, not one image


# --------------------------------------------------------------------------- find_pairs / check_pair


def make_folder(root: Path, stems, image_ext="png", mask_ext="png", size=(24, 32), rgb_images=False, splits=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i, stem in enumerate(stems):
        ie = image_ext[i % len(image_ext)] if isinstance(image_ext, list) else image_ext
        me = mask_ext[i % len(mask_ext)] if isinstance(mask_ext, list) else mask_ext
        image = rng.integers(0, 256, size + ((3,) if rgb_images else ()), dtype=np.uint8)
        mask = ((image if not rgb_images else image[..., 0]) > 128).astype(np.uint8) * 255
        for arr, path in ((image, root / "images" / f"{stem}.{ie}"), (mask, root / "masks" / f"{stem}.{me}")):
            if path.suffix in (".tif", ".tiff"):
                tifffile.imwrite(path, arr)
            else:
                Image.fromarray(arr).save(path)
    if splits is not None:
        (root / "splits.json").write_text(json.dumps(splits))
    return root


def test_find_pairs_mixed_extensions_sorted(tmp_path):
    stems = ["c", "a", "b", "d"]
    make_folder(tmp_path, stems, image_ext=["png", "jpg", "tif", "bmp"], mask_ext=["tif", "png", "gif", "png"])
    (tmp_path / "images" / "notes.txt").write_text("ignored")
    (tmp_path / "images" / ".DS_Store").write_bytes(b"")
    pairs = find_pairs(tmp_path)
    assert [p.stem for p in pairs] == ["a", "b", "c", "d"]
    assert all(isinstance(p, Pair) and p.image.parent.name == "images" and p.mask.parent.name == "masks"
               for p in pairs)
    assert pairs[0].image.suffix == ".jpg" and pairs[0].mask.suffix == ".png"
    for p in pairs:
        image, mask = check_pair(p, 1)
        assert image.shape[:2] == mask.shape


def test_find_pairs_with_splits(tmp_path):
    make_folder(tmp_path, list("abcdef"), splits={"seed": 7, "train": ["f", "a", "b", "c"], "val": ["d"],
                                                 "test": ["e"]})
    assert [p.stem for p in find_pairs(tmp_path, "train")] == ["a", "b", "c", "f"]
    assert [p.stem for p in find_pairs(tmp_path, "val")] == ["d"]
    assert len(find_pairs(tmp_path)) == 6
    with pytest.raises(DataError) as info:
        find_pairs(tmp_path, "seed")                # not a list of stems
    assert "test, train, val" in str(info.value)


def test_find_pairs_errors_name_the_folder(tmp_path):
    def error(folder, split=None):
        with pytest.raises(DataError) as info:
            find_pairs(folder, split)
        return str(info.value)

    msg = error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg
    (tmp_path / "half" / "images").mkdir(parents=True)
    msg = error(tmp_path / "half")
    assert str(tmp_path / "half") in msg and "masks/" in msg
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    msg = error(tmp_path / "empty")
    assert str(tmp_path / "empty") in msg and "empty" in msg

    odd = make_folder(tmp_path / "odd", [f"s{i}" for i in range(9)])
    for i in range(7):
        (odd / "masks" / f"s{i}.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(odd / "masks" / "orphan.png")
    msg = error(odd)
    assert str(odd) in msg and "s0, s1, s2, s3, s4, ... (7 in all)" in msg and "orphan (1 in all)" in msg

    dup = make_folder(tmp_path / "dup", ["a", "b"])
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(dup / "images" / "a.tif")
    msg = error(dup)
    assert str(dup / "images" / "a.png") in msg and str(dup / "images" / "a.tif") in msg

    nosplit = make_folder(tmp_path / "nosplit", ["a"])
    msg = error(nosplit, "train")
    assert str(nosplit / "splits.json") in msg

    keys = make_folder(tmp_path / "keys", ["a", "b"], splits={"seed": 1, "train": ["a"], "test": ["b"]})
    msg = error(keys, "val")
    assert str(keys / "splits.json") in msg and "'val'" in msg and "test, train" in msg

    ghost = make_folder(tmp_path / "ghost", ["a", "b"], splits={"train": ["a", "zz"]})
    msg = error(ghost, "train")
    assert str(ghost / "splits.json") in msg and "zz" in msg

    broken = make_folder(tmp_path / "broken", ["a"])
    (broken / "splits.json").write_text("{not json")
    assert str(broken / "splits.json") in error(broken, "train")


def test_check_pair_size_mismatch_message():
    pair = Pair("mix", SAMPLES / "nuclei_fluorescence.png", SAMPLES / "nuclei_brightfield_mask.png")
    with pytest.raises(DataError) as info:
        check_pair(pair, 1)
    assert f"image {pair.image} is 256x256 but its mask {pair.mask} is 256x320" in str(info.value)
    image, mask = check_pair(Pair("ok", SAMPLES / "nuclei_brightfield.png",
                                  SAMPLES / "nuclei_brightfield_mask.png"), 1)
    assert image.shape == (256, 320, 3) and mask.shape == (256, 320)


def test_check_pair_bad_classes_and_stack(tmp_path):
    folder = make_folder(tmp_path, ["a"])
    pair = find_pairs(folder)[0]
    with pytest.raises(DataError) as info:
        check_pair(pair, 2)                         # 0/255 mask for a 2-class model
    assert str(pair.mask) in str(info.value) and "class id 255" in str(info.value)
    tifffile.imwrite(folder / "images" / "a.tif", np.zeros((3, 24, 32), np.uint8), photometric="minisblack")
    (folder / "images" / "a.png").unlink()
    pair = find_pairs(folder)[0]
    with pytest.raises(DataError, match="stack") as info:
        check_pair(pair, 1)
    assert str(pair.image) in str(info.value)


@needs_shared
def test_real_dsb2018_split_counts():
    folder = SHARED / "dsb2018"
    counts = {s: len(find_pairs(folder, s)) for s in ("train", "val", "test")}
    assert counts == {"train": 531, "val": 66, "test": 67}
    assert len(find_pairs(folder)) == 664
    pair = find_pairs(folder, "val")[0]
    image, mask = check_pair(pair, 1)
    assert image.shape[:2] == mask.shape and set(np.unique(mask)) <= {0, 1}


@needs_shared
@pytest.mark.parametrize("name", ["kvasir-seg", "busi"])
def test_real_binary_sets_pair_and_load(name):
    pairs = find_pairs(SHARED / name, "test")
    ds = SegmentationDataset(pairs[:3], in_chans=3, num_classes=1, patch_size=64, seed=0)
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)


# --------------------------------------------------------------------------- SegmentationDataset


def blob_image(h, w, seed=0):
    """A two-level image whose mask is ``image > 100``: normalised, mask == (x > 0)."""
    rng = np.random.default_rng(seed)
    field = rng.random((h // 4 + 1, w // 4 + 1)) > 0.5
    image = np.where(np.kron(field, np.ones((4, 4), bool))[:h, :w], 200, 10).astype(np.uint8)
    return image, (image > 100).astype(np.uint8)


def blob_folder(root, sizes, colour=False):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (h, w) in enumerate(sizes):
        image, mask = blob_image(h, w, seed=i)
        if colour:
            image = np.dstack([image, image // 2, image // 3])
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"s{i}.png")
    return find_pairs(root)


def test_dataset_shapes_dtypes_and_length(tmp_path):
    pairs = blob_folder(tmp_path, [(40, 50), (20, 24), (64, 64)])
    for in_chans in (1, 3):
        ds = SegmentationDataset(pairs, in_chans=in_chans, num_classes=1, patch_size=32, seed=3)
        assert len(ds) == 3
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (in_chans, 32, 32) and x.dtype == torch.float32
            assert y.shape == (32, 32) and y.dtype == torch.int64
            assert set(torch.unique(y).tolist()) <= {IGNORE_INDEX, 0, 1}
    ds = SegmentationDataset(pairs, in_chans=3, num_classes=1, patch_size=32, samples_per_epoch=10)
    assert len(ds) == 10 and ds[9][0].shape == (3, 32, 32)
    with pytest.raises(IndexError):
        ds[10]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[1].shape == (4, 32, 32)


def test_dataset_full_item_and_centre_crop(tmp_path):
    pairs = blob_folder(tmp_path, [(40, 50)], colour=True)
    ds = SegmentationDataset(pairs, in_chans=3, num_classes=1, patch_size=32, augment=False)
    x_full, y_full = ds.full_item(0)
    assert x_full.shape == (3, 40, 50) and y_full.shape == (40, 50) and y_full.dtype == torch.int64
    np.testing.assert_array_equal(x_full.numpy(), image_to_channels(read_image(pairs[0].image), 3))
    x, y = ds[0]
    assert_same(x, x_full[:, 4:36, 9:41])
    assert_same(y, y_full[4:36, 9:41])


def test_dataset_pads_masks_with_ignore_index(tmp_path):
    pairs = blob_folder(tmp_path, [(20, 24)])
    ds = SegmentationDataset(pairs, in_chans=1, num_classes=1, patch_size=32, augment=False)
    x, y = ds[0]
    x_full, y_full = ds.full_item(0)
    assert IGNORE_INDEX == -1
    # centred: 6 rows above, 6 below; 4 columns left, 4 right
    assert (y[:6] == -1).all() and (y[26:] == -1).all() and (y[:, :4] == -1).all() and (y[:, 28:] == -1).all()
    assert_same(y[6:26, 4:28], y_full)
    assert_same(x[:, 6:26, 4:28], x_full)
    assert_same(x[:, 5, 4:28], x_full[:, 1])          # reflect padding of the image
    ds = SegmentationDataset(pairs, in_chans=1, num_classes=1, patch_size=32, augment=True, seed=1)
    for i in range(3):
        ds.set_epoch(i)
        x, y = ds[0]
        assert (y == -1).any() and (y >= 0).sum() > 0
        assert torch.isfinite(x).all()


def test_dataset_is_deterministic_given_seed_and_epoch(tmp_path):
    pairs = blob_folder(tmp_path, [(48, 56), (40, 40)])
    a = SegmentationDataset(pairs, in_chans=3, num_classes=1, patch_size=32, seed=5, samples_per_epoch=4)
    b = SegmentationDataset(pairs, in_chans=3, num_classes=1, patch_size=32, seed=5, samples_per_epoch=4)
    c = SegmentationDataset(pairs, in_chans=3, num_classes=1, patch_size=32, seed=6, samples_per_epoch=4)
    first = {i: a[i] for i in (3, 0, 2, 1)}
    for i in (1, 2, 0, 3):                          # the order of requests does not matter
        assert_same(first[i], b[i])
        assert_same(first[i], a.sample(i, epoch=0, draw=0))
    assert any(not torch.equal(first[i][0], c[i][0]) for i in range(4))
    again = [a[i] for i in range(4)]                # the next request of an item: the next draw
    assert any(not torch.equal(first[i][0], again[i][0]) for i in range(4))
    assert_same(again[2], a.sample(2, epoch=0, draw=1))
    a.set_epoch(1)
    assert a.epoch == 1
    fresh = [a[i] for i in range(4)]
    assert any(not torch.equal(first[i][0], fresh[i][0]) for i in range(4))
    assert_same(fresh[3], b.sample(3, epoch=1, draw=0))


def test_dataset_without_augment_is_fixed(tmp_path):
    pairs = blob_folder(tmp_path, [(48, 56)])
    ds = SegmentationDataset(pairs, in_chans=1, num_classes=1, patch_size=32, augment=False)
    assert_same(ds[0], ds[0])
    ds.set_epoch(3)
    assert_same(ds[0], ds.sample(0, epoch=0, draw=0))


def test_dataset_epochs_advance_in_persistent_workers(tmp_path):
    pairs = blob_folder(tmp_path, [(48, 56)])
    ds = SegmentationDataset(pairs, in_chans=1, num_classes=1, patch_size=32, seed=2, samples_per_epoch=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, persistent_workers=True)

    def expected(epoch, draw):
        return torch.stack([ds.sample(i, epoch, draw)[0] for i in range(2)])

    first, second = next(iter(loader))[0], next(iter(loader))[0]
    assert_same(first, expected(0, 0))
    assert_same(second, expected(0, 1))             # new patches without set_epoch
    assert not torch.equal(first, second)
    ds.set_epoch(4)                                 # reaches the running worker
    assert_same(next(iter(loader))[0], expected(4, 0))


def test_dataset_same_patches_with_any_number_of_workers(tmp_path):
    pairs = blob_folder(tmp_path, [(48, 56), (40, 44)])

    def epochs(workers):
        ds = SegmentationDataset(pairs, in_chans=1, num_classes=1, patch_size=32, seed=9, samples_per_epoch=6)
        loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, num_workers=workers,
                                             generator=torch.Generator().manual_seed(0))
        return [torch.cat([x for x, _ in loader]) for _ in range(2)]

    serial, parallel = epochs(0), epochs(2)
    for s, p in zip(serial, parallel):
        assert_same(s, p)
    assert not torch.equal(serial[0], serial[1])


def test_geometric_augmentation_keeps_image_and_mask_aligned(tmp_path):
    pairs = blob_folder(tmp_path, [(48, 56), (40, 36)], colour=True)
    exact = SegmentationDataset(pairs, in_chans=3, num_classes=1, patch_size=32, seed=0, samples_per_epoch=24,
                                scale=None, intensity=0, noise=0)
    seen = set()
    for i in range(len(exact)):
        x, y = exact[i]
        valid = y >= 0
        assert_same((x[0] > 0)[valid], (y == 1)[valid])
        seen.add(x[0].numpy().tobytes())
    assert len(seen) > 12                            # the patches really vary
    full = SegmentationDataset(pairs, in_chans=3, num_classes=1, patch_size=32, seed=0, samples_per_epoch=24)
    for i in range(len(full)):
        x, y = full[i]
        valid = y >= 0
        agree = ((x[0] > 0) == (y == 1))[valid].float().mean().item()
        assert agree > 0.9, agree                   # only rescaled edges may differ


def test_dataset_reports_bad_pairs(tmp_path):
    folder = make_folder(tmp_path, ["a", "b"])
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "masks" / "b.png")
    with pytest.raises(DataError) as info:
        SegmentationDataset(find_pairs(folder), in_chans=3, num_classes=1, patch_size=16)
    assert str(folder / "images" / "b.png") in str(info.value)


def test_dataset_multiclass(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image, _ = blob_image(30, 30)
    mask = np.zeros((30, 30), np.uint8)
    mask[:10], mask[20:] = 1, 2
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    ds = SegmentationDataset(find_pairs(tmp_path), in_chans=1, num_classes=3, patch_size=30, augment=False)
    np.testing.assert_array_equal(ds[0][1].numpy(), mask)


def sparse_folder(root, size=200, objects=((150, 20, 4, 1),)):
    """One ``size``² image, background 10, with square objects (row, col, side, class) of value 200."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = np.full((size, size), 10, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for r, c, side, cls in objects:
        image[r:r + side, c:c + side] = 200
        mask[r:r + side, c:c + side] = cls
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(mask).save(root / "masks" / "a.png")
    return find_pairs(root)


def _patches(ds, n):
    return [ds.sample(0, epoch=0, draw=d) for d in range(n)]


def test_foreground_crops_find_a_small_object_on_a_large_image(tmp_path):
    pairs = sparse_folder(tmp_path)
    exact = dict(scale=None, flips=False, intensity=0, noise=0, samples_per_epoch=1)

    def hit_rate(foreground):
        ds = SegmentationDataset(pairs, 1, 1, patch_size=32, seed=4, foreground=foreground, **exact)
        return np.mean([(y == 1).any().item() for _, y in _patches(ds, 300)])

    uniform, always, default = hit_rate(0.0), hit_rate(1.0), hit_rate(1 / 3)
    assert uniform < 0.1                      # (35/169)² ≈ 4% of uniform crops touch the object
    assert always == 1.0
    assert 0.25 < default < 0.5               # 1/3 placed on it, plus the uniform ones that hit
    assert SegmentationDataset(pairs, 1, 1, patch_size=32).foreground == pytest.approx(1 / 3)


def test_foreground_crops_place_the_object_anywhere_in_the_patch(tmp_path):
    pairs = sparse_folder(tmp_path, objects=((100, 100, 1, 1),))
    ds = SegmentationDataset(pairs, 1, 1, patch_size=16, seed=1, foreground=1.0, scale=None, flips=False,
                             intensity=0, noise=0, samples_per_epoch=1)
    where = set()
    for x, y in _patches(ds, 400):
        (r, c), = torch.nonzero(y == 1).tolist()
        assert x[0, r, c] > 0                 # the image moved with the mask
        where.add((r, c))
    rows, cols = {r for r, _ in where}, {c for _, c in where}
    assert rows == set(range(16)) and cols == set(range(16))   # not always centred


def test_foreground_crops_draw_the_class_first(tmp_path):
    # class 1 covers ~36% of the image, class 2 a 3x3 square: pixel-uniform choice would find class 2 in ~0.1%
    pairs = sparse_folder(tmp_path, objects=((0, 0, 120, 1), (180, 180, 3, 2)))
    ds = SegmentationDataset(pairs, 1, 3, patch_size=32, seed=2, foreground=1.0, scale=None, samples_per_epoch=1)
    rare = np.mean([(y == 2).any().item() for _, y in _patches(ds, 200)])
    assert 0.35 < rare < 0.65


def test_foreground_crops_without_foreground_and_bad_fraction(tmp_path):
    pairs = sparse_folder(tmp_path, objects=())
    ds = SegmentationDataset(pairs, 1, 1, patch_size=32, seed=0, foreground=1.0, samples_per_epoch=1)
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and not (y > 0).any()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="foreground"):
            SegmentationDataset(pairs, 1, 1, patch_size=32, foreground=bad)


def test_augmentation_strength_scales_every_range_together(tmp_path):
    assert augmentation(0) == dict(scale=None, intensity=0.0, noise=0.0)
    assert augmentation(2) == dict(scale=(0.5, 1.5), intensity=pytest.approx(0.4), noise=pytest.approx(0.1))
    default = SegmentationDataset(blob_folder(tmp_path / "d", [(40, 40)]), 1, 1, patch_size=32)
    assert augmentation(1) == dict(scale=default.scale, intensity=default.intensity, noise=default.noise)
    for bad in (-0.5, 3.5):
        with pytest.raises(ValueError, match="augment_strength"):
            augmentation(bad)
    # strength 0: every patch is a flip/rotation of a crop, values untouched; strength 2 moves them
    pairs = blob_folder(tmp_path / "s", [(48, 56)])
    values = set(np.unique(SegmentationDataset(pairs, 1, 1, patch_size=32, augment=False)[0][0].numpy()))
    calm = SegmentationDataset(pairs, 1, 1, patch_size=32, seed=0, samples_per_epoch=8, **augmentation(0))
    wild = SegmentationDataset(pairs, 1, 1, patch_size=32, seed=0, samples_per_epoch=8, **augmentation(2))
    assert all(set(np.unique(calm[i][0].numpy())) <= values for i in range(8))
    assert not any(set(np.unique(wild[i][0].numpy())) <= values for i in range(8))

"""Medical scans (engine/scans.py): every format read and written, checked against a library other
than the one that wrote it, one orientation whatever the file stores, DICOM series, 4-D refused."""
import zlib
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")
nrrd = pytest.importorskip("nrrd")

from napari_medrwkv.engine.imageio import DataError, list_image_files, read_image  # noqa: E402
from napari_medrwkv.engine.scans import (ScanGeometry, is_scan, labels_name, read_scan, scan_stem,  # noqa: E402
                                         write_scan)

SPACING = (0.7, 0.9, 3.0)                 # x, y, z (mm), as ITK holds them
ORIGIN = (-40.0, 25.5, 100.25)            # LPS (mm)


def volume(shape=(5, 12, 16), seed=0):
    """(z, y, x) int16 with structure along every axis, so that any flip or transpose shows."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 2000, shape).astype(np.int16)


def labels_of(shape, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4, shape).astype(np.uint8)


def lps_image(array, spacing=SPACING, origin=ORIGIN, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def itk_affine(spacing, origin, direction):
    """4x4 index (i, j, k) -> LPS mm."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, float).reshape(3, 3) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
OBLIQUE = tuple(sitk.VersorTransform((0.1, 0.2, 0.97), 0.3).GetMatrix())


# ------------------------------------------------------------------ written, read back by another library


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1), OBLIQUE])
def test_labels_written_as_nifti_are_read_by_nibabel_on_the_scans_grid(tmp_path, direction):
    source = tmp_path / "scan.nrrd"
    sitk.WriteImage(lps_image(volume(), direction=direction), str(source))
    scan = read_scan(source)
    labels = labels_of(scan.array.shape)
    out = write_scan(tmp_path / "scan_labels.nii.gz", labels, scan.geometry)
    back = nib.load(str(out))
    stored = np.asarray(back.dataobj)                       # (i, j, k)
    np.testing.assert_array_equal(stored.transpose(2, 1, 0), scan.geometry.to_stored(labels))
    assert stored.dtype == np.uint8
    # NIfTI keeps its affine as float32: equal to that precision (relative 1e-6).
    np.testing.assert_allclose(back.affine, LPS_TO_RAS @ itk_affine(SPACING, ORIGIN, direction), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(back.header.get_zooms(), SPACING, rtol=1e-6)


def test_labels_written_as_nrrd_are_read_by_pynrrd_on_the_scans_grid(tmp_path):
    source = tmp_path / "scan.nii.gz"
    sitk.WriteImage(lps_image(volume(), direction=OBLIQUE), str(source))
    scan = read_scan(source)
    labels = labels_of(scan.array.shape)
    out = write_scan(tmp_path / "scan_labels.nrrd", labels, scan.geometry)
    data, header = nrrd.read(str(out))                      # (i, j, k)
    np.testing.assert_array_equal(data.transpose(2, 1, 0), scan.geometry.to_stored(labels))
    assert header["space"] == "left-posterior-superior"
    source_image = sitk.ReadImage(str(source))
    expected = itk_affine(source_image.GetSpacing(), source_image.GetOrigin(), source_image.GetDirection())
    np.testing.assert_allclose(header["space directions"].T, expected[:3, :3], atol=1e-6)
    np.testing.assert_allclose(header["space origin"], expected[:3, 3], atol=1e-6)


def read_metaimage(path: Path):
    """A MetaImage (.mha) read with numpy and zlib only: header keys, and the (k, j, i) array."""
    raw = path.read_bytes()
    end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    header = dict(line.split(" = ", 1) for line in raw[:end].decode().splitlines())
    dtype = {"MET_UCHAR": np.uint8, "MET_USHORT": np.uint16, "MET_SHORT": np.int16}[header["ElementType"]]
    body = zlib.decompress(raw[end:]) if header.get("CompressedData") == "True" else raw[end:]
    size = [int(n) for n in header["DimSize"].split()]
    return header, np.frombuffer(body, dtype).reshape(size[::-1])


def test_labels_written_as_metaimage_are_read_by_a_plain_parser_on_the_scans_grid(tmp_path):
    source = tmp_path / "scan.nrrd"
    direction = (0, 0, 1, 1, 0, 0, 0, 1, 0)                # stored sagittal: slices along x
    sitk.WriteImage(lps_image(volume(), direction=direction), str(source))
    scan = read_scan(source)
    labels = labels_of(scan.array.shape)
    out = write_scan(tmp_path / "scan_labels.mha", labels, scan.geometry)
    header, stored = read_metaimage(out)
    np.testing.assert_array_equal(stored, scan.geometry.to_stored(labels))
    np.testing.assert_allclose([float(v) for v in header["ElementSpacing"].split()], SPACING, atol=1e-6)
    np.testing.assert_allclose([float(v) for v in header["Offset"].split()], ORIGIN, atol=1e-6)
    # MetaImage's TransformMatrix lists the direction matrix column after column.
    matrix = np.array([float(v) for v in header["TransformMatrix"].split()]).reshape(3, 3).T
    np.testing.assert_allclose(matrix, np.reshape(direction, (3, 3)), atol=1e-6)


def test_scans_read_the_files_written_by_other_libraries(tmp_path):
    """nibabel and pynrrd write; read_scan must agree with what they were told."""
    data = volume()                                          # (z, y, x)
    affine = np.diag([-0.7, -0.9, 3.0, 1.0])                 # RAS: i runs right->left, j anterior->posterior
    affine[:3, 3] = (40.0, -25.5, 100.25)
    nib.save(nib.Nifti1Image(data.transpose(2, 1, 0), affine), str(tmp_path / "a.nii.gz"))
    nrrd.write(str(tmp_path / "a.nrrd"), data.transpose(2, 1, 0),
               {"space": "left-posterior-superior", "space directions": np.diag(SPACING),
                "space origin": np.array(ORIGIN)})
    from_nifti, from_nrrd = read_scan(tmp_path / "a.nii.gz"), read_scan(tmp_path / "a.nrrd")
    np.testing.assert_array_equal(from_nifti.array, data)
    np.testing.assert_array_equal(from_nrrd.array, data)
    for scan in (from_nifti, from_nrrd):
        np.testing.assert_allclose(scan.geometry.spacing, SPACING[::-1], rtol=1e-6)
        np.testing.assert_allclose(scan.geometry.origin, ORIGIN[::-1], rtol=1e-6)


# ------------------------------------------------------------------ one orientation


def test_a_scan_stored_ras_reads_as_the_same_array_and_place_as_one_stored_lps(tmp_path):
    data = volume()
    sitk.WriteImage(lps_image(data), str(tmp_path / "lps.nrrd"))
    # The same voxels stored the NIfTI way: i right->left... reversed, so x and y run the other way.
    ras = data[:, ::-1, ::-1]
    nz, ny, nx = data.shape
    corner = np.array(ORIGIN) + np.array(SPACING) * [nx - 1, ny - 1, 0]    # LPS of the stored voxel 0
    affine = np.diag([SPACING[0], SPACING[1], SPACING[2], 1.0])            # RAS axes: i toward R, j toward A
    affine[:3, 3] = [-corner[0], -corner[1], corner[2]]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(ras.transpose(2, 1, 0)), affine), str(tmp_path / "ras.nii.gz"))
    lps, ras_scan = read_scan(tmp_path / "lps.nrrd"), read_scan(tmp_path / "ras.nii.gz")
    np.testing.assert_array_equal(ras_scan.array, lps.array)
    np.testing.assert_allclose(ras_scan.geometry.spacing, lps.geometry.spacing, rtol=1e-6)
    np.testing.assert_allclose(ras_scan.geometry.origin, lps.geometry.origin, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(ras_scan.geometry.direction, lps.geometry.direction, atol=1e-6)
    assert ras_scan.geometry.stored_flips == (False, True, True)


def test_a_scan_acquired_sagittally_reads_axially_and_names_its_slice_axis(tmp_path):
    data = volume((6, 10, 14))                               # stored (k, j, i)
    # The matrix's columns are the index axes' directions: i toward P, j toward S, k (the slices) toward L.
    direction = (0, 0, 1, 1, 0, 0, 0, 1, 0)
    sitk.WriteImage(lps_image(data, direction=direction), str(tmp_path / "sag.mha"))
    scan = read_scan(tmp_path / "sag.mha")
    assert scan.array.shape == (10, 14, 6)                  # (S = j, P = i, L = k)
    assert scan.geometry.slice_axis == 2
    np.testing.assert_array_equal(scan.array, data.transpose(1, 2, 0))
    np.testing.assert_allclose(scan.geometry.spacing, (SPACING[1], SPACING[0], SPACING[2]))
    np.testing.assert_allclose(scan.geometry.direction, np.eye(3)[::-1], atol=1e-12)
    # Physical place: the voxel at array index (a, b, c) lies at LPS origin + (c, b, a) * spacing.
    index = np.array([3, 5, 2])
    point = np.asarray(scan.geometry.origin) + index * scan.geometry.spacing   # (S, P, L)
    itk_index = (int(index[1]), int(index[0]), int(index[2]))                 # (i = P, j = S, k = L)
    np.testing.assert_allclose(point[::-1], sitk.ReadImage(str(tmp_path / "sag.mha"))
                               .TransformIndexToPhysicalPoint(itk_index), atol=1e-9)


def test_geometry_survives_layer_metadata(tmp_path):
    sitk.WriteImage(lps_image(volume(), direction=OBLIQUE), str(tmp_path / "a.nrrd"))
    geometry = read_scan(tmp_path / "a.nrrd").geometry
    import json
    assert ScanGeometry.from_metadata(json.loads(json.dumps(geometry.to_metadata()))) == geometry
    with pytest.raises(ValueError, match="read the scan again"):
        ScanGeometry.from_metadata({"spacing": [1, 1, 1]})


# ------------------------------------------------------------------ DICOM


def write_dicom_series(folder: Path, array, uid: str, spacing=(0.8, 0.8, 2.5), description=None, number=None):
    """One DICOM file per slice of ``array`` (z, y, x), as a scanner would store the series."""
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z, plane in enumerate(array):
        image = sitk.GetImageFromArray(plane[None])
        image.SetSpacing(spacing)
        image.SetOrigin((0.0, 0.0, z * spacing[2]))
        for tag, value in (("0020|000e", uid), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0008|0060", "CT"), ("0020|0013", str(z + 1)),
                           ("0008|0018", f"{uid}.{z + 1}"),
                           ("0020|0032", f"0\\0\\{z * spacing[2]}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0018|0050", str(spacing[2]))) + \
                (("0008|103e", description),) * (description is not None) + (("0020|0011", number),) * (number is not None):
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid.rsplit('.', 1)[-1]}_{z:03d}.dcm"))
        writer.Execute(image)


def test_a_dicom_folder_with_two_series_reads_the_largest_and_says_so_or_the_one_named(tmp_path):
    small, large = volume((3, 8, 8), seed=3), volume((6, 8, 8), seed=4)
    write_dicom_series(tmp_path / "study", small, "1.2.826.0.1.3680043.2.1125.11")
    write_dicom_series(tmp_path / "study", large, "1.2.826.0.1.3680043.2.1125.22")
    scan = read_scan(tmp_path / "study")
    np.testing.assert_array_equal(scan.array, large)
    assert "2 DICOM series" in scan.note and "1.2.826.0.1.3680043.2.1125.22" in scan.note
    assert "1.2.826.0.1.3680043.2.1125.11 (3 slices)" in scan.note
    np.testing.assert_allclose(scan.geometry.spacing, (2.5, 0.8, 0.8), rtol=1e-6)
    chosen = read_scan(tmp_path / "study", series="1.2.826.0.1.3680043.2.1125.11")
    np.testing.assert_array_equal(chosen.array, small)
    assert chosen.note is None
    with pytest.raises(DataError, match=r"no DICOM series '9\.9'.*\(6 slices\)"):
        read_scan(tmp_path / "study", series="9.9")
    # A folder of DICOM files is one input to `medrwkv segment`, read as a scan.
    assert is_scan(tmp_path / "study") and list_image_files([tmp_path / "study"]) == [tmp_path / "study"]
    np.testing.assert_array_equal(read_image(tmp_path / "study"), large)
    assert labels_name(tmp_path / "study") == "study_labels.nii.gz"


# ------------------------------------------------------------------ errors and safety


def test_a_4d_nifti_is_refused_naming_the_file_and_what_to_do(tmp_path):
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 3), np.int16), np.eye(4)), str(path))
    with pytest.raises(DataError, match=r"fmri\.nii\.gz is 4-D .*pick one"):
        read_scan(path)
    one = tmp_path / "one.nii.gz"                           # a single volume stored 4-D is a volume
    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(6, 5, 4, 1), np.eye(4)), str(one))
    assert read_scan(one).array.shape == (4, 5, 6)


def test_a_damaged_scan_is_refused_naming_it(tmp_path):
    path = tmp_path / "broken.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n" + b"\0" * 50)
    with pytest.raises(DataError, match=r"cannot read scan .*broken\.nrrd"):
        read_scan(path)
    with pytest.raises(DataError, match="does not exist"):
        read_scan(tmp_path / "missing.nii.gz")


def test_labels_are_never_written_over_an_existing_file_unless_asked(tmp_path):
    sitk.WriteImage(lps_image(volume()), str(tmp_path / "a.nrrd"))
    scan = read_scan(tmp_path / "a.nrrd")
    target = tmp_path / "a_labels.nii.gz"
    write_scan(target, np.ones(scan.array.shape, np.uint8), scan.geometry)
    before = target.read_bytes()
    with pytest.raises(FileExistsError):
        write_scan(target, np.zeros(scan.array.shape, np.uint8), scan.geometry)
    assert target.read_bytes() == before
    write_scan(target, np.zeros(scan.array.shape, np.uint8), scan.geometry, overwrite=True)
    assert not np.asarray(nib.load(str(target)).dataobj).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nrrd", "a_labels.nii.gz"]    # no temporary left
    with pytest.raises(ValueError, match="labels must have the scan's shape"):
        write_scan(tmp_path / "b.nii.gz", np.zeros((2, 2, 2), np.uint8), scan.geometry)
    with pytest.raises(ValueError, match="use .mha or .nrrd"):
        write_scan(tmp_path / "b.mhd", np.zeros(scan.array.shape, np.uint8), scan.geometry)


def test_names_of_scans_and_their_labels():
    assert scan_stem("brain.nii.gz") == "brain" and scan_stem("x/ct.MHA") == "ct"
    assert labels_name("brain.nii") == "brain_labels.nii.gz"
    assert labels_name("brain.nrrd") == "brain_labels.nrrd" and labels_name("a.mhd") == "a_labels.mha"
    assert not is_scan("photo.png")


# ------------------------------------------------------------------ the shared scans


def test_the_shared_brain_scan_and_its_label_read_and_write_back_exactly(shared_data, tmp_path):
    folder = shared_data / "volumes"
    if not (folder / "brain1_label.nrrd").is_file():
        pytest.skip(f"{folder} has no brain1 scan")
    image, label = read_scan(folder / "brain1_image.nrrd"), read_scan(folder / "brain1_label.nrrd")
    assert image.array.shape == label.array.shape == (25, 256, 256)
    np.testing.assert_allclose(image.geometry.spacing, (6.5, 0.78125, 0.78125), rtol=1e-6)
    assert image.geometry.slice_axis == 0 and int(label.array.sum()) == 4137
    source, source_header = nrrd.read(str(folder / "brain1_label.nrrd"))
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        out = write_scan(tmp_path / f"brain1_labels{suffix}", label.array, image.geometry)
        if suffix == ".nrrd":
            data, header = nrrd.read(str(out))
            np.testing.assert_array_equal(data, source)
            np.testing.assert_allclose(header["space directions"], source_header["space directions"], atol=1e-6)
            np.testing.assert_allclose(header["space origin"], source_header["space origin"], atol=1e-6)
        elif suffix == ".nii.gz":
            back = nib.load(str(out))
            np.testing.assert_array_equal(np.asarray(back.dataobj), source)
            affine = np.eye(4)
            affine[:3, :3] = source_header["space directions"].T
            affine[:3, 3] = source_header["space origin"]
            np.testing.assert_allclose(back.affine, LPS_TO_RAS @ affine, rtol=1e-6, atol=1e-5)
        else:
            header, data = read_metaimage(out)
            np.testing.assert_array_equal(data, source.transpose(2, 1, 0))
        np.testing.assert_array_equal(read_scan(out).array, label.array)


MRICRON = Path("/usr/share/mricron/templates")


def test_the_debian_brain_atlas_writes_back_exactly(tmp_path):
    """Debian's mricron-data (apt-get install mricron-data): a RAS NIfTI, 181x217x181 regions."""
    if not (MRICRON / "aal.nii.gz").is_file():
        pytest.skip(f"{MRICRON} is absent (apt-get install mricron-data)")
    atlas = read_scan(MRICRON / "aal.nii.gz")
    assert atlas.array.shape == (181, 217, 181) and atlas.geometry.stored_flips == (False, True, True)
    assert read_scan(MRICRON / "ch2.nii.gz").geometry.origin == atlas.geometry.origin     # the atlas's brain
    out = write_scan(tmp_path / "aal_labels.nii.gz", atlas.array, atlas.geometry)
    source, back = nib.load(str(MRICRON / "aal.nii.gz")), nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(source.dataobj))
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-6)


# ------------------------------------------------------------------ segmenting a scan


def nuclei_scan(tmp_path, name="cells.nii.gz"):
    """Five grey crops of the bundled nuclei sample stored as sagittal slices of a scan (so the
    acquisition's planes are the array's last axis), spacing 0.5 x 0.5 x 4 mm."""
    from conftest import SAMPLES
    sample = read_image(SAMPLES / "nuclei_fluorescence.png")
    sample = sample[..., 0] if sample.ndim == 3 else sample
    planes = np.stack([sample[20 * z: 20 * z + 64, 10 * z: 10 * z + 80] for z in range(5)])    # (k, j, i)
    path = tmp_path / name
    sitk.WriteImage(lps_image(planes, spacing=(0.5, 0.5, 4.0), direction=(0, 0, 1, 1, 0, 0, 0, 1, 0)), str(path))
    return path, planes


def test_nm_segment_takes_a_scan_path_and_segments_the_acquired_planes(tmp_path):
    import napari_medrwkv as nm
    path, planes = nuclei_scan(tmp_path)
    model = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    labels = nm.segment(str(path), model=model)
    scan = read_scan(path)
    assert labels.shape == scan.array.shape and scan.geometry.slice_axis == 2
    per_plane = nm.segment(planes, model=model)             # the planes as stored, one by one
    np.testing.assert_array_equal(scan.geometry.to_stored(labels), per_plane)
    assert 0.05 < per_plane.mean() < 0.6                    # nuclei found, not everything
    axial = nm.segment(path, model=model, return_probabilities=True)
    assert axial[0].shape == axial[1].shape == labels.shape


def test_medrwkv_segment_writes_a_scans_labels_in_its_format_on_its_grid(tmp_path, capsys):
    from napari_medrwkv.cli import main
    import napari_medrwkv as nm
    path, planes = nuclei_scan(tmp_path, "cells.nrrd")
    out = tmp_path / "out"
    assert main(["segment", "--model", "rwkv_unet_t-dsb2018", "--device", "cpu", "--probabilities", str(path),
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cells_labels.nrrd", "cells_probabilities.nrrd"]
    data, header = nrrd.read(str(out / "cells_labels.nrrd"))
    _, source_header = nrrd.read(str(path))
    np.testing.assert_array_equal(data.transpose(2, 1, 0), nm.segment(planes, model="rwkv_unet_t-dsb2018",
                                                                       device="cpu"))
    np.testing.assert_allclose(header["space directions"], source_header["space directions"], atol=1e-9)
    np.testing.assert_allclose(header["space origin"], source_header["space origin"], atol=1e-9)
    probs, _ = nrrd.read(str(out / "cells_probabilities.nrrd"))
    assert probs.dtype == np.float32 and probs.shape == data.shape
    # Axial planes asked for: a different result, on the same grid; a second run never replaces the first.
    assert main(["segment", "--model", "rwkv_unet_t-dsb2018", "--device", "cpu", "--planes", "axial", str(path),
                 "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["segment", "--model", "rwkv_unet_t-dsb2018", "--device", "cpu", "--planes", "axial", str(path),
                 "--out", str(out), "--overwrite"]) == 0
    axial, _ = nrrd.read(str(out / "cells_labels.nrrd"))
    assert axial.shape == data.shape and not np.array_equal(axial, data)


# ------------------------------------------------------------------ training folders of scans


def scan_folder(tmp_path, count=2):
    """images/ and masks/ holding scans (NIfTI images, NRRD masks), a blob on the middle slices."""
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for n in range(count):
        image = volume((4, 40, 48), seed=n)
        mask = np.zeros(image.shape, np.uint8)
        mask[1:3, 10:20, 12 + n:30] = 1
        image[mask > 0] += 3000
        sitk.WriteImage(lps_image(image), str(tmp_path / "images" / f"case{n}.nii.gz"))
        sitk.WriteImage(lps_image(mask), str(tmp_path / "masks" / f"case{n}.nrrd"))
    return tmp_path


def test_a_training_folder_of_scans_is_read_slice_by_slice(tmp_path):
    from napari_medrwkv.engine.datasets import SegmentationDataset, check_pair, find_pairs
    folder = scan_folder(tmp_path)
    (folder / "splits.json").write_text('{"train": ["case0"], "val": ["case1"]}')
    pairs = find_pairs(folder)
    assert [p.stem for p in pairs] == [f"case{n}_z{z:03d}" for n in range(2) for z in range(4)]
    assert [p.stem for p in find_pairs(folder, "val")] == [f"case1_z{z:03d}" for z in range(4)]
    image, mask = check_pair(pairs[5], 1)                    # case1, slice 1
    np.testing.assert_array_equal(image, read_scan(folder / "images" / "case1.nii.gz").array[1])
    assert mask.shape == (40, 48) and mask.sum() == 10 * 17 and mask.dtype == np.int64
    dataset = SegmentationDataset(pairs, in_chans=3, num_classes=1, patch_size=32)
    x, y = dataset.full_item(1)
    assert tuple(x.shape) == (3, 40, 48) and int(y.sum()) == 10 * 18


def test_training_and_evaluating_on_a_folder_of_scans(tmp_path):
    import napari_medrwkv as nm
    folder = scan_folder(tmp_path)
    scores = nm.evaluate("rwkv_unet_t-busi", folder, device="cpu")
    assert scores["n"] == 8 and 0 <= scores["dice"] <= 1
    result = nm.train("rwkv_unet_t-busi", folder, epochs=1, device="cpu",
                      config=nm.TrainConfig.few_shot(patch_size=32, samples_per_epoch=4))
    assert len(result.history) == 1


def test_a_scan_with_a_mask_on_another_grid_is_refused_naming_both(tmp_path):
    from napari_medrwkv.engine.datasets import find_pairs
    folder = scan_folder(tmp_path, count=1)
    sitk.WriteImage(lps_image(np.zeros((4, 40, 48), np.uint8), spacing=(1, 1, 1)), str(folder / "masks" / "case0.nrrd"))
    with pytest.raises(DataError, match=r"case0\.nii\.gz .*masks/case0\.nrrd .* not on one grid"):
        find_pairs(folder)


# ------------------------------------------------------------------ CT windows


def test_a_ct_window_maps_its_range_as_the_percentiles_would_and_clips_the_rest():
    from napari_medrwkv.engine.preprocess import CT_WINDOWS, NORMALIZATION, normalize_window
    hu = np.array([-1000, -160, -60, 40, 240, 1500], np.int16)
    low, high = CT_WINDOWS["soft tissue"][0] - 200, CT_WINDOWS["soft tissue"][0] + 200
    expected = ((np.clip(hu, low, high) - low) / (high - low) - NORMALIZATION["center"]) / NORMALIZATION["scale"]
    np.testing.assert_allclose(normalize_window(hu, "soft tissue"), expected, rtol=1e-6)
    np.testing.assert_allclose(normalize_window(hu, (40, 400)), expected, rtol=1e-6)
    assert normalize_window(hu, "lung")[0] == normalize_window(hu, "lung").min() > -2.01
    for bad in ("liver", (40, 0), (40,), "40,400"):
        with pytest.raises(ValueError, match="window"):
            normalize_window(hu, bad)


def test_segment_with_a_window_sees_the_slice_through_that_window(tmp_path):
    """With at least 1 % of the pixels beyond each end of the window, the percentiles of the
    clipped slice are the window's ends: the same input, so the same labels."""
    import napari_medrwkv as nm
    path, planes = nuclei_scan(tmp_path)
    ct = planes.astype(np.int16) * 8 - 900                  # nuclei bright on a dark ground, in "HU"
    ct[:, :4] = -1000                                       # air, beyond the window's low end
    ct[:, -4:] = 1500                                       # bone, beyond its high end
    model = nm.load_model("rwkv_unet_t-dsb2018", device="cpu")
    windowed = nm.segment(ct, model=model, window=(-500, 600))
    np.testing.assert_array_equal(windowed, nm.segment(np.clip(ct, -800, -200), model=model))
    assert not np.array_equal(windowed, nm.segment(ct, model=model))
    with pytest.raises(ValueError, match="window"):
        nm.segment(ct, model=model, window="liver")


def test_medrwkv_segment_takes_a_window(tmp_path, capsys):
    from napari_medrwkv.cli import main
    path, _ = nuclei_scan(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_code:
        main(["segment", "--model", "rwkv_unet_t-dsb2018", "--device", "cpu", "--window", "liver", str(path),
              "--out", str(out)])
    assert exit_code.value.code == 2
    assert "soft-tissue, lung, bone, brain or LEVEL,WIDTH" in capsys.readouterr().err
    assert main(["segment", "--model", "rwkv_unet_t-dsb2018", "--device", "cpu", "--window", "40,400", str(path),
                 "--out", str(out)]) == 0
    assert (out / "cells_labels.nii.gz").is_file()


def test_without_simpleitk_folders_are_not_scans_and_scan_files_say_what_to_install(tmp_path, monkeypatch):
    import sys
    write_dicom_series(tmp_path / "study", volume((2, 8, 8)), "1.2.826.0.1.3680043.2.1125.33")
    sitk.WriteImage(lps_image(volume()), str(tmp_path / "a.nrrd"))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)      # import SimpleITK now fails
    assert not is_scan(tmp_path / "study")                  # e.g. a zarr store given to nm.segment
    with pytest.raises(ImportError, match=r"napari-medrwkv\[medical\]"):
        read_scan(tmp_path / "a.nrrd")

"""Inputs in the usual on-disk layouts: samples, labels as the model numbers classes, boxes in the input's pixels."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixture_data import hand_boxes, ilsvrc_ids, imagenet_wnids, write_image_folder, write_imagenet_val, write_voc2007
from shapcam_ext.cli import distributed
from shapcam_ext.cli.boxes import box_to_input, read_voc_xml
from shapcam_ext.cli.datasets import (
    VOC_CLASSES, add_json_boxes, detect_format, from_paths, one_per_image, open_data, unique_names,
)
from shapcam_ext.cli.images import bundled_photos
from shapcam_ext.cli.imagenet import read_meta
from shapcam_ext.cli.loader import SampleImages, batches
from shapcam_ext.cli.preprocessing import LITE0_PREPROCESS, PreprocessConfig, to_display_rgb
from shapcam_ext.metrics import box_mask

TINY = PreprocessConfig(input_size=(32, 32), crop_pct=1.0, crop_mode="squash")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, write_imagenet_val(root)


def test_imagenet_flat_validation_files_get_their_devkit_labels_and_xml_boxes(imagenet):
    root, entries = imagenet
    found = open_data(str(root), boxes=root / "bbox_val")
    assert found.layout == "imagenet" and detect_format(str(root)) == "imagenet"
    assert [s.image for s in found.samples] == [e["path"] for e in entries]
    assert [s.label for s in found.samples] == [e["label"] for e in entries]  # devkit ids -> sorted-wnid indices
    assert [s.key for s in found.samples] == [e["path"].stem for e in entries]
    for sample, entry in zip(found.samples, entries):
        assert list(sample.boxes) == entry["boxes"]  # 0-based inclusive XML back to half-open pixels
    assert ilsvrc_ids()[imagenet_wnids()[entries[0]["label"]]] != entries[0]["label"] + 1  # the ids are not the order


def test_the_devkit_reads_the_same_from_its_archive_and_torchvisions_meta_bin(imagenet, tmp_path):
    root, _ = imagenet
    folder = read_meta(root / "ILSVRC2012_devkit_t12")
    with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as archive:
        archive.add(root / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    assert read_meta(tmp_path / "ILSVRC2012_devkit_t12.tar.gz") == folder
    assert len(folder.wnids) == 1000 and list(folder.wnids) == imagenet_wnids()  # ancestors left out
    torch.save(({w: (n, "more") for w, n in zip(folder.wnids, folder.names)}, list(folder.val_wnids)),
               tmp_path / "meta.bin")  # what torchvision's ImageNet writes
    assert read_meta(tmp_path / "meta.bin") == folder


def test_imagenet_class_folders_are_numbered_as_imagenet_not_as_found(tmp_path):
    entries = write_imagenet_val(tmp_path, photos=["coffee", "rocket"], class_folders=True)
    shutil.rmtree(tmp_path / "ILSVRC2012_devkit_t12")  # the folder names alone carry the labels
    found = open_data(str(tmp_path / "val"), layout="imagenet", boxes=tmp_path / "bbox_val")
    assert sorted(s.label for s in found.samples) == sorted(e["label"] for e in entries) == [657, 967]
    assert all(s.boxes for s in found.samples)
    generic = open_data(str(tmp_path / "val"))  # auto: an ImageFolder of wnids is ImageNet too
    assert generic.layout == "imagefolder" and [s.label for s in generic.samples] == [s.label for s in found.samples]


def test_voc2007_gives_one_sample_per_class_with_its_boxes(tmp_path):
    stored = write_voc2007(tmp_path)
    found = open_data(str(tmp_path))
    assert found.layout == "voc" and found.class_names == VOC_CLASSES
    assert [s.key for s in found.samples] == ["000001_cat", "000002_aeroplane", "000002_person",
                                              "000003_motorbike", "000003_person"]  # the difficult chair is out
    person = found.samples[4]
    assert person.label == VOC_CLASSES.index("person") and person.boxes == ((9, 9, 60, 90), (599, 19, 700, 100))
    assert open_data(str(tmp_path / "VOCdevkit" / "VOC2007")).samples == found.samples
    assert [s.key for s in one_per_image(found).samples] == ["000001_cat", "000002_aeroplane", "000003_motorbike"]
    with pytest.raises(ValueError, match="trainval"):
        open_data(str(tmp_path), split="trainval")
    assert stored["000001"][0][0] == "cat"


def test_imagefolder_numbers_named_classes_like_torchvision(tmp_path):
    write_image_folder(tmp_path, {"zebra_like": ["horse"], "cats": ["chelsea", "coffee"]})
    found = open_data(str(tmp_path))
    assert found.layout == "imagefolder" and found.class_names == ("cats", "zebra_like")
    assert [(s.image.name, s.label) for s in found.samples] == [("chelsea.png", 0), ("coffee.png", 0),
                                                                ("horse.png", 1)]


def test_a_folder_a_glob_and_a_file_list_give_the_same_samples(tmp_path):
    photos = tmp_path / "photos"
    write_image_folder(tmp_path, {"photos": ["coffee", "chelsea", "horse"]})
    (photos / "notes.txt").write_text("not an image")
    (tmp_path / "list.txt").write_text("# three photos\nphotos/chelsea.png\n\nphotos/coffee.png\nphotos/horse.png\n")
    folder, pattern, listed = (open_data(str(p)) for p in (photos, tmp_path / "photos" / "*.png",
                                                            tmp_path / "list.txt"))
    assert folder.samples == pattern.samples == listed.samples
    assert [s.key for s in folder.samples] == ["chelsea", "coffee", "horse"] and folder.layout == "files"
    with pytest.raises(ValueError, match="no images found"):
        open_data(str(tmp_path / "*.jpg"))
    with pytest.raises(ValueError, match="no such folder"):
        open_data(str(tmp_path / "missing"))


def test_json_boxes_give_one_sample_per_object_and_name_unknown_images(tmp_path):
    photos = from_paths(bundled_photos().values())
    found = add_json_boxes(photos, Path(__file__).resolve().parent.parent / "experiments" / "boxes.json")
    objects = hand_boxes()
    assert len(found.samples) == len(objects) + len(photos.samples) - len({o["image"] for o in objects})
    helmet = next(s for s in found.samples if s.label == 518)
    assert helmet.key == "astronaut_518" and helmet.image.stem == "astronaut" and helmet.boxes == ((275, 342, 500, 512),)
    (tmp_path / "bad.json").write_text('{"objects": [{"image": "nowhere", "class_index": 1, "boxes": [[0, 0, 1, 1]]}]}')
    with pytest.raises(ValueError, match="nowhere"):
        add_json_boxes(photos, tmp_path / "bad.json")


def test_unique_names_number_repeats_in_order():
    assert unique_names(["a", "b", "a", "a", "a_1"]) == ["a", "b", "a_1", "a_2", "a_1_1"]


def test_voc_xml_skips_difficult_objects_and_names_a_broken_box(tmp_path):
    (tmp_path / "a.xml").write_text("<annotation><object><name>dog</name><bndbox><xmin>1</xmin><ymin>2</ymin>"
                                    "<xmax>10</xmax></bndbox></object></annotation>")
    with pytest.raises(ValueError, match="bndbox"):
        read_voc_xml(tmp_path / "a.xml", one_based=True)
    (tmp_path / "b.xml").write_text("not xml")
    with pytest.raises(ValueError, match="not a readable XML"):
        read_voc_xml(tmp_path / "b.xml", one_based=True)


@pytest.mark.parametrize("cfg", [
    LITE0_PREPROCESS,
    PreprocessConfig(input_size=(224, 224), crop_pct=0.875, crop_mode="center"),
    PreprocessConfig(input_size=(160, 200), crop_pct=0.9, crop_mode="center"),
])
@pytest.mark.parametrize("size", [(300, 200), (180, 260)])
def test_boxes_land_where_the_preprocessing_puts_their_pixels(cfg, size):
    box = (40, 50, 130, 170)
    canvas = np.zeros((size[1], size[0], 3), np.uint8)
    canvas[box[1]:box[3], box[0]:box[2]] = 255
    shown = to_display_rgb(Image.fromarray(canvas), cfg)[..., 0] > 0.5
    mapped = box_mask(shown.shape, box_to_input(box, size, cfg))
    assert (shown != mapped).sum() <= shown.shape[0] + shown.shape[1]  # at most a one-pixel rim


def test_the_loader_shares_samples_once_each_and_reports_an_unreadable_image(tmp_path, monkeypatch):
    write_image_folder(tmp_path, {"photos": ["chelsea", "coffee", "horse", "rocket"]})
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png")
    found = open_data(str(tmp_path / "photos"))
    seen = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        images = SampleImages(found.samples, TINY, range(len(found.samples)), skip=frozenset({3}))
        assert len(images) == 6  # five samples padded to a multiple of 3
        loaded = list(batches(images, batch_size=2, workers=0))
        assert len(loaded) == 1  # every rank runs as many batches
        for batch in loaded:
            seen += batch.indices + [i for i, _, _ in batch.failures] + batch.skipped
            assert batch.x is None or batch.x.shape == (len(batch.indices), 3, 32, 32)
            for index, message, trace in batch.failures:
                assert found.samples[index].image.name == "broken.png" and "broken.png" in message
                assert trace.startswith("Traceback")
    assert sorted(seen) == list(range(5))


def test_explain_reads_a_dataset_through_workers_in_batches_and_keeps_what_is_done(tmp_path, monkeypatch):
    import io
    import json
    from contextlib import redirect_stderr, redirect_stdout

    from fixture_data import tiny_classifier
    from shapcam_ext.cli import main
    from shapcam_ext.cli import session as session_module

    model, cfg = tiny_classifier()
    monkeypatch.setattr(session_module, "load_model", lambda name, weights=None: (model, cfg))
    entries = write_imagenet_val(tmp_path / "imagenet", photos=["chelsea", "coffee", "rocket"])
    args = ["explain", "--data", tmp_path / "imagenet", "--target", "label", "--layer", "features", "--permutations",
            "4", "--batch-size", "2", "--workers", "2", "--no-figures", "--json", "--out", tmp_path / "out"]

    def run():
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in args])
        return code, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()

    code, records, err = run()
    assert code == 0, err
    assert [r["target"]["index"] for r in records] == [r["label"] for r in records] == [e["label"] for e in entries]
    assert [r["key"] for r in records] == [e["path"].stem for e in entries]
    assert all(r["status"] == "explained" and r["png"] is None for r in records)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{e['path'].stem}_shapcam.npz" for e in entries]
    code, again, err = run()
    assert code == 0 and [r["status"] for r in again] == ["kept"] * 3 and "keeping the outputs of 3 of 3" in err

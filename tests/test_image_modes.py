"""Every stage reads an image through one function (gpt4image/images.py): 16-bit and float greyscale
are scaled (a 0..65535 ramp stays a ramp), transparency is composited over white, CMYK converted,
modes with no agreed 8-bit meaning refused by name; an RGB file is used exactly as decoded."""
import argparse
import os

import numpy as np
import pytest
from PIL import Image

from gpt4image.images import BACKGROUND

RAMP = np.arange(256, dtype=np.uint8)[None].repeat(2, 0)  # the 8-bit ramp every mode below must give


def _save(folder, name, image):
    path = os.path.join(folder, name)
    image.save(path)
    return path


def _palette_with_transparency():
    image = Image.fromarray(RAMP, "L").convert("P")
    image.info["transparency"] = int(np.asarray(image)[0, 0])
    return image


# mode -> (file name, image, expected 8-bit RGB [H, W, 3])
def _cases():
    grey = np.repeat(RAMP[..., None], 3, axis=2)
    alpha = np.full_like(RAMP, 255)
    alpha[:, :128] = 0
    composited = grey.copy()
    composited[:, :128] = BACKGROUND
    p = _palette_with_transparency()
    p_expected = grey.copy()
    p_expected[np.asarray(p) == p.info["transparency"]] = BACKGROUND
    cmyk = Image.fromarray(np.stack([RAMP, 255 - RAMP, RAMP // 2, RAMP // 3], axis=2), "CMYK")
    return {
        "I;16": ("a.png", Image.fromarray(RAMP.astype(np.uint16) * 257), grey),
        "I;16B": ("a.tif", Image.frombytes("I;16B", (256, 2), (RAMP.astype(">u2") * 257).tobytes()), grey),
        "I": ("a.tif", Image.fromarray(RAMP.astype(np.int32) * 257, "I"), grey),
        "F": ("a.tif", Image.fromarray(RAMP.astype(np.float32) / 255, "F"), grey),
        "CMYK": ("a.tif", cmyk, np.asarray(cmyk.convert("RGB"))),
        "P+transparency": ("a.png", p, p_expected),
        "LA": ("a.png", Image.fromarray(np.stack([RAMP, alpha], axis=2), "LA"), composited),
        "RGBA": ("a.png", Image.fromarray(np.concatenate([grey, alpha[..., None]], axis=2), "RGBA"), composited),
    }


def _resnet_training(path):
    from gpt4image.train.data import build_image_folders
    train, _ = build_image_folders(_as_dataset(path), None, None)
    return train[0][0]


def _deit_training(path):
    from gpt4image.recipes.deit_data import build_datasets
    args = argparse.Namespace(data_path=_as_dataset(path), data_set="IMNET", input_size=16, aa="none",
                              color_jitter=0.0, train_interpolation="bicubic", eval_crop_ratio=0.875)
    train, _, _ = build_datasets(args)
    train.transform = None
    return train[0][0]


def _generate_descriptions(path):
    from gpt4image.describe.listing import ImageItem
    from gpt4image.describe.loading import PromptBatches
    good, (prompts, images), failures = PromptBatches([ImageItem(index=0, path="a", file=path)], 1, None,
                                                      lambda item: "p", preprocess=False)[0]
    assert not failures, failures
    return images[0]


def _as_dataset(path):
    """An ImageFolder root (train/ and val/, one class) holding only ``path``."""
    root = os.path.join(os.path.dirname(path), "root")
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split, "c"))
        os.link(path, os.path.join(root, split, "c", os.path.basename(path)))
    return root


STAGES = {"resnet training": _resnet_training, "deit training": _deit_training,
          "generate_descriptions": _generate_descriptions}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mode", list(_cases()))
def test_every_stage_makes_the_same_correct_8bit_rgb_of_each_mode(stage, mode, tmp_path):
    name, image, expected = _cases()[mode]
    path = _save(str(tmp_path), name, image)
    if mode != "P+transparency":
        assert Image.open(path).mode == mode  # the file really is of that mode
    got = STAGES[stage](path)
    assert got.mode == "RGB"
    assert np.array_equal(np.asarray(got), expected), np.asarray(got)[0, ::32]


@pytest.mark.parametrize("stage", STAGES)
def test_an_rgb_jpeg_is_used_exactly_as_decoded(stage, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    path = _save(str(tmp_path), "a.jpg", Image.fromarray(pixels))
    assert np.array_equal(np.asarray(STAGES[stage](path)), np.asarray(Image.open(path)))


@pytest.mark.parametrize("name,image,word", [
    ("a.tif", Image.fromarray(np.array([[-5, 70000]], dtype=np.int32), "I"), "mode I"),
    ("a.tif", Image.fromarray(np.array([[0.0, 3.5]], dtype=np.float32), "F"), "mode F"),
])
def test_a_mode_without_an_agreed_scale_is_refused_by_name_in_training_and_in_describing(name, image, word, tmp_path):
    from gpt4image.train.data import load_image
    from gpt4image.describe.loading import open_rgb_or_reason as open_rgb
    from gpt4image.errors import UserError
    path = _save(str(tmp_path), name, image)
    with pytest.raises(UserError, match=word):
        load_image(path)
    described, reason = open_rgb(path)
    assert described is None and word in reason

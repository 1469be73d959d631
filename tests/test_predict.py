import importlib
import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_jax import TrainConfig, cli
from cifar_jax.data import CLASS_NAMES
from cifar_jax.errors import InputError
from cifar_jax.predict import Predictor, image_files
from cifar_jax.models import init_params
from cifar_jax.steps import apply_model
from learnable import class_coloured_dataset, class_coloured_images

# `cifar_jax.train` the attribute is the train() function; the module itself is reached this way.
train_module = importlib.import_module("cifar_jax.train")

BATCH = 8  # two images per device on the 4 simulated devices; every test's N differs from it on purpose


@pytest.fixture(scope="module")
def run(request, tmp_path_factory):
    """The session's shared tiny model0 run if conftest provides one, else one trained here the same way."""
    try:
        return request.getfixturevalue("trained_run")
    except pytest.FixtureLookupError:
        pass
    dataset = class_coloured_dataset(num_train=512, num_test=100)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "load_cifar10", lambda data_dir=None, source="auto": dataset)
        config = TrainConfig(model="model0", epochs=2, batch_size=32, eval_batch_size=100, progress=False,
                             workdir=str(tmp_path_factory.mktemp("predict") / "run"))
        return train_module.train(config)


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor.from_checkpoint(run.workdir, step="latest", batch_size=BATCH)


@pytest.fixture(scope="module")
def few_colour_image():
    """A class-coloured picture with 16 distinct colours, so palette, GIF and CMYK files hold it exactly."""
    picture = class_coloured_images(np.array([3]), np.random.default_rng(5), noise=40.0)[0]
    return np.asarray(Image.fromarray(picture).quantize(16).convert("RGB"))


def softmax(logits):
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def png_claiming(path, width, height):
    """A tiny PNG whose header claims width×height pixels: a decompression bomb as far as the header goes."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts after signature(8)+length(4)+type(4)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------- the right answers


def test_predictions_match_the_model_applied_directly(run, predictor):
    images = class_coloured_dataset(num_train=1, num_test=37, seed=9)
    graphdef, _ = init_params("model0", 0)
    expected = softmax(np.asarray(apply_model(graphdef, run.params, images.test_images.astype(np.float32) / 255)))
    result = predictor.predict(images.test_images)
    assert result.probabilities.shape == (37, 10) and len(result) == 37
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(result.class_ids, expected.argmax(-1))
    assert result.class_names == [CLASS_NAMES[i] for i in expected.argmax(-1)]
    assert (result.class_ids == images.test_labels).mean() > 0.8  # a trained model, not noise: chance is 0.1
    assert result.inputs[:2] == ("images[0]", "images[1]") and result.errors == ()
    top = result.top_k(3)[0]
    assert [name for name, _ in top][0] == result.class_names[0]
    assert top[0][1] >= top[1][1] >= top[2][1] and top[0][1] == pytest.approx(expected[0].max(), abs=1e-5)


def test_checkpoint_metadata_is_used(predictor, run):
    assert predictor.class_names == tuple(CLASS_NAMES)
    assert predictor.metadata["model"] == "model0" and predictor.step > 0
    assert predictor.batch_size == BATCH and predictor.devices.num_local == 4
    best = Predictor.from_checkpoint(run.workdir / "checkpoints", step="best", batch_size=BATCH)
    assert best.step in {int(p.name) for p in (run.workdir / "checkpoints").iterdir() if p.name.isdigit()}


def test_every_input_form_gives_the_same_answer(predictor, few_colour_image, tmp_path):
    image = few_colour_image
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    files = {"png": tmp_path / "a.png", "rgba": tmp_path / "rgba.png", "palette": tmp_path / "p.png",
             "cmyk": tmp_path / "cmyk.tiff", "gif": tmp_path / "anim.gif", "bmp": tmp_path / "a.bmp"}
    Image.fromarray(image).save(files["png"])
    Image.fromarray(image).save(files["bmp"])
    Image.fromarray(rgba, "RGBA").save(files["rgba"])
    Image.fromarray(image).quantize(16).save(files["palette"])
    Image.fromarray(image).convert("CMYK").save(files["cmyk"])
    other_frame = Image.fromarray(255 - image).quantize(16)
    Image.fromarray(image).quantize(16).save(files["gif"], save_all=True, append_images=[other_frame], duration=100)
    forms = [image[None], image.astype(np.float32) / 255, image.astype(np.float64) / 255, image,
             str(files["png"]), files["png"], Image.fromarray(image), Image.fromarray(rgba, "RGBA"),
             files["rgba"], files["palette"], files["cmyk"], files["gif"], files["bmp"]]
    result = predictor.predict(forms)
    assert len(result) == len(forms)
    np.testing.assert_allclose(result.probabilities, np.repeat(result.probabilities[:1], len(forms), 0), atol=1e-6)
    assert result.inputs[4] == str(files["png"]) and result.inputs[6] == "images[6]"
    # The same answer one at a time as in a mixed batch.
    for form in (forms[3], files["gif"], Image.fromarray(image)):
        np.testing.assert_allclose(predictor.predict(form).probabilities[0], result.probabilities[0], atol=1e-6)


def test_grey_and_16_bit_files_match_the_grey_array(predictor, tmp_path):
    grey = np.random.default_rng(2).integers(0, 256, (32, 32)).astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # 16-bit, full range
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    Image.fromarray(grey.astype(np.int32) * 257, "I").save(tmp_path / "grey32.tiff")
    result = predictor.predict([np.dstack([grey] * 3), tmp_path / "grey.png", tmp_path / "grey16.png",
                                tmp_path / "grey32.tiff"])
    np.testing.assert_allclose(result.probabilities, np.repeat(result.probabilities[:1], 4, 0), atol=1e-6)


def test_larger_images_are_resized_the_same_way_from_arrays_and_files(predictor, few_colour_image, tmp_path):
    large = np.repeat(np.repeat(few_colour_image, 3, axis=0), 3, axis=1)  # 96×96, each pixel a 3×3 block
    wide = np.asarray(Image.fromarray(few_colour_image).resize((80, 48), Image.Resampling.NEAREST))
    Image.fromarray(large).save(tmp_path / "large.png")
    Image.fromarray(large).save(tmp_path / "large.jpg", quality=100)
    result = predictor.predict([large, tmp_path / "large.png", large.astype(np.float32) / 255, wide,
                                few_colour_image, tmp_path / "large.jpg"])
    np.testing.assert_allclose(result.probabilities[1:3], np.repeat(result.probabilities[:1], 2, 0), atol=1e-6)
    # Shrinking an enlargement recovers the picture closely: same class, probabilities near the original's
    # (the JPEG, lossy and decoded at reduced scale, only the same class).
    assert len(set(result.class_ids)) == 1
    np.testing.assert_allclose(result.probabilities[[0, 3]], np.repeat(result.probabilities[4:5], 2, 0), atol=0.05)


# ---------------------------------------------------------------- bad input


def bad_files(folder):
    """Each bad file with the words its error must contain."""
    good = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(good).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "whole.png").unlink()
    png_claiming(folder / "bomb.png", 100_000, 100_000)  # over PIL's own hard limit
    png_claiming(folder / "big.png", 10_000, 8_000)  # under PIL's limit, over ours
    return {"missing.png": "no such file", "truncated.png": "could not be decoded", "empty.jpg": "is empty",
            "text.png": "not an image file", "bomb.png": "decompression bomb", "big.png": "10000×8000 pixels"}


def test_each_bad_file_gets_an_error_naming_it(predictor, tmp_path):
    for name, words in bad_files(tmp_path).items():
        with pytest.raises(InputError, match=re.escape(str(tmp_path / name)) + ".*" + re.escape(words)):
            predictor.predict(tmp_path / name)
    with pytest.raises(InputError, match=re.escape(f"{tmp_path} is a folder")):
        predictor.predict(str(tmp_path))


@pytest.mark.parametrize("images, message", [
    (np.zeros((32, 32), np.uint8), r"images has shape \(32, 32\): expected RGB images shaped"),
    (np.zeros((2, 1, 32, 32, 3), np.uint8), r"images has shape \(2, 1, 32, 32, 3\)"),
    (np.zeros((2, 32, 32, 4), np.uint8), "images has 4 channels"),
    (np.zeros((2, 32, 32, 1), np.float32), "images has 1 channels"),
    (np.zeros((2, 32, 32, 3), np.int64), "images has dtype int64: pass uint8"),
    (np.array([np.zeros((32, 32, 3)), np.full((32, 32, 3), np.nan)]), r"images\[1\] contains NaN"),
    (np.array([np.full((32, 32, 3), 1.5)]), r"images\[0\] has float values outside \[0, 1\] \(min 1.5, max 1.5\)"),
    (np.full((32, 32, 3), -0.1), r"images has float values outside \[0, 1\]"),
    ([np.zeros((32, 32, 3), np.uint8), np.zeros((8, 8, 3), np.uint16)], r"images\[1\] has dtype uint16"),
    ([np.zeros((32, 32, 3), np.uint8), 42], r"images\[1\] is a int: pass a numpy array, a file path or a PIL"),
    (np.zeros((2, 3, 32, 32), np.uint8), r"shape \(2, 3, 32, 32\), channels first: .* np.moveaxis\(images, -3, -1\)"),
    (np.zeros((2, 32, 32), np.uint8), "images has 32 channels .* or add the channel axis"),
])
def test_bad_arrays_get_an_error_naming_them(predictor, images, message):
    with pytest.raises(InputError, match=message):
        predictor.predict(images)


def test_floats_within_half_a_level_of_the_range_are_clipped_not_refused(predictor, few_colour_image):
    pixels = few_colour_image.astype(np.float64) / 255
    pixels[0, 0, 0] = 0
    overshoot = pixels + np.where(pixels == 0, -1e-7, np.where(pixels == 1, 1e-7, 0))  # resampling ringing
    overshoot[0, 0, 0] = -0.49 / 255
    np.testing.assert_allclose(predictor.predict(overshoot).probabilities, predictor.predict(pixels).probabilities,
                               atol=1e-6)
    overshoot[0, 0, 0] = -0.51 / 255
    with pytest.raises(InputError, match=r"images has float values outside \[0, 1\] \(min -0.002"):
        predictor.predict(overshoot)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_an_empty_batch_gives_no_rows(predictor, dtype):
    result = predictor.predict(np.zeros((0, 32, 32, 3), dtype))
    assert len(result) == 0 and result.probabilities.shape == (0, len(CLASS_NAMES))


@pytest.mark.parametrize("call, message", [
    (lambda p, folder: list(p.predict_paths(5)), "expected a file or folder path, or a list of them, got int 5"),
    (lambda p, folder: list(p.predict_paths(np.zeros((4, 32, 32, 3)))),
     r"got ndarray array\(\[\[\[\[0., 0., 0.\], \[0., 0., 0.\], .*: pass arrays and PIL images to predict\(\)"),
    (lambda p, folder: list(p.predict_paths([np.zeros(3)])), "expected file or folder paths, got ndarray"),
    (lambda p, folder: list(p.predict_paths(folder, batch_size=-1)), "batch_size must be a whole number from 1 to 65,536, got -1"),
    (lambda p, folder: p.predict(np.zeros((1, 32, 32, 3), np.uint8)).top_k(0), "k must be a whole number of classes"),
])
def test_misused_calls_get_an_input_error(predictor, photo_folder, call, message):
    with pytest.raises(InputError, match=message) as raised:
        call(predictor, photo_folder)
    assert "\n" not in str(raised.value)


def test_a_file_that_failed_says_why_when_asked_for_its_label(predictor, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    [row] = predictor.predict_paths(tmp_path / "empty.jpg")
    assert not row.ok
    for ask in (lambda: row.label, lambda: row.probability, lambda: row.top_k(3)):
        with pytest.raises(InputError, match=r"empty.jpg has no prediction: .*empty"):
            ask()


def test_skip_mode_keeps_the_good_inputs_and_lists_the_bad(predictor, few_colour_image, tmp_path):
    floats = np.stack([few_colour_image / 255, np.full((32, 32, 3), np.nan), few_colour_image / 255])
    result = predictor.predict([floats, tmp_path / "missing.png", few_colour_image], errors="skip")
    assert result.inputs == ("images[0][0]", "images[0][2]", "images[2]")
    assert [name for name, _ in result.errors] == ["images[0][1]", str(tmp_path / "missing.png")]
    assert "contains NaN" in result.errors[0][1] and "no such file" in result.errors[1][1]
    np.testing.assert_allclose(result.probabilities, np.repeat(result.probabilities[:1], 3, 0), atol=1e-6)
    with pytest.raises(InputError, match="errors must be 'raise' or 'skip'"):
        predictor.predict(few_colour_image, errors="ignore")


# ---------------------------------------------------------------- folders, streaming, compilation


@pytest.fixture
def photo_folder(tmp_path, few_colour_image):
    """11 good images in nested folders (mixed-case extensions), one corrupt file and a non-image file."""
    folder = tmp_path / "photos"
    (folder / "sub" / "deeper").mkdir(parents=True)
    names = [f"img{i:02d}.png" for i in range(5)] + ["sub/a.JPG", "sub/b.jpeg", "sub/deeper/c.BMP",
                                                    "sub/deeper/d.webp", "sub/deeper/e.tif", "sub/f.gif"]
    for name in names:
        Image.fromarray(few_colour_image).save(folder / name, **({"quality": 100} if "jp" in name.lower() else {}))
    (folder / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "notes.txt").write_text("not an image, and not named like one: ignored")
    return folder


def test_a_corrupt_file_in_a_folder_does_not_stop_the_others(predictor, photo_folder):
    rows = list(predictor.predict_paths(photo_folder, batch_size=4))
    assert len(rows) == 12
    bad = [row for row in rows if not row.ok]
    assert [row.path for row in bad] == [str(photo_folder / "sub" / "broken.png")]
    assert str(photo_folder / "sub" / "broken.png") in bad[0].error
    good = [row for row in rows if row.ok]
    assert [r.path for r in good][:5] == [str(photo_folder / f"img{i:02d}.png") for i in range(5)]
    reference = predictor.predict(photo_folder / "img00.png")
    assert {row.label for row in good} == {reference.class_names[0]}
    lossless = [row for row in good if not row.path.lower().endswith((".jpg", ".jpeg", ".webp"))]
    assert len(lossless) == 8
    for row in lossless:
        np.testing.assert_allclose(row.probabilities, reference.probabilities[0], atol=1e-6)
    assert rows[0].top_k(2)[0] == (rows[0].label, pytest.approx(rows[0].probability))


def test_raise_mode_yields_every_file_before_the_bad_one_then_raises(predictor, photo_folder):
    rows = []
    with pytest.raises(InputError, match="broken.png"):
        for row in predictor.predict_paths(photo_folder, batch_size=4, errors="raise"):
            rows.append(row)
    # The bad file is the 8th: one whole chunk of 4 before it, and 3 files of its own chunk.
    assert [Path(row.path).name for row in rows] == [f"img{i:02d}.png" for i in range(5)] + ["a.JPG", "b.jpeg"]
    assert all(row.ok for row in rows)


def test_probabilities_reads_an_array_as_predict_does(predictor, few_colour_image):
    image = few_colour_image
    reference = predictor.predict(image).probabilities
    assert predictor.probabilities(image).shape == (1, 10)  # one (H, W, 3) image is one row
    np.testing.assert_allclose(predictor.probabilities(image), reference, atol=1e-6)
    np.testing.assert_allclose(predictor.probabilities(image[None].astype(np.float32) / 255), reference, atol=1e-6)
    bigger = np.asarray(Image.fromarray(image).resize((64, 48)))[None].repeat(3, axis=0)
    np.testing.assert_allclose(predictor.probabilities(bigger), predictor.predict(bigger).probabilities, atol=1e-6)
    with pytest.raises(InputError, match="images has dtype int64"):
        predictor.probabilities(image.astype(np.int64))
    with pytest.raises(InputError, match=r"images\[0\] has float values outside \[0, 1\]"):
        predictor.probabilities(np.stack([image, image]).astype(np.float32))


def test_a_batch_result_indexes_and_iterates_as_one_result_per_image(predictor, few_colour_image):
    result = predictor.predict([few_colour_image, 255 - few_colour_image])
    rows = list(result)
    assert len(rows) == 2 and rows[1].path == "images[1]" == result[-1].path
    assert [row.label for row in rows] == result.class_names
    np.testing.assert_array_equal(result[1].probabilities, result.probabilities[1])
    assert result[0].to_json(2)["top_k"] == [[name, round(p, 6)] for name, p in result.top_k(2)[0]]
    with pytest.raises(IndexError):
        result[2]


def test_explicit_files_of_any_name_and_empty_folders_are_reported(predictor, photo_folder, tmp_path):
    odd_name = tmp_path / "picture.data"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(odd_name, format="PNG")
    (tmp_path / "empty").mkdir()
    rows = list(predictor.predict_paths([odd_name, tmp_path / "empty", tmp_path / "gone.png"]))
    assert [row.ok for row in rows] == [True, False, False]
    assert "holds no image files" in rows[1].error and "no such file" in rows[2].error
    assert [p.name for p in image_files(photo_folder / "sub" / "deeper")] == ["c.BMP", "d.webp", "e.tif"]


def test_folders_are_streamed_not_read_whole(predictor, photo_folder):
    files = sorted(photo_folder.glob("img*.png")) * 10  # 50 files, batches of 4
    taken = []

    def listing():
        for path in files:
            taken.append(path)
            yield path

    rows = predictor.predict_paths(listing(), batch_size=4)
    first = next(rows)
    # At most the first chunk, the next one (decoded while the devices work) and two chunks decoding ahead.
    assert first.ok and len(taken) <= 17
    assert len(list(rows)) == 49 and len(taken) == 50


def test_new_batch_sizes_never_recompile(run, few_colour_image):
    predictor = Predictor.from_checkpoint(run.workdir, step="latest", batch_size=BATCH)
    answers = [predictor.predict(np.repeat(few_colour_image[None], n, 0)) for n in (1, 3, 8, 13, 30)]
    assert predictor.trace_count == 1
    assert [len(a) for a in answers] == [1, 3, 8, 13, 30]
    np.testing.assert_allclose(answers[-1].probabilities, np.repeat(answers[0].probabilities, 30, 0), atol=1e-6)
    assert len(predictor.predict(np.zeros((0, 32, 32, 3), np.uint8))) == 0 and predictor.trace_count == 1


def test_batch_size_is_rounded_up_to_the_device_count(run):
    assert Predictor.from_checkpoint(run.workdir, batch_size=5).batch_size == 8
    with pytest.raises(InputError, match="batch_size must be a whole number from 1 to 65,536"):
        Predictor.from_checkpoint(run.workdir, batch_size=0)


# ---------------------------------------------------------------- CLI


def test_cli_json_lines_parse_and_a_bad_file_exits_1_after_all_others(run, photo_folder, capsys):
    status = cli.main(["predict", "--workdir", str(run.workdir), "--json", "--top-k", "2",
                       "--batch-size", "4", str(photo_folder)])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1 and len(records) == 12
    errors = [r for r in records if "error" in r]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.png") and set(errors[0]) == {"path", "error"}
    for record in (r for r in records if "error" not in r):
        assert set(record) == {"path", "label", "probability", "top_k"} and len(record["top_k"]) == 2
        assert record["top_k"][0] == [record["label"], record["probability"]] and record["label"] in CLASS_NAMES


def test_cli_human_output_is_one_line_per_image(run, photo_folder, capsys):
    files = [str(photo_folder / f"img{i:02d}.png") for i in range(3)]
    status = cli.main(["predict", "--workdir", str(run.workdir), "--step", "latest", *files])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and len(lines) == 3
    assert all(re.fullmatch(re.escape(f) + r": (\w+ \d\.\d{3}, ){2}\w+ \d\.\d{3}", line) for f, line in zip(files, lines))
    status = cli.main(["predict", "--workdir", str(run.workdir), str(photo_folder / "nope.png"), files[0]])
    captured = capsys.readouterr()
    assert status == 1 and captured.out.startswith(files[0]) and "nope.png: no such file" in captured.err


# ---------------------------------------------------------------- many files: cores, shards, output files


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, few_colour_image):
    """40 files of several kinds and sizes, and one corrupt file among them."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for index in range(40):
        size = (32 + 7 * index, 24 + 5 * index)
        picture = np.asarray(Image.fromarray(few_colour_image).resize(size)) ^ rng.integers(0, 40, (*size[::-1], 3),
                                                                                             dtype=np.uint8)
        Image.fromarray(picture).save(folder / f"{index:03d}.{('png', 'jpg', 'bmp')[index % 3]}")
    (folder / "017.bmp").write_bytes(b"BM cut short")
    return folder


def test_results_are_the_same_in_the_same_order_with_one_or_several_decode_workers(predictor, many_photos):
    one = list(predictor.predict_paths(many_photos, decode_workers=1))
    several = list(predictor.predict_paths(many_photos, decode_workers=4))
    assert [row.path for row in one] == [row.path for row in several] == [str(p) for p in sorted(many_photos.iterdir())]
    assert [row.ok for row in several].count(False) == 1 and not several[17].ok and "017.bmp" in several[17].error
    for first, second in zip(one, several):
        assert first.error == second.error
        if first.ok:
            np.testing.assert_array_equal(first.probabilities, second.probabilities)


def test_shards_are_disjoint_and_cover_every_file_once(predictor, many_photos):
    everything = [row.path for row in predictor.predict_paths(many_photos)]
    shards = [[row.path for row in predictor.predict_paths(many_photos, num_shards=3, shard_index=index)]
              for index in range(3)]
    assert sorted(path for shard in shards for path in shard) == sorted(everything)
    assert len(set().union(*map(set, shards))) == len(everything) == 40
    assert all(13 <= len(shard) <= 14 for shard in shards)
    with pytest.raises(InputError, match="shard_index must be from 0 to num_shards - 1 \\(2\\), got 3"):
        list(predictor.predict_paths(many_photos, num_shards=3, shard_index=3))


@pytest.mark.parametrize("count", [200, 2000])
def test_images_held_in_memory_stay_bounded_whatever_the_number_of_files(predictor, few_colour_image, tmp_path,
                                                                         monkeypatch, count):
    """Decoded images waiting for the devices are bounded by a few batches, for 200 files as for 2,000."""
    Image.fromarray(few_colour_image).save(tmp_path / "one.png")
    predict_module = importlib.import_module("cifar_jax.predict")
    decode = predict_module._read_or_error
    state = {"decoded": 0, "handed_out": 0, "peak": 0}

    def counting_decode(path):
        image = decode(path)
        state["decoded"] += 1
        state["peak"] = max(state["peak"], state["decoded"] - state["handed_out"])
        return image

    monkeypatch.setattr(predict_module, "_read_or_error", counting_decode)
    for row in predictor.predict_paths([tmp_path / "one.png"] * count, batch_size=8, decode_workers=2):
        state["handed_out"] += 1
    assert state["handed_out"] == count
    assert state["peak"] <= 4 * 8 + 2  # two chunks in hand, two decoding ahead, one per worker finishing


def test_output_file_and_resume_after_a_kill_finish_every_file_once(run, many_photos, tmp_path, capsys):
    output = tmp_path / "results.jsonl"
    argv = ["predict", str(many_photos), "--workdir", str(run.workdir), "--batch-size", "8", "--output", str(output)]
    assert cli.main(argv) == 1  # the corrupt file
    complete = output.read_text().splitlines()
    assert len(complete) == 40 and "39 predicted, 1 failed, 0 skipped as done earlier" in capsys.readouterr().err
    # A job killed after 11 files, in the middle of writing the 12th line:
    output.write_text("\n".join(complete[:11]) + "\n" + complete[11][:25])
    with pytest.raises(InputError, match="already exists: add --resume"):
        cli_main_raising(argv)
    assert cli.main(argv + ["--resume"]) == 1
    lines = output.read_text().splitlines()
    assert sorted(lines) == sorted(complete)  # every file once, the cut line written again whole
    assert "28 predicted, 1 failed, 11 skipped as done earlier (0 of them failed)" in capsys.readouterr().err
    assert cli.main(argv + ["--resume"]) == 1  # nothing left to do, but a file in it failed
    assert output.read_text().splitlines() == lines
    assert "0 predicted, 0 failed, 40 skipped as done earlier (1 of them failed)" in capsys.readouterr().err


def cli_main_raising(argv):
    from cifar_jax.predict import PredictionsFile

    PredictionsFile(argv[argv.index("--output") + 1])


def test_output_as_csv_has_a_row_per_file(run, many_photos, tmp_path):
    import csv

    output = tmp_path / "results.csv"
    cli.main(["predict", str(many_photos), "--workdir", str(run.workdir), "--output", str(output),
              "--decode-workers", "2"])
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 40 and rows[0].keys() == {"path", "label", "probability", "top_k", "error"}
    assert rows[17]["error"] and not rows[0]["error"] and rows[0]["label"] in CLASS_NAMES
    with pytest.raises(InputError, match="name it .jsonl"):
        cli_main_raising(["--output", str(tmp_path / "results.txt")])
    # A CSV or JSON file that is not one of earlier results is refused untouched.
    (tmp_path / "data.csv").write_text("name,score\nalice,3")
    (tmp_path / "report.json").write_text(json.dumps({"a": 1}, indent=2))
    for other in ("data.csv", "report.json"):
        before = (tmp_path / other).read_bytes()
        assert cli.main(["predict", str(many_photos), "--workdir", str(run.workdir), "--output",
                         str(tmp_path / other), "--resume"]) == 2
        assert (tmp_path / other).read_bytes() == before


@pytest.mark.slow
def test_a_killed_predict_job_resumed_from_its_output_covers_every_file_once(run, few_colour_image, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(600):
        Image.fromarray(np.roll(few_colour_image, index, axis=1)).save(folder / f"{index:04d}.png")
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "cifar_jax", "predict", str(folder), "--workdir", str(run.workdir), "--output",
               str(output), "--batch-size", "16"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (not output.exists() or output.read_text().count("\n") < 50) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    written = output.read_text().count("\n")
    assert 50 <= written < 600, "the kill came too late to test anything"
    done = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    paths = [json.loads(line)["path"] for line in output.read_text().splitlines()]
    assert sorted(paths) == sorted(str(path) for path in folder.iterdir())  # every file, each once

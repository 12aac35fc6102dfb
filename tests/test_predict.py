"""skinkd_predict on real files: PH2-style BMPs, a large camera-sized JPEG, a broken file, the ISIC layouts, and
parity with evaluation's preprocessing."""
import csv
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from skinkd.schema import ModelConfig
from skinkd.synthetic import make_synthetic, synth_image
from skinkd.data import discover, load_image
from skinkd.cache import build_cache, restore_original
from skinkd.models import DeepLabV3Plus
from skinkd.checkpoints import load_model, save_checkpoint
from skinkd.infer import predict, prepare_for_inference
from skinkd.predict import lesion_probability, load_predictor

from conftest import with_trained_like_batchnorm

SIZE = 40


@pytest.fixture(scope='module')
def student(tmp_path_factory):
    "A student checkpoint with trained-like BatchNorm that records a 40-px working size, as best.pt files do."
    torch.manual_seed(0)
    model = with_trained_like_batchnorm(DeepLabV3Plus('resnet18'))
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    pre = dict(image_size=SIZE, mirror_pad=True, mask_resize='nearest', normalize=True)
    return save_checkpoint(tmp_path_factory.mktemp('ck') / 'best.pt', model, ModelConfig(), 'student', preprocessing=pre)


def ph2_folder(root, n=2):
    "A PH2-style dataset: one folder per case with a BMP image and a BMP lesion mask."
    base = root / 'PH2 Dataset images'
    for i in range(n):
        case = base / f'IMD00{i + 2}'
        (case / f'{case.name}_Dermoscopic_Image').mkdir(parents=True); (case / f'{case.name}_lesion').mkdir()
        im, m = synth_image(np.random.default_rng(i), 48, 64)
        Image.fromarray(im).save(case / f'{case.name}_Dermoscopic_Image' / f'{case.name}.bmp')
        Image.fromarray(m.astype(np.uint8) * 255).save(case / f'{case.name}_lesion' / f'{case.name}_lesion.bmp')
    return root


def masks_of(folder):
    return {p.name.removesuffix('_segmentation.png'): np.asarray(Image.open(p)) for p in sorted(folder.glob('*_segmentation.png'))}


def test_predict_ph2_bmps_a_large_jpeg_and_a_broken_file(student, tmp_path):
    "Every readable image gets a 0/255 mask at its own size; the broken one is named and skipped; exit 1 with a summary."
    ph2 = ph2_folder(tmp_path / 'ph2')
    small = synth_image(np.random.default_rng(5), 120, 180)[0]
    Image.fromarray(small).resize((4288, 2848), Image.BILINEAR).save(tmp_path / 'camera.jpg', quality=90)  # a camera-sized photo
    (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
    r = subprocess.run(['skinkd_predict', '--weights', str(student), '--images', str(ph2), str(tmp_path / '*.jpg'),
                        '--out', str(tmp_path / 'out'), '--overlays'], capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'SKINKD_PROGRESS': '0'})
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert 'broken.jpg' in r.stderr and '1 of 4 images could not be read' in r.stderr
    masks = masks_of(tmp_path / 'out')
    assert sorted(masks) == ['IMD002', 'IMD003', 'camera']
    assert masks['camera'].shape == (2848, 4288) and masks['IMD002'].shape == (48, 64)
    assert all(set(np.unique(m)) <= {0, 255} for m in masks.values())
    rows = {row['id']: row for row in csv.DictReader(open(tmp_path / 'out' / 'predictions.csv'))}
    assert sorted(rows) == sorted(masks) and (rows['camera']['width'], rows['camera']['height']) == ('4288', '2848')
    assert float(rows['camera']['lesion_fraction']) == pytest.approx((masks['camera'] > 0).mean(), abs=1e-6)
    assert 0.5 <= float(rows['camera']['mean_confidence']) <= 1.0
    assert max(Image.open(tmp_path / 'out' / 'camera_overlay.png').size) == 1024   # a quick look, not a full-size copy
    assert peak_mb < 3000  # one camera image at a time (the largest child process so far, an upper bound)


def test_predict_matches_evaluation_preprocessing(student, tmp_path):
    "Bit for bit, the probabilities predict gives an image are those evaluation scores: same size, padding, model path."
    root = make_synthetic(tmp_path / 'syn', n=8, size=56, seed=3)
    samples = [s for s in discover(root) if s.split == 'test']
    cache = build_cache(samples, tmp_path / 'cache', SIZE)
    probs = predict(prepare_for_inference(load_model(student)[0]), cache, range(len(cache)), batch_size=1)  # batches of 1, as predict runs
    pred = load_predictor(student)
    for i, s in enumerate(samples):
        evaluated = restore_original(probs[i], cache.orig_hw[i], cache.mirror_pad)[0]
        assert torch.equal(lesion_probability(pred, load_image(s.image)), evaluated)


def test_predict_reads_every_image_folder_of_the_isic_layouts(student, tmp_path, shared_data):
    "Real ISIC 2017 images: the dataset root is enough (its image folders are found, its masks ignored)."
    root = shared_data / 'isic2017-256'
    expected = len(discover(root))
    r = subprocess.run([sys.executable, '-m', 'skinkd.predict', '--weights', str(student), '--images', str(root),
                        '--out', str(tmp_path / 'out')], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / 'out' / 'predictions.csv')))
    assert len(rows) == expected and all(int(r['width']) > 0 for r in rows)
    first = discover(root)[0]
    assert np.asarray(Image.open(tmp_path / 'out' / f'{first.id}_segmentation.png')).shape == np.asarray(Image.open(first.image)).shape[:2]


def test_a_dataset_folder_gives_its_training_split_to_calibration(tmp_path):
    "INT8 calibration (`--calib DATASET`) reads the training images of a dataset with official splits, never its test images."
    from skinkd.infer import image_files
    root = make_synthetic(tmp_path / 'isic', n=10, size=32, seed=0)
    split = {s.image.resolve(): s.split for s in discover(root)}
    training = image_files([root], train_only=True)
    assert {split[f] for f in training} == {'train'} and len(training) == list(split.values()).count('train')
    assert len(image_files([root])) == 10  # prediction takes them all

"""Tests of the mask viewer at three levels: pure overlays and widget logic in Python, the viewer
notebook under papermill (widget state saved), and a real browser (JupyterLab + headless Chromium)."""
import base64
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinkd.core import SkinkdError
from conftest import ARTIFACTS, browser_page, free_port, stop_server, wait_http
from skinkd.overlays import (ERROR_COLORS, PALETTE, ViewerError, blend, load_predictions, mask_edges,
                             overlay, save_predictions, side_by_side, to_png)
from skinkd.viewer import MaskViewer, sort_order, synthetic_example

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'nbs' / '10_viewer.ipynb'


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


# ---------------------------------------------------------------- overlays, pixel-exact

@pytest.fixture
def scene():
    "A grey 6x6 image, truth = left half, prediction = top half."
    img = np.full((6, 6, 3), 80, np.uint8)
    truth = np.zeros((6, 6), bool); truth[:, :3] = True
    pred = np.zeros((6, 6), np.uint8); pred[:3, :] = 1
    return img, truth, pred


def test_filled_overlay_pixels(scene):
    img, truth, pred = scene
    out = overlay(img, {'ground truth': truth, 'teacher': pred}, alpha=0.25)
    a = 64  # round(256 * 0.25)
    mix = lambda p, c: (p * (256 - a) + c * a + 128) >> 8
    gt = [mix(80, c) for c in PALETTE['ground truth']]
    assert out[5, 0].tolist() == gt                                             # truth only
    assert out[0, 5].tolist() == [mix(80, c) for c in PALETTE['teacher']]       # prediction only
    assert out[0, 0].tolist() == [mix(g, c) for g, c in zip(gt, PALETTE['teacher'])]  # teacher drawn over truth
    assert out[5, 5].tolist() == [80, 80, 80]
    assert out.dtype == np.uint8 and img[0, 0].tolist() == [80, 80, 80]         # input untouched


def test_contour_overlay_pixels(scene):
    img, truth, _ = scene
    out = overlay(img, [truth], colors=[(9, 8, 7)], mode='contour', alpha=0.3)
    expected_edge = truth & ~np.pad(truth, 1)[2:, 1:-1] | truth & ~np.pad(truth, 1)[:-2, 1:-1] \
        | truth & ~np.pad(truth, 1)[1:-1, 2:] | truth & ~np.pad(truth, 1)[1:-1, :-2]
    assert (mask_edges(truth) == expected_edge).all()
    assert expected_edge.sum() == 14  # both columns at the sides (6 + 6), the middle column at the top and bottom rows
    assert (out[expected_edge] == [9, 8, 7]).all() and (out[~expected_edge] == 80).all()
    assert (overlay(img, [truth], mode='contour', width=3)[truth] != 80).all()  # 3 wide fills a 3-column block


def test_error_map_pixels(scene):
    img, truth, pred = scene
    out = overlay(img, [truth, pred], mode='error', alpha=1.0)
    assert out[0, 0].tolist() == list(ERROR_COLORS['tp'])
    assert out[0, 5].tolist() == list(ERROR_COLORS['fp'])
    assert out[5, 0].tolist() == list(ERROR_COLORS['fn'])
    assert out[5, 5].tolist() == [80, 80, 80]
    half = overlay(img, [truth, pred], mode='error', alpha=0.5, colors=[(0, 0, 0), (255, 255, 255), (160, 0, 0)])
    assert half[0, 0].tolist() == [40, 40, 40] and half[0, 5].tolist() == [168, 168, 168] and half[5, 0].tolist() == [120, 40, 40]


def test_blend_and_panels():
    img = np.array([[[0, 128, 255]]], np.uint8)
    assert blend(img, np.array([[True]]), (255, 255, 255), 0.5).tolist() == [[[128, 192, 255]]]
    both = side_by_side([img, img], gap=2, fill=7)
    assert both.shape == (1, 4, 3) and both[0, 1].tolist() == [7, 7, 7]
    with pytest.raises(ViewerError, match='one height'):
        side_by_side([img, np.zeros((2, 1, 3), np.uint8)])


def test_overlay_refuses_bad_input(scene):
    img, truth, _ = scene
    with pytest.raises(SkinkdError, match=r"layer 'teacher' has shape \(3, 3\)"):
        overlay(img, {'teacher': np.zeros((3, 3))})
    with pytest.raises(ViewerError, match='uint8'):
        overlay(img.astype(float), [truth])


def test_sort_order_worst_first():
    assert sort_order([0.7, np.nan, 0.1, 0.7]).tolist() == [2, 0, 3, 1]
    assert sort_order([2.0, np.inf, 5.0], lower_better=True).tolist() == [1, 2, 0]


# ---------------------------------------------------------------- widget logic

@pytest.fixture
def demo():
    return synthetic_example(5, 40, seed=3)


def test_widget_values_change_image_and_metrics(demo):
    v = MaskViewer(**demo)
    png, info = v.image.value, v.info.value
    v.slider.value = 3
    assert v.image.value != png and v.info.value != info
    assert v.picker.value == 'demo_003' and '<b>demo_003</b>' in v.info.value
    assert f"{demo['metrics']['raw/dice'][3]:.4g}" in v.info.value
    v.alpha.value = 0.9
    layers = {'ground truth': demo['truth'][3], **{k: p[3] for k, p in demo['preds'].items()}}
    assert v.image.value == to_png(overlay(demo['images'][3], layers, alpha=0.9))
    v.layers['ground truth'].value = False
    layers.pop('ground truth')
    assert v.image.value == to_png(overlay(demo['images'][3], layers, alpha=0.9))
    assert 'ground truth' not in v.info.value.split('<table>')[0]   # gone from the legend


def test_sort_and_pick_by_id(demo):
    v = MaskViewer(**demo)
    v.sort_by.value = 'teacher/dice'
    order = np.argsort(demo['metrics']['teacher/dice'], kind='stable')
    assert v.current == order[0] and v.picker.value == demo['ids'][order[0]] and 'worst first' in v.info.value
    v.picker.value = demo['ids'][order[3]]
    assert v.slider.value == 3 and v.current == order[3]
    v.slider.value = 1
    assert v.picker.value == demo['ids'][order[1]]


def test_modes(demo):
    v = MaskViewer(**demo, mode='contour')
    contour = v.image.value
    v.mode.value = 'overlay'
    assert v.image.value != contour
    v.mode.value = 'side by side'
    assert png_array(v.image.value).shape == (40, 5 * 40 + 4 * 4, 3)   # image + 4 layers
    v.mode.value = 'error map'
    v.compare.value = 'teacher'
    assert v.image.value == to_png(overlay(demo['images'][0], [demo['truth'][0], demo['preds']['teacher'][0]], alpha=0.4, mode='error'))


def test_dataset_only_viewer(demo):
    v = MaskViewer(demo['images'], demo['truth'])
    assert 'error map' not in v.mode.options and v.layer_names == ['ground truth']
    assert v.info.value.count('<i>no metrics</i>') == 1


# ---------------------------------------------------------------- predictions file

def test_predictions_round_trip_and_from_run(tmp_path, demo):
    n = len(demo['ids'])
    path = save_predictions(tmp_path / 'run' / 'predictions.npz', demo['ids'], np.stack(demo['images']), np.stack(demo['truth']),
                            {k: np.stack(v) for k, v in demo['preds'].items()}, demo['metrics'])
    assert [p.name for p in (tmp_path / 'run').iterdir()] == ['predictions.npz']
    with np.load(path, allow_pickle=False) as z:   # no pickled objects inside
        assert z['pred/distilled'].dtype == np.uint8 and z['pred/distilled'].shape == (n, 40, 40)
    back = load_predictions(tmp_path / 'run')
    assert back['ids'] == demo['ids'] and set(back['preds']) == {'teacher', 'raw', 'distilled'}
    v = MaskViewer.from_run(tmp_path / 'run')
    ref = MaskViewer(**demo)
    assert v.image.value == ref.image.value and v.info.value == ref.info.value


def test_predictions_file_errors(tmp_path, demo):
    with pytest.raises(SkinkdError, match='not found; write it with `skinkd_evaluate'):
        MaskViewer.from_run(tmp_path)
    np.savez(tmp_path / 'other.npz', x=np.zeros(2))
    with pytest.raises(ViewerError, match='not a skinkd predictions file'):
        load_predictions(tmp_path / 'other.npz')
    good = save_predictions(tmp_path / 'p.npz', demo['ids'], np.stack(demo['images']))
    (tmp_path / 'cut.npz').write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ViewerError, match='truncated'):
        load_predictions(tmp_path / 'cut.npz')


# ---------------------------------------------------------------- the notebook under papermill

def test_notebook_keeps_widget_state(tmp_path, demo):
    pm = pytest.importorskip('papermill')
    out = tmp_path / 'out.ipynb'
    pm.execute_notebook(str(NOTEBOOK), str(out), parameters=dict(demo_n=5, demo_size=40), kernel_name='python3',
                        cwd=str(tmp_path), progress_bar=False)
    nb = json.loads(out.read_text())
    state = nb['metadata']['widgets']['application/vnd.jupyter.widget-state+json']['state']
    view = nb['cells'][-1]['outputs'][0]['data']['application/vnd.jupyter.widget-view+json']
    assert view['model_id'] in state and state[view['model_id']]['model_name'] == 'VBoxModel'
    # the same viewer rebuilt here must give the very bytes and text saved in the notebook
    ref = MaskViewer(**synthetic_example(5, 40))
    ref.sort_by.value = 'distilled/dice'
    children = _descendants(state, view['model_id'])
    image = next(state[m] for m in children if state[m]['model_name'] == 'ImageModel')
    saved_png = base64.b64decode(image['buffers'][0]['data'])
    assert saved_png == ref.image.value
    html_text = next(state[m]['state']['value'] for m in children if state[m]['model_name'] == 'HTMLModel')
    assert html_text == ref.info.value and 'by distilled/dice, worst first' in html_text
    slider = next(state[m]['state'] for m in children if state[m]['model_name'] == 'IntSliderModel')
    assert (slider['value'], slider['max']) == (0, 4)


def _descendants(state: dict, model_id: str) -> list[str]:
    "Model ids reachable from `model_id` through container children."
    out, todo = [], [model_id]
    while todo:
        m = todo.pop()
        out.append(m)
        todo += [c.removeprefix('IPY_MODEL_') for c in state[m]['state'].get('children', [])]
    return out


# ---------------------------------------------------------------- a real browser

@pytest.fixture
def jupyterlab(tmp_path):
    "JupyterLab on 127.0.0.1 (free port, random token), serving a folder with a copy of the viewer notebook."
    pytest.importorskip('jupyterlab', reason='jupyterlab is not installed')
    work, home = tmp_path / 'work', tmp_path / 'home'
    work.mkdir(); home.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    settings = home / 'lab-settings' / '@jupyterlab' / 'apputils-extension'
    settings.mkdir(parents=True)   # no news or update checks: the machine is offline
    (settings / 'notification.jupyterlab-settings').write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
    (settings.parent / 'notebook-extension').mkdir()   # start the notebook's kernel without asking
    (settings.parent / 'notebook-extension' / 'tracker.jupyterlab-settings').write_text(json.dumps({'autoStartDefaultKernel': True}))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, 'HOME': str(home), 'JUPYTER_CONFIG_DIR': str(home / 'config'), 'JUPYTER_RUNTIME_DIR': str(home / 'runtime'),
           'JUPYTERLAB_SETTINGS_DIR': str(home / 'lab-settings'), 'JUPYTERLAB_WORKSPACES_DIR': str(home / 'workspaces'),
           'PYTHONUNBUFFERED': '1'}
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
           '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={work}',
           '--LabApp.news_url=', '--ServerApp.open_browser=False'] + (['--allow-root'] if os.geteuid() == 0 else [])
    log = tmp_path / 'jupyterlab.log'
    with open(log, 'wb') as fh:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f'http://127.0.0.1:{port}'
        wait_http(f'{base}/api/status?token={token}', proc, log)
        yield dict(base=base, token=token, log=log)
    finally:
        stop_server(proc)


@pytest.mark.timeout(170)
def test_viewer_in_a_real_browser(jupyterlab):
    (ARTIFACTS / 'viewer_failure.png').unlink(missing_ok=True)
    with browser_page(1400, 1000) as (page, errors):
        page.on('console', lambda m: errors.append(f'console: {m.text}') if m.type == 'error' else None)
        try: _run_viewer_notebook(page, jupyterlab)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / 'viewer_failure.png'))
            raise
        first, readout, info = _viewer_state(page)
        assert first.startswith(('blob:', 'data:image/png')) and readout == '0'
        handle = page.locator('.skinkd-slider .noUi-handle').first
        handle.focus()
        page.keyboard.press('ArrowRight')
        page.wait_for_function('old => { const i = document.querySelector(".skinkd-image"); return i && i.src !== old; }',
                               arg=first, timeout=30_000)
        page.wait_for_function('old => document.querySelector(".skinkd-info").innerText !== old', arg=info, timeout=30_000)
        second, readout2, info2 = _viewer_state(page)
        assert second != first and readout2 == '1' and info2 != info
        page.locator('.skinkd-viewer').scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / 'viewer_browser.png'))
        page.locator('.skinkd-viewer').screenshot(path=str(ARTIFACTS / 'viewer_widget.png'))
        page.locator('.skinkd-viewer button', has_text='error map').click()   # a second control: the view mode
        page.wait_for_function('old => document.querySelector(".skinkd-image").src !== old', arg=second, timeout=30_000)
        page.wait_for_function('() => document.querySelector(".skinkd-info").innerText.includes("false negative")', timeout=30_000)
        page.locator('.skinkd-viewer').screenshot(path=str(ARTIFACTS / 'viewer_error_map.png'))
    assert not errors, 'browser console errors:\n' + '\n'.join(errors)


def _run_viewer_notebook(page, lab: dict):
    "Open the viewer notebook in JupyterLab, wait for its kernel and run all cells."
    page.goto(f"{lab['base']}/lab/tree/{NOTEBOOK.name}?token={lab['token']}", wait_until='domcontentloaded', timeout=60_000)
    page.wait_for_selector('.jp-Notebook .jp-Cell', timeout=60_000)
    accept = page.locator('.jp-Dialog .jp-mod-accept')   # a kernel chooser, should JupyterLab still ask
    try: accept.wait_for(timeout=3_000); accept.click()
    except sync_api_timeout(): pass
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', state='attached', timeout=60_000)
    page.locator('.lm-MenuBar-itemLabel', has_text='Run').first.click()
    page.locator('.lm-Menu-itemLabel').get_by_text('Run All Cells', exact=True).click()
    page.wait_for_selector('.skinkd-viewer img.skinkd-image[src]', timeout=40_000)
    page.wait_for_selector('.skinkd-info table', timeout=30_000)


def sync_api_timeout():
    from playwright.sync_api import TimeoutError
    return TimeoutError


def _viewer_state(page) -> tuple[str, str, str]:
    "The image src, the image slider's readout and the metrics text as the browser shows them."
    src = page.locator('img.skinkd-image').get_attribute('src')
    readout = page.locator('.skinkd-slider .widget-readout').inner_text().strip()
    return src, readout, page.locator('.skinkd-info').inner_text()


def test_from_dataset_reads_files_lazily(tmp_path):
    from skinkd.data import discover
    from skinkd.synthetic import make_synthetic
    root = make_synthetic(tmp_path / 'synth', n=6, size=80, seed=2)
    v = MaskViewer.from_dataset(root, split='test', max_side=40)
    tests = [s for s in discover(root) if s.split == 'test']
    assert v.ids == [s.id for s in tests] and v.layer_names == ['ground truth']
    shown = png_array(v.image.value)
    with Image.open(tests[0].image) as im: w, h = im.size
    assert max(shown.shape[:2]) == 40 and abs(shown.shape[1] / shown.shape[0] - w / h) < 0.1   # shrunk, aspect kept
    with pytest.raises(ViewerError, match="no images found .* for split 'nope'"):
        MaskViewer.from_dataset(root, split='nope')


def test_from_dataset_on_real_data(shared_data):
    v = MaskViewer.from_dataset(shared_data / 'ham10000-5', mode='contour')   # 600x450 originals
    assert len(v.ids) == 5 and png_array(v.image.value).shape == (384, 512, 3)
    big = MaskViewer.from_dataset(shared_data / 'isic2018-512', max_side=128)  # 2207 pairs, read only when shown
    assert len(big.ids) > 2000
    first = big.image.value
    big.picker.value = big.ids[-1]
    assert big.slider.value == len(big.ids) - 1 and big.image.value != first
    assert png_array(big.image.value).shape == (128, 128, 3) and big.ids[-1] in big.info.value


# ---------------------------------------------------------------- skinkd_view: the viewer as a web page (Voila)

@pytest.fixture
def view_page(tmp_path):
    "skinkd_view serving a report folder (the synthetic example's predictions) on a free port of 127.0.0.1."
    pytest.importorskip('voila', reason="voila is not installed (pip install 'skinkd[viewer]')")
    report, demo = tmp_path / 'report', synthetic_example(8, 192, seed=3)
    save_predictions(report / 'predictions.npz', demo['ids'], np.stack(demo['images']), np.stack(demo['truth']),
                     {k: np.stack(v) for k, v in demo['preds'].items()}, demo['metrics'])
    port, log = free_port(), tmp_path / 'view.log'
    with open(log, 'wb') as fh:
        proc = subprocess.Popen(['skinkd_view', str(report), '--port', str(port)], stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, 'PYTHONUNBUFFERED': '1'}, start_new_session=True)
    try:
        wait_http(f'http://127.0.0.1:{port}/', proc, log, timeout=90, what='skinkd_view')
        yield dict(url=f'http://127.0.0.1:{port}/', log=log, report=report, port=port, demo=demo)
    finally:
        stop_server(proc)


def test_skinkd_view_says_where_it_serves_in_its_first_line(view_page):
    demo = view_page['demo']
    first = view_page['log'].read_text().splitlines()[0]
    assert first == (f"serving the mask viewer of {view_page['report']} ({len(demo['ids'])} images) at "
                     f"http://127.0.0.1:{view_page['port']}/ (this machine only; --host 0.0.0.0 shares it); "
                     'Ctrl-C stops it')


def test_skinkd_view_refuses_a_folder_without_predictions_in_one_line(tmp_path):
    p = subprocess.run(['skinkd_view', str(tmp_path)], capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and 'predictions.npz' in lines[0] and str(tmp_path) in lines[0], p.stderr
    assert not p.stdout  # no server was started, so nothing said it serves


@pytest.mark.timeout(170)
def test_viewer_page_in_a_real_browser(view_page):
    demo = view_page['demo']
    with browser_page(1200, 760, timeout_ms=60_000) as (page, errors):
        page.goto(view_page['url'], wait_until='domcontentloaded')
        page.wait_for_selector('.skinkd-viewer img.skinkd-image[src]')
        page.wait_for_selector('.skinkd-info table')
        assert 'MaskViewer.from_run' not in page.content()  # the page is the viewer: no code cells
        first, readout, info = _viewer_state(page)
        assert readout == '0' and demo['ids'][0] in info
        page.locator('.skinkd-slider .noUi-handle').first.focus()
        page.keyboard.press('ArrowRight')  # the image selector
        page.wait_for_function('old => document.querySelector(".skinkd-image").src !== old', arg=first)
        second, readout2, info2 = _viewer_state(page)
        assert readout2 == '1' and demo['ids'][1] in info2
        page.locator('.widget-dropdown', has_text='sort by').locator('select').select_option('distilled/dice')
        page.wait_for_function('() => document.querySelector(".skinkd-info").innerText.includes("by distilled/dice")')
        worst = demo['ids'][int(np.argmin(demo['metrics']['distilled/dice']))]
        page.wait_for_function('id => document.querySelector(".skinkd-info").innerText.includes(id)', arg=worst)
        assert _viewer_state(page)[1] == '0'  # the worst distilled image comes first
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / 'viewer_page.png'))
    assert not errors, '\n'.join(errors)

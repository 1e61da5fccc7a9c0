"""The web app (smfsr_jax/app.py): its logic against SRPipeline, input checks, and the page in headless Chromium.

The browser test needs the app requirements (requirements-app.txt: gradio, selenium) and Debian's chromium and
chromium-driver (.ci/run installs them); it skips, saying which is missing, without them. With
SMFSR_JAX_SCREENSHOT=docs/app.png it also writes the README's screenshot there.
"""

import io
import os
import shutil
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from smfsr_jax import app
from smfsr_jax.core import errors
from smfsr_jax.data.images import BadImage
from smfsr_jax.sampling.canvas import make_canvas_functions
from smfsr_jax.sampling.runner import SRPipeline
from tests.conftest import REPO
from tests.processes import free_port
from tests.test_sampling import lr_crop, make_bundle

PROCESS_SIZE = 128  # as tests/test_sampling.py small_pipeline: a 40x48 LR runs at 160x192 (20x24 latents)
LR_SHAPE = (40, 48)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle") / "student")


@pytest.fixture(scope="module")
def upscaler(bundle_dir):
    return app.Upscaler.from_checkpoint(bundle_dir, process_size=PROCESS_SIZE)


@pytest.fixture(scope="module")
def reference(bundle_dir):
    return SRPipeline.from_checkpoint(bundle_dir, process_size=PROCESS_SIZE)


@pytest.fixture(scope="module")
def lr():
    return lr_crop("astronaut", *LR_SHAPE, 100, 150)


def png_bytes(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def read_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_outputs_match_pipeline_and_std_map(upscaler, reference, lr):
    result = upscaler(lr, [3, 4])
    expected = [reference(lr, seed=3), reference(lr, seed=4)]
    for output, want in zip(result.outputs, expected):
        np.testing.assert_array_equal(output, want)
    height, width = 4 * LR_SHAPE[0], 4 * LR_SHAPE[1]
    assert result.bicubic.shape == (height, width, 3) and result.seeds == [3, 4]
    # Two seeds: the per-channel std is half their difference; the map averages it over RGB.
    a, b = (x.astype(np.float32) for x in expected)
    assert result.std.shape == (height, width)
    np.testing.assert_allclose(result.std, (np.abs(a - b) / 2).mean(axis=-1), atol=1e-4)
    assert result.std.max() > 0
    assert upscaler(lr, [3]).std is None


def test_compiles_once_per_canvas_and_shares_parameters(bundle_dir, lr):
    upscaler = app.Upscaler.from_checkpoint(bundle_dir, process_size=PROCESS_SIZE)
    first = upscaler(lr, [0])
    assert first.compile_seconds is not None and first.seconds_per_image is None
    assert "from the compilation cache" in first.compilation and "compilation" in app.summary(lr, first)
    model = upscaler.model
    functions = make_canvas_functions(model.transformer_config, model.autoencoder_config,
                                      upscaler.request_settings(steps=1), model.mesh)

    def compiled():
        return [f._cache_size() for f in (functions.encode, functions.velocity, functions.decode)]
    before = compiled()
    again = upscaler(lr, [1, 2], steps=1)  # steps=1 is the student's default: the same functions and canvas
    assert again.compile_seconds is None and again.seconds_per_image > 0
    # Other tests in this process may have compiled these functions for other canvases: count, don't pin.
    assert compiled() == before and min(before) >= 1
    assert 32 in upscaler.tile_sizes() and upscaler.default.tile_size in upscaler.tile_sizes()
    tiled = upscaler.request_settings(tile_size=32)
    assert (tiled.tile_size, tiled.tile_overlap) == (32, 12)  # the overlap follows the tile
    parameters = jax.tree.leaves(model.transformer_params)
    tiled_output = upscaler(lr, [0], tile_size=32)
    assert tiled_output.compile_seconds is not None  # another setting compiles once ...
    assert all(a is b for a, b in zip(jax.tree.leaves(upscaler.model.transformer_params), parameters))  # ... no copy


def test_std_image_has_a_scale():
    std = np.zeros((40, 64), np.float32)
    std[:, 32:] = 6.0
    image = app.std_image(std)
    assert image.dtype == np.uint8 and image.shape[1] == 64 and image.shape[0] > 40
    # Below the map, the colour bar runs from 0 (left) to the maximum (right).
    np.testing.assert_array_equal(image[:40, :32], np.broadcast_to(image[40, 0], (40, 32, 3)))
    np.testing.assert_array_equal(image[:40, 32:], np.broadcast_to(image[40, 63], (40, 32, 3)))
    assert image[40, 0].sum() < image[40, 63].sum()


def test_read_checks_files(upscaler, lr, monkeypatch):
    pixels, note = upscaler.read(png_bytes(lr), "photo.png")
    np.testing.assert_array_equal(pixels, lr)
    assert note is None
    _, note = upscaler.read(png_bytes(np.dstack([lr, np.full(LR_SHAPE, 9, np.uint8)]), "RGBA"), "rgba.png")
    assert note == "alpha dropped converted to RGB"
    with pytest.raises(BadImage, match="truncated.png: unreadable or truncated"):
        upscaler.read(png_bytes(lr)[:200], "truncated.png")
    with pytest.raises(BadImage, match="notes.txt: unreadable"):
        upscaler.read(b"not an image at all", "notes.txt")
    monkeypatch.setattr(upscaler, "max_pixels", 1000)
    with pytest.raises(errors.UserError, match=r"big.png: 48x40 = 1,920 pixels is above .* 1,000 \(--max_pixels\)"):
        upscaler.read(png_bytes(lr), "big.png")


def test_main_names_make_demo_when_the_default_is_missing(tmp_path, monkeypatch, capsys):
    # The default is a path under the repository, which `make demo` may have filled on this machine.
    monkeypatch.setattr(app, "DEMO_BUNDLE", str(tmp_path / "workdirs" / "demo" / "student_gan" / "bundle"))
    assert app.main([]) == 2
    assert "run `make demo`" in capsys.readouterr().err


def fetch_png(url: str) -> np.ndarray:
    with urllib.request.urlopen(url) as response:
        return read_png(response.read())


def test_browser(upscaler, reference, lr, tmp_path):
    pytest.importorskip("gradio", reason="gradio is an app requirement (requirements-app.txt)")
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is an app requirement (requirements-app.txt)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("headless Chromium is absent: apt-get install chromium chromium-driver (.ci/run does)")
    good, bad = tmp_path / "photo.png", tmp_path / "truncated.png"
    good.write_bytes(png_bytes(lr))
    bad.write_bytes(png_bytes(lr)[:200])

    port = free_port()
    server = app.launch(upscaler, port=port, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # the system browser: selenium downloads nothing
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(f"http://127.0.0.1:{port}/")

        def upload(path):
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input input[type=file]"))
            driver.find_element(By.CSS_SELECTOR, "#input input[type=file]").send_keys(str(path))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input button[aria-label='Remove Image']"))

        def set_number(selector, value):
            field = driver.find_element(By.CSS_SELECTOR, selector)
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(str(value), Keys.TAB)

        # A truncated file: a message in the page, and the server goes on serving.
        upload(bad)
        driver.find_element(By.CSS_SELECTOR, "#run").click()
        wait.until(lambda d: "truncated.png: unreadable or truncated" in d.find_element(By.TAG_NAME, "body").text)
        driver.find_element(By.CSS_SELECTOR, "[data-testid=toast-close]").click()
        driver.find_element(By.CSS_SELECTOR, "#input button[aria-label='Remove Image']").click()

        upload(good)
        set_number("#seed input", 5)
        set_number("#num_seeds input[type=number]", 2)
        driver.find_element(By.CSS_SELECTOR, "#run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#files a[download]")) == 2
                   and len(d.find_elements(By.CSS_SELECTOR, "#slider img")) == 2
                   and d.find_elements(By.CSS_SELECTOR, "#std img"))

        # The downloads and the slider's SR image are SRPipeline's outputs at x4, seeds 5 and 6.
        hrefs = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#files a[download]")]
        downloads = {os.path.basename(href): fetch_png(href) for href in hrefs}
        for seed in (5, 6):
            np.testing.assert_array_equal(downloads[f"photo_x4_seed{seed}.png"], reference(lr, seed=seed))
        slider_sr = driver.find_elements(By.CSS_SELECTOR, "#slider img")[1].get_attribute("src")
        np.testing.assert_array_equal(fetch_png(slider_sr), reference(lr, seed=5))
        assert "48×40 → 192×160" in driver.find_element(By.CSS_SELECTOR, "#info").text

        bottom = driver.execute_script("return document.querySelector('#std').getBoundingClientRect().bottom")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # a viewport down to the uncertainty map
                               {"width": 1280, "height": int(bottom) + 24, "deviceScaleFactor": 1, "mobile": False})
        driver.save_screenshot(str(tmp_path / "app.png"))
        target = os.environ.get("SMFSR_JAX_SCREENSHOT")
        if target:  # the README's screenshot: 128 colours keep the PNG small
            Image.open(tmp_path / "app.png").convert("RGB").quantize(128).save(REPO / target, optimize=True)
    finally:
        driver.quit()
        server.close()


def test_the_api_takes_an_image_alone(upscaler, reference, lr, tmp_path):
    """A new user's first call: only an image, every other input at its default (seed 0, one step)."""
    pytest.importorskip("gradio", reason="gradio is an app requirement (requirements-app.txt)")
    gradio_client = pytest.importorskip("gradio_client", reason="gradio_client comes with gradio")
    path = tmp_path / "lr.png"
    path.write_bytes(png_bytes(lr))
    port = free_port()
    server = app.launch(upscaler, port=port, block=False)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        seed, _, _, files, *_ = client.predict(gradio_client.handle_file(str(path)), api_name="/super_resolve")
    finally:
        server.close()
    (output,) = files
    sr = np.asarray(Image.open(output).convert("RGB"))
    assert seed == 0 and sr.shape == (4 * LR_SHAPE[0], 4 * LR_SHAPE[1], 3)
    np.testing.assert_array_equal(sr, reference(lr, seed=0))

"""The exported models run as they are in other runtimes: Node.js (onnxruntime-node), the browser
(onnxruntime-web in headless Chromium), OpenCV's DNN module, and a plain onnxruntime script. Each must
agree with Python ONNX Runtime on >= 99.9 % of the pixels of an odd-size image. A missing tool skips
its test with the reason; .ci/run installs them so that CI runs them all."""

import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_edge.backends import open_backend

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def reference_mask(e2e_dir, odd_image):
    """Python ONNX Runtime's mask of the odd-size image (from the end-to-end model)."""
    image = np.asarray(Image.open(odd_image).convert("RGB"))
    mask = open_backend(e2e_dir / "model_e2e.onnx").segment(image[None])[0]
    assert len(np.unique(mask)) >= 2  # a mask of one class would make agreement trivial
    return mask


def need_node_modules(folder: Path, package: str) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed (Node.js >= 18 is needed)")
    if not (folder / "node_modules" / package).is_dir():
        pytest.skip(
            f"{folder.relative_to(REPO)}/node_modules/{package} missing: run `npm ci` in {folder.relative_to(REPO)} "
            f"(.ci/run does)"
        )


@pytest.mark.slow
def test_python_onnxruntime_example(e2e_dir, odd_image, reference_mask, tmp_path, agreement):
    mask_path = tmp_path / "mask.png"
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "python" / "segment.py"),
            str(e2e_dir / "model_e2e.onnx"),
            str(odd_image),
            str(mask_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert list(counts) == ["background", "circle", "square", "triangle"] and sum(counts.values()) == 97 * 131
    assert agreement(np.asarray(Image.open(mask_path)), reference_mask) >= 0.999


@pytest.mark.slow
def test_node_onnxruntime_node_example(e2e_dir, odd_image, reference_mask, tmp_path, agreement):
    folder = EXAMPLES / "node"
    need_node_modules(folder, "onnxruntime-node")
    mask_path = tmp_path / "mask.png"
    result = subprocess.run(
        ["node", "segment.mjs", str(e2e_dir / "model_e2e.onnx"), str(odd_image), str(mask_path)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["width"], report["height"], report["dims"]) == (131, 97, [1, 97, 131])
    mask = np.asarray(Image.open(mask_path))
    assert mask.shape == (97, 131)
    assert agreement(mask, reference_mask) >= 0.999


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def web_site(e2e_dir, tmp_path):
    """examples/web served on a free localhost port, with the exported model and manifest beside the page."""
    site = tmp_path / "site"
    site.mkdir()
    for name in ("index.html", "app.js", "node_modules"):
        (site / name).symlink_to(EXAMPLES / "web" / name)
    for name in ("model_e2e.onnx", "manifest.json"):
        shutil.copy(e2e_dir / name, site / name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_browser_onnxruntime_web_in_headless_chromium(web_site, odd_image, reference_mask, tmp_path, agreement):
    folder = EXAMPLES / "web"
    need_node_modules(folder, "onnxruntime-web")
    need_node_modules(folder, "playwright-core")
    mask_path, screenshot = tmp_path / "mask.bin", tmp_path / "browser.png"
    result = subprocess.run(
        ["node", "headless.mjs", web_site, str(odd_image), str(mask_path), str(screenshot), CHROMIUM],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["state"] == "done" and "segmented odd.png (131x97)" in report["status"]
    mask = np.fromfile(mask_path, dtype=np.uint8).reshape(97, 131)
    assert agreement(mask, reference_mask) >= 0.999
    print(f"browser screenshot: {screenshot}")
    shot = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3)
    from unet_edge.predict import class_palette

    palette = class_palette(4)
    for index in np.unique(mask):  # the page drew the mask in the palette's colours
        assert (shot == palette[index]).all(1).sum() > 100, f"class {index} colour not on the page"


@pytest.mark.slow
def test_opencv_dnn_runs_the_float_model(e2e_dir, odd_image, reference_mask, tmp_path, agreement):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed (pip install -e '.[dev]')")
    mask_path = tmp_path / "mask.png"
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "opencv" / "segment.py"),
            str(e2e_dir / "model.onnx"),
            str(odd_image),
            str(mask_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"OpenCV {cv2.__version__}: {result.stderr[-2000:]}"
    mask = np.asarray(Image.open(mask_path))
    assert mask.shape == (97, 131)
    float_mask = open_backend(e2e_dir / "model.onnx").segment(np.asarray(Image.open(odd_image).convert("RGB"))[None])[0]
    assert agreement(mask, float_mask) >= 0.999
    assert agreement(mask, reference_mask) >= 0.999


def test_readme_embedding_snippets_come_from_tested_programs():
    """Every line of the README's Python, Node.js and browser snippets appears in an example the tests run."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Embedding", 1)[1].split("\n## ", 1)[0]
    sources = {
        "python": (EXAMPLES / "python" / "segment.py").read_text() + (EXAMPLES / "opencv" / "segment.py").read_text(),
        "js": (EXAMPLES / "node" / "segment.mjs").read_text() + (EXAMPLES / "web" / "app.js").read_text(),
    }
    blocks = re.findall(r"```(python|js)\n(.*?)```", section, flags=re.S)
    assert {language for language, _ in blocks} == {"python", "js"} and len(blocks) >= 3
    for language, code in blocks:
        for line in filter(str.strip, code.splitlines()):
            if line.strip() not in ("...", "// ...", "# ..."):
                assert line.strip() in sources[language], f"README {language} line not in a tested example: {line!r}"

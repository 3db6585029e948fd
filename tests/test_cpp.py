"""The C++ hosts of examples/cpp, built once per session against the runtimes' own packages (OpenVINO, ExecuTorch,
libtorch's AOTInductor loader): each program's masks agree with `unet-edge predict` on the same file, and a damaged
or missing model file gets one error line and a non-zero exit. Without a compiler, CMake or the Debian libraries
(`make test-tools` installs them) the tests skip with the reason."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SOURCE = Path(__file__).resolve().parents[1] / "examples" / "cpp"
# program -> the file of the session's export it runs
HOSTS = {"unet_openvino": "model.xml", "unet_executorch": "model.pte", "unet_aoti": "model.pt2"}
HEADERS = {"libpng-dev": "png.h", "libssl-dev": "openssl/evp.h", "nlohmann-json3-dev": "nlohmann/json.hpp"}


def missing_tools() -> str | None:
    """What the build lacks here (None: nothing)."""
    missing = [tool for tool in ("cmake", "g++", "make") if shutil.which(tool) is None]
    missing += [package for package, header in HEADERS.items() if not (Path("/usr/include") / header).is_file()]
    return f"{', '.join(missing)} missing: `make test-tools` installs them" if missing else None


@pytest.fixture(scope="session")
def hosts(tmp_path_factory) -> dict[str, Path | str]:
    """Configure and build examples/cpp once (two jobs): program name -> its path, or the reason it was not built."""
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    build = tmp_path_factory.mktemp("cpp-build")
    start = time.perf_counter()
    configure = subprocess.run(
        ["cmake", "-S", str(SOURCE), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, timeout=900)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    print(f"examples/cpp configured and built in {time.perf_counter() - start:.0f} s")
    built: dict[str, Path | str] = {}
    for name in HOSTS:
        skipped = re.search(rf"{name} skipped: (.*)", configure.stdout)
        built[name] = skipped.group(1) if skipped else build / name
    return built


@pytest.fixture(params=list(HOSTS))
def host(request, hosts) -> tuple[Path, str]:
    """(program, the model file it runs); a program whose runtime package is missing is skipped with the reason."""
    program = hosts[request.param]
    if isinstance(program, str):
        pytest.skip(f"{request.param}: {program}")
    return program, HOSTS[request.param]


def run(program: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_masks_agree_with_predict(host, exported_all, tiny_data, odd_image, predicted_masks, tmp_path, agreement):
    program, file = host
    model = exported_all[0] / file
    expected = predicted_masks(model)
    images = [*sorted((tiny_data / "val" / "images").iterdir()), odd_image]
    masks = {}
    for image in images:
        mask_path = tmp_path / f"{image.stem}_mask.png"
        timed = image == odd_image  # --repeat: the mask as without it, and the timings as JSON on stdout
        result = run(program, model, image, mask_path, *(["--repeat", "3"] if timed else []))
        assert result.returncode == 0, result.stderr
        if timed:
            report = json.loads(result.stdout.strip().splitlines()[-1])
            assert report["calls"] == 3 and len(report["latency_ms"]) == 3 and 0 < report["min_ms"] <= report["p50_ms"]
        masks[mask_path.name] = np.array(Image.open(mask_path))
        assert Image.open(mask_path).getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    assert masks.keys() == expected.keys() and masks["odd_mask.png"].shape == (97, 131)
    flat = [np.concatenate([m[name].ravel() for name in sorted(expected)]) for m in (masks, expected)]
    assert len(np.unique(flat[1])) >= 2  # agreement with a one-class mask would prove little
    assert agreement(*flat) >= 0.999
    assert agreement(masks["odd_mask.png"], expected["odd_mask.png"]) >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tampered", "truncated", "missing"])
def test_a_damaged_or_missing_model_gets_one_error_line(how, host, exported_all, odd_image, tmp_path, damaged_copy):
    program, file = host
    damaged = damaged_copy(exported_all[0], file, tmp_path / "copy", how)
    mask_path = tmp_path / "mask.png"
    result = run(program, damaged, odd_image, mask_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {damaged}: "), result.stderr
    expected = {"tampered": "file was modified", "truncated": "file was truncated", "missing": "file not found"}[how]
    assert expected in lines[0] and not mask_path.exists()


@pytest.mark.slow
def test_a_bad_command_line_gets_one_error_line(hosts, odd_image, tmp_path):
    program = next((p for p in hosts.values() if isinstance(p, Path)), None)
    if program is None:
        pytest.skip("no C++ host was built")
    result = run(program, odd_image, "--repeat", "0")
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "--repeat takes a positive integer" in result.stderr


@pytest.mark.slow
def test_the_executorch_host_refuses_an_image_beyond_the_program_bounds(hosts, exported_all, tmp_path):
    """The runtime does not check the bounds its memory was planned for (--max-size, 1024 here): the host does."""
    program = hosts["unet_executorch"]
    if isinstance(program, str):
        pytest.skip(f"unet_executorch: {program}")
    image = tmp_path / "tall.png"
    Image.fromarray(np.zeros((1025, 3, 3), np.uint8)).save(image)
    result = run(program, exported_all[0] / "model.pte", image, tmp_path / "mask.png")
    assert result.returncode != 0 and not (tmp_path / "mask.png").exists()
    assert result.stderr.strip().splitlines() == [
        f"error: {image}: a 1025x3 image is outside the program's bounds (height 2..1024, width 2..1024; "
        "export with a larger --max-size)"
    ]


@pytest.mark.slow
def test_the_export_folder_says_how_to_build_and_run_each_host(exported_all):
    text = (exported_all[0] / "EMBEDDING.md").read_text()
    for program, file in HOSTS.items():
        assert f"build/{program} {file} image.png mask.png" in text
        assert f"## Embedding `{file}`" in text


def test_the_readme_shows_the_cpp_lines_each_format_gives():
    from unet_edge.formats import FORMATS

    readme = (SOURCE.parents[1] / "README.md").read_text(encoding="utf-8")
    programs = {fmt.file: fmt.embedding.cpp for fmt in FORMATS.values() if fmt.embedding and fmt.embedding.cpp}
    assert set(programs) == set(HOSTS.values())
    assert programs["model.pt2"].format(model="model.pt2").rstrip() in readme
    for program in HOSTS:
        assert f"`{program}`" in readme

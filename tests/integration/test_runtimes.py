"""Issue 16: Lite0 on compiled runtimes (ONNX Runtime, OpenVINO): exact features, a keyed export
cache, no torch in a worker that runs the exported graph, and chunk keys that never mix
features that differ."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsketch.config import Settings
from recsketch.errors import ConfigError
from recsketch.features import keys, runtimes
from recsketch.features.backbones import EfficientNetLite0Backbone
from recsketch.features.factory import create_backbone
from recsketch.features.keys import backbone_key

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checked export for the module (made as a worker makes it on first use)."""
    folder = tmp_path_factory.mktemp("data")
    runtimes.ensure_export(folder / "exports", threads=2)
    return folder


@pytest.fixture(scope="module")
def photos(demo_catalog: Path) -> np.ndarray:
    """The fixed check photos and the demo catalogue's real thumbnails, decoded as extraction does."""
    from recsketch.features.images import decode_image

    thumbs = sorted((demo_catalog / "model_thumbs").glob("*.jpg"))[:24]
    decoded = np.stack([decode_image(path.read_bytes(), 224, str(path)) for path in thumbs])
    return np.concatenate([runtimes.check_images(), decoded])


@pytest.fixture(scope="module")
def torch_fp32(photos: np.ndarray) -> np.ndarray:
    return EfficientNetLite0Backbone("float32").embed(photos)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exact_runtimes_reproduce_torch_fp32_on_real_photos(runtime: str, exports: Path, photos: np.ndarray,
                                                            torch_fp32: np.ndarray) -> None:
    if not runtimes.installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    settings = Settings(data_dir=exports, runtime=runtime)
    backbone = create_backbone(settings)
    assert type(backbone).__name__ == {"onnxruntime": "OnnxRuntimeLite0", "openvino": "OpenVinoLite0"}[runtime]
    got = np.concatenate([backbone.embed(photos[i:i + 4]) for i in range(0, len(photos), 4)])
    assert got.shape == torch_fp32.shape == (len(photos), 1280)
    assert runtimes.cosines(torch_fp32, got).min() >= runtimes.EXACT_COSINE
    # proven exact: it shares torch fp32's chunk key, so stored chunks stay valid
    assert backbone.key == EfficientNetLite0Backbone("float32").key
    assert backbone_key(settings) == backbone_key(Settings(data_dir=exports, runtime="torch"))


def test_auto_picks_the_fastest_exact_runtime_here_and_refuses_what_cannot_run(
        exports: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert keys.resolve_runtime("efficientnet_lite0", "auto", "float32") == "exact"
    monkeypatch.setenv("RECSKETCH_CACHE_DIR", str(tmp_path))
    backbone = create_backbone(Settings(data_dir=exports))
    choice = json.loads((tmp_path / "runtime-choice.json").read_text())
    assert list(choice.values()) == [backbone.runtime] and backbone.runtime in runtimes.EXACT_RUNTIMES
    measured = []
    monkeypatch.setattr(runtimes, "check_images", lambda: measured.append(1) or np.zeros((4, 224, 224, 3), np.uint8))
    assert create_backbone(Settings(data_dir=exports)).runtime == backbone.runtime and not measured  # remembered
    assert keys.resolve_runtime("vgg16", "auto") == "tensorflow"
    with pytest.raises(ConfigError, match="cannot run vgg16"):
        keys.resolve_runtime("vgg16", "onnxruntime")
    with pytest.raises(ConfigError, match="float32 only"):
        keys.resolve_runtime("efficientnet_lite0", "onnxruntime", "bfloat16")
    with pytest.raises(ConfigError, match="cannot run efficientnet_lite0"):
        keys.resolve_runtime("efficientnet_lite0", "tensorflow")


def test_reduced_precision_chunks_are_keyed_by_runtime(tmp_path: Path) -> None:
    """torch autocast bf16 and OpenVINO bf16 round differently: never the same chunks."""
    if not runtimes.installed("openvino"):
        pytest.skip("openvino is not installed")
    keys = {runtime: backbone_key(Settings(data_dir=tmp_path, runtime=runtime, lite0_precision="bfloat16"))
            for runtime in ("torch", "openvino")}
    assert keys["torch"] == "efficientnet_lite0-avg-bfloat16-imagenet-crop"  # as before: stored chunks stay valid
    assert keys["openvino"] == "efficientnet_lite0-avg-bfloat16-imagenet-openvino-crop"
    assert backbone_key(Settings(data_dir=tmp_path, lite0_precision="bfloat16")) == keys["openvino"]  # auto


def test_the_export_cache_is_keyed_by_weights_and_exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "lite0.pth"
    shutil.copyfile(runtimes.lite0_weights_path(), weights)
    key = runtimes.export_key(weights)
    assert runtimes.export_key(weights) == key  # stable
    changed = tmp_path / "changed.pth"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    assert runtimes.export_key(changed) != key  # other weights: another export
    monkeypatch.setattr(runtimes, "EXPORT_VERSION", runtimes.EXPORT_VERSION + 1)
    assert runtimes.export_key(weights) != key  # another graph version: another export
    monkeypatch.undo()
    real = runtimes.version_of
    monkeypatch.setattr(runtimes, "version_of", lambda package: "9.9.9" if package == "torch" else real(package))
    assert runtimes.export_key(weights) != key  # another exporter: another export


def test_an_export_is_made_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = runtimes._export_onnx
    monkeypatch.setattr(runtimes, "_export_onnx", lambda weights: calls.append(1) or real(weights))
    first, path = runtimes.ensure_export(tmp_path / "exports")
    again, same = runtimes.ensure_export(tmp_path / "exports")
    assert calls == [1] and first == again and path == same and Path(str(path)).name.startswith("lite0-")


def test_an_export_that_disagrees_with_torch_is_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtimes, "_torch_reference",
                        lambda images: np.random.default_rng(0).standard_normal((len(images), 1280)))
    with pytest.raises(runtimes.ExportFailed, match="agrees with torch only"):
        runtimes.ensure_export(tmp_path / "exports")
    assert not (tmp_path / "exports").exists() or not list((tmp_path / "exports").iterdir())
    # auto falls back to torch (same chunk key); an explicit runtime fails, named
    assert type(create_backbone(Settings(data_dir=tmp_path))).__name__ == "EfficientNetLite0Backbone"
    with pytest.raises(runtimes.ExportFailed):
        create_backbone(Settings(data_dir=tmp_path, runtime="onnxruntime"))


def test_a_worker_with_the_export_extracts_without_importing_torch(exports: Path, demo_catalog: Path,
                                                                   tmp_path: Path) -> None:
    code = f"""
import json, sys
from pathlib import Path
from recsketch.config import Settings
from recsketch.features.factory import create_backbone
from recsketch.resources import limit_threads
from recsketch.features.chunks import ChunkStore
from recsketch.features.extract import extract_chunk
settings = Settings(data_dir=Path({str(exports)!r}))
limit_threads(2)
backbone = create_backbone(settings, 2)
store = ChunkStore(Path({str(tmp_path)!r}) / "features", backbone.key)
folder = Path({str(demo_catalog)!r}, "model_thumbs")
mids = [t.name[:32] for t in sorted(folder.glob("*.jpg"))[:10]]
report = extract_chunk(store, backbone, "c1", mids, lambda m: folder / (m + "_thumb200.jpg"))
print(json.dumps({{"torch": "torch" in sys.modules, "images": report.images, "rows": len(store.read("c1").mids)}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"torch": False, "images": 10, "rows": 10}


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_each_thread_is_a_lane_and_lanes_embed_alike(runtime: str, exports: Path, photos: np.ndarray) -> None:
    """A backbone built for 2 threads runs 2 single-threaded lanes at once; batches embedded
    concurrently on them give the same features, in order, as one after another."""
    if not runtimes.installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    from recsketch.features.extract import embed_many

    backbone = runtimes.lite0_backbone(runtime, "float32", exports / "exports", threads=2)
    assert backbone.lanes == 2
    batches = [photos[i:i + 4] for i in range(0, len(photos), 4)]
    at_once = np.concatenate(embed_many(backbone, batches))
    one_by_one = np.concatenate([backbone.embed(batch) for batch in batches])
    np.testing.assert_allclose(at_once, one_by_one, rtol=1e-5, atol=1e-6)
    assert runtimes.lite0_backbone(runtime, "float32", exports / "exports", threads=1).lanes == 1

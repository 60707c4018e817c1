#!/usr/bin/env bash
# Installs block_attn from this checkout into the current Python environment.
# Installs the pinned CPU torch (pyproject.toml's torch-cpu) first when no torch is present, then
# builds the extension against that torch (--no-build-isolation: an isolated build would pull a
# second multi-GB torch).
#
# A re-run reuses the installed extension when nothing it is built from changed: the sources
# under csrc/, setup.py, pyproject.toml, the torch and compiler versions, the build's environment
# variables and, for -march=native, the CPU (build/extension_stamp.json records them). Otherwise
# it rebuilds; once installed from this checkout, in place with ninja's object files kept in
# build/temp, so only the objects whose sources changed are compiled again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STAMP=build/extension_stamp.json

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  torch_version="$(bash scripts/pinned_torch.sh torch-cpu)"
  echo "no torch found: installing torch $torch_version (CPU build)"
  "$PYTHON" -m pip install --quiet "torch==$torch_version"
fi
# pip takes seconds even when everything is installed, so ask it only when something is missing.
if ! "$PYTHON" -c "
import importlib.metadata, importlib.util
names = ['accelerate', 'expecttest', 'matplotlib', 'ninja', 'numpy', 'pytest', 'setuptools', 'tqdm',
         'transformers', 'wheel']
assert all(importlib.util.find_spec(name) for name in names)
assert int(importlib.metadata.version('setuptools').split('.')[0]) >= 64
" >/dev/null 2>&1; then
  # transformers and accelerate: tests/test_transformers_backend.py tests the newest release.
  "$PYTHON" -m pip install --quiet "setuptools>=64" wheel ninja pytest expecttest numpy matplotlib tqdm \
    transformers accelerate
fi

# STAMP_PY check: exits 0 (saying what it reuses) when the installed extension was built from
# what is here now, else 1 (saying why it builds); digest: prints the digest of what the build
# depends on; installed: exits 0 when block_attn is installed editable from this checkout;
# record DIGEST: writes the stamp after a build.
read -r -d '' STAMP_PY <<'PY' || true
import hashlib, importlib.util, json, os, pathlib, platform, shutil, subprocess, sys, sysconfig

stamp_path = pathlib.Path(sys.argv[2])
library = pathlib.Path("block_attn", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
sources = sorted(
    p for p in pathlib.Path("csrc").rglob("*") if p.is_file() and "__pycache__" not in p.parts
)
sources += [pathlib.Path("setup.py"), pathlib.Path("pyproject.toml")]


def command_output(*command: str) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""


def build_digest() -> str:
    """Digest of everything the built extension depends on."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(f"{path}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    settings = ["BLOCK_ATTN_CUDA", "BLOCK_ATTN_CPU_ARCH", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME",
                "CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS"]
    for name in settings:
        digest.update(f"{name}={os.environ.get(name)}\0".encode())
    # torch/version.py names torch's version, CUDA version and commit; read, not imported,
    # because importing torch takes seconds.
    torch_dir = importlib.util.find_spec("torch").submodule_search_locations[0]
    digest.update(pathlib.Path(torch_dir, "version.py").read_bytes())
    digest.update(f"{sys.version}\0".encode())
    digest.update(command_output(os.environ.get("CXX", "c++"), "--version").encode())
    nvcc = shutil.which("nvcc")
    if nvcc:
        digest.update(command_output(nvcc, "--version").encode())
    if os.environ.get("BLOCK_ATTN_CPU_ARCH", "") == "native":
        # -march=native binds the build to this CPU's instruction set.
        cpu = pathlib.Path("/proc/cpuinfo")
        if cpu.is_file():
            flags = [line for line in cpu.read_text().splitlines() if line.startswith("flags")]
            digest.update(flags[0].encode() if flags else b"")
        digest.update(platform.machine().encode())
    return digest.hexdigest()


def installed_from_here() -> bool:
    """Whether pip's record of block_attn is an editable install of this checkout."""
    import importlib.metadata

    here = {"", os.getcwd()}
    try:
        dist = next(importlib.metadata.distributions(
            name="block_attn", path=[p for p in sys.path if p not in here]))
        url = json.loads(dist.read_text("direct_url.json") or "{}")
    except (StopIteration, ValueError):
        return False
    editable = url.get("dir_info", {}).get("editable", False)
    return editable and url.get("url") == pathlib.Path.cwd().resolve().as_uri()


def library_identity() -> list[int]:
    status = library.stat()
    return [status.st_size, status.st_mtime_ns]


def check() -> str | None:
    """Why the extension must be rebuilt, or None when the installed one can be reused."""
    if not library.is_file():
        return f"{library} does not exist"
    if not stamp_path.is_file():
        return "no record of an earlier build"
    stamp = json.loads(stamp_path.read_text())
    if stamp.get("library") != library_identity():
        return f"{library} was rebuilt since the last recorded build"
    if stamp.get("digest") != build_digest():
        return "sources or build settings changed since the last build"
    # Also rebuild for a source that is only newer (touched), as make and ninja would.
    built = library.stat().st_mtime_ns
    newer = [str(p) for p in sources if p.stat().st_mtime_ns > built]
    if newer:
        return f"{newer[0]} is newer than {library}"
    if not installed_from_here():
        return "block_attn is not installed from this checkout"
    return None


if sys.argv[1] == "digest":
    print(build_digest())
elif sys.argv[1] == "installed":
    sys.exit(0 if installed_from_here() else 1)
elif sys.argv[1] == "record":
    stamp_path.parent.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps({"digest": sys.argv[3], "library": library_identity()}))
else:
    reason = check()
    if reason:
        print(f"building the extension: {reason}")
        sys.exit(1)
    print(f"extension up to date (sources unchanged since the last build): reused {library}")
PY

if ! "$PYTHON" -c "$STAMP_PY" check "$STAMP"; then
  digest="$("$PYTHON" -c "$STAMP_PY" digest "$STAMP")"
  if "$PYTHON" -c "$STAMP_PY" installed "$STAMP"; then
    # Already installed from here: rebuild in place, where ninja keeps its object files in
    # build/temp and recompiles only those whose sources or flags changed (--force: setuptools
    # alone would skip an extension whose sources are older than it, even with new flags).
    echo "compiling (log: build/build.log)"
    mkdir -p build  # a fresh checkout where an earlier one stood has none yet
    if ! "$PYTHON" -W ignore setup.py build_ext --inplace --force --build-temp build/temp \
      > build/build.log 2>&1; then
      tail -n 40 build/build.log
      exit 1
    fi
  else
    # pip's editable build compiles in a fresh temporary folder, so this builds everything.
    "$PYTHON" -m pip install --quiet --no-build-isolation --no-deps -e .
  fi
  "$PYTHON" -c "$STAMP_PY" record "$STAMP" "$digest"
fi
"$PYTHON" -m block_attn --info

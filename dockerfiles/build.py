#!/usr/bin/env python3
"""Build and test the project's images: docker where a daemon answers, buildah otherwise.

    python3 dockerfiles/build.py build cpu|cuda   # make image / make image-cuda
    python3 dockerfiles/build.py test cpu|cuda    # make image-test / make image-test-cuda
    python3 dockerfiles/build.py context          # the files the build context holds

Standard library only: it runs before any venv exists (CI on a fresh machine).

* Every image is also tagged ``<image>-src.<digest>``, a hash of the build context (the files
  .dockerignore lets through), the Dockerfile and the build arguments. ``test`` builds when
  that tag is missing, so it never tests an image built from other sources.
* Where the pinned base (``PYTHON_IMAGE``) cannot be pulled, an equivalent base is made with
  debootstrap (Debian of the same release, its python3 of the same minor version).
* This machine's pip settings (``pip config list``: index mirrors, CA bundle, constraints)
  reach pip inside the build as BuildKit secrets; local folders among them (file:// indexes,
  find-links) are served read-only over HTTP on 127.0.0.1 for the length of the build. None
  of it lands in a layer, and ``build`` checks the finished image for traces of it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = {"cpu": REPO / "dockerfiles" / "Dockerfile", "cuda": REPO / "dockerfiles" / "Dockerfile.cuda",
               "serve": REPO / "dockerfiles" / "Dockerfile.serve"}
# Each image's tag suffix and the variable that names it instead (as the cluster settings read them).
SUFFIXES = {"cpu": "", "cuda": "-cuda", "serve": "-serve"}
IMAGE_VARIABLES = {"cpu": "BINCOUNTER_IMAGE", "cuda": "BINCOUNTER_CUDA_IMAGE", "serve": "BINCOUNTER_SERVING_IMAGE"}
LOCAL_BASE_REPO = "localhost/bincounter-base"
USER = "10001:10001"
# What pip.conf calls these settings; which ones are files, folders or URLs decides how they travel.
SECRET_IDS = ("pip_conf", "pip_ca", "pip_constraints")


def log(msg: str) -> None:
    print(f"[image] {msg}", flush=True)


def run(cmd: list[str], check: bool = True, capture: bool = False, timeout: float | None = None,
        **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, timeout=timeout,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None, **kw)


# --------------------------------------------------------------------------- build context


def _ignore_patterns(root: Path) -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (exclude?, regex) pairs; the last matching one wins, as in Docker."""
    path = root / ".dockerignore"
    patterns = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if include else line).lstrip("/")
        patterns.append((not include, re.compile(_glob_to_regex(pattern))))
    return patterns


def _glob_to_regex(pattern: str) -> str:
    """Docker's pattern syntax (Go's filepath.Match plus ``**``) as a regex over posix paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                body = pattern[i + 1:end]
                out.append("[" + ("^" + body[1:] if body.startswith("^") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out) + "$"


def _excluded(rel: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    # A pattern that matches a parent folder excludes everything inside it.
    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for exclude, regex in patterns:
        if any(regex.match(p) for p in prefixes):
            excluded = exclude
    return excluded


def context_files(root: Path = REPO) -> list[str]:
    """The files (posix paths relative to ``root``) that a build with this context receives."""
    patterns = _ignore_patterns(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # Prune excluded folders unless a "!" pattern could bring something inside back.
        if not any(not exclude for exclude, _ in patterns):
            dirnames[:] = [d for d in dirnames if not _excluded(rel_dir + d, patterns)]
        for name in filenames:
            rel = rel_dir + name
            if not _excluded(rel, patterns):
                files.append(rel)
    return sorted(files)


def dockerfile_copy_sources(dockerfile: Path) -> list[str]:
    """Sources of every COPY/ADD that reads the build context (not ``--from`` a stage, not a URL)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    sources = []
    for line in text.splitlines():
        words = shlex.split(line.strip(), comments=False) if re.match(r"^\s*(COPY|ADD)\s", line) else []
        if not words or any(w.startswith("--from") for w in words):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        sources += [s for s in args[:-1] if "://" not in s]
    return sources


def context_digest(root: Path, dockerfile: Path, build_args: dict[str, str]) -> str:
    """A hash of everything the image is built from; any change gives a new tag."""
    h = hashlib.sha256()
    for rel in context_files(root):
        path = root / rel
        h.update(rel.encode() + b"\0" + (b"x" if os.access(path, os.X_OK) else b"-") + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(dockerfile.read_bytes())
    h.update(json.dumps(sorted(build_args.items())).encode())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- engines


@functools.cache
def engine() -> str:
    """``docker`` when its daemon answers, else ``buildah`` (installed from Debian when missing)."""
    forced = os.environ.get("CONTAINER_ENGINE")
    if forced:
        return forced
    if shutil.which("docker") and run(["docker", "info"], check=False, capture=True, timeout=30).returncode == 0:
        return "docker"
    if not shutil.which("buildah"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            sys.exit("no docker daemon and no buildah: install one (Debian/Ubuntu: apt-get install buildah debootstrap)")
        log("no docker daemon: installing buildah and debootstrap with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "buildah", "debootstrap"], env=env)
    return "buildah"


def image_exists(ref: str) -> bool:
    cmd = ["docker", "image", "inspect", ref] if engine() == "docker" else ["buildah", "inspect", "--type", "image", ref]
    return run(cmd, check=False, capture=True).returncode == 0


def image_size(ref: str) -> str:
    """Uncompressed size of the image's layers, as the engine prints it."""
    if engine() == "docker":
        return fmt_size(int(run(["docker", "image", "inspect", "--format", "{{.Size}}", ref], capture=True).stdout))
    return json.loads(run(["buildah", "images", "--json", ref], capture=True).stdout)[0]["size"]


def image_config(ref: str) -> dict:
    """env, labels and history of an image, as {"env": [...], "labels": {...}, "history": [...]}."""
    if engine() == "docker":
        data = json.loads(run(["docker", "image", "inspect", ref], capture=True).stdout)[0]
        lines = run(["docker", "history", "--no-trunc", "--format", "{{json .}}", ref], capture=True).stdout
        history = [json.loads(line) for line in lines.splitlines() if line.strip()]
        return {"env": data["Config"].get("Env") or [], "labels": data["Config"].get("Labels") or {},
                "history": [h.get("CreatedBy", "") for h in history]}
    data = json.loads(run(["buildah", "inspect", "--type", "image", ref], capture=True).stdout)["OCIv1"]
    cfg = data.get("config", {})
    return {"env": cfg.get("Env") or [], "labels": cfg.get("Labels") or {},
            "history": [h.get("created_by", "") for h in data.get("history", [])]}


def fmt_size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


# --------------------------------------------------------------------------- base image


def dockerfile_default(dockerfile: Path, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S*)", dockerfile.read_text(), re.M)
    return m.group(1) if m else ""


def resolve_base(pinned: str) -> str:
    """The pinned base when it is here or can be pulled; otherwise an equivalent Debian base."""
    # buildah resolves no short names here: spell out Docker Hub's.
    first = pinned.split("/")[0] if "/" in pinned else ""
    if engine() == "buildah" and "." not in first and ":" not in first and first != "localhost":
        pinned = ("docker.io/" if "/" in pinned else "docker.io/library/") + pinned
    if image_exists(pinned):
        return pinned
    pull = ["docker", "pull", pinned] if engine() == "docker" else ["buildah", "pull", "--quiet", pinned]
    try:
        if run(pull, check=False, capture=True, timeout=300).returncode == 0:
            return pinned
    except subprocess.TimeoutExpired:
        pass
    m = re.search(r"python:(\d+)\.(\d+)[.\d]*-slim-(\w+)$", pinned)
    if not m:
        sys.exit(f"cannot pull the base {pinned}, and only python:X.Y.Z-slim-<debian> bases can be made locally")
    minor, suite = f"{m.group(1)}.{m.group(2)}", m.group(3)
    local = f"{LOCAL_BASE_REPO}:{suite}-python{minor}"
    log(f"cannot pull {pinned}: using {local}, an equivalent base made locally with debootstrap "
        f"(Debian {suite}, its python3 {minor}, python-is-python3, ca-certificates)")
    if not image_exists(local):
        make_debian_base(local, suite, minor)
    return local


def make_debian_base(ref: str, suite: str, minor: str) -> None:
    """A minimal Debian with python3 (+venv) as ``python``, like the official slim image."""
    if not shutil.which("debootstrap"):
        run(["apt-get", "install", "-y", "-qq", "debootstrap"], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bincounter-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        mirror = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python-is-python3,ca-certificates",
             suite, str(rootfs), mirror], capture=True)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        version = run(["chroot", str(rootfs), "python", "--version"], capture=True).stdout.split()[1]
        if not version.startswith(minor + "."):
            sys.exit(f"debootstrap's {suite} has python {version}, not {minor}: pass PYTHON_IMAGE for another base")
        env = ["LANG=C.UTF-8", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        if engine() == "docker":
            changes = [a for e in env for a in ("--change", f"ENV {e.replace('=', ' ', 1)}")]
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            run(["docker", "import", *changes, "--change", 'CMD ["python3"]', "-", ref], stdin=tar.stdout, capture=True)
            tar.wait()
        else:
            ctr = run(["buildah", "from", "scratch"], capture=True).stdout.strip()
            try:
                mnt = run(["buildah", "mount", ctr], capture=True).stdout.strip()
                run(["cp", "-a", f"{rootfs}/.", mnt + "/"])
                run(["buildah", "umount", ctr], capture=True)
                run(["buildah", "config", *[a for e in env for a in ("--env", e)], "--cmd", "python3",
                     "--label", f"org.opencontainers.image.description=Debian {suite} minbase with python3 {version} (debootstrap)",
                     ctr], capture=True)
                run(["buildah", "commit", "--quiet", ctr, ref], capture=True)
            finally:
                run(["buildah", "rm", ctr], check=False, capture=True)
    log(f"made {ref} (python {version}, {image_size(ref)}) in {time.perf_counter() - started:.0f} s")


# --------------------------------------------------------------------------- pip settings


@functools.cache
def host_pip_config() -> dict[str, str]:
    """The machine's effective pip settings (``pip config list``), environment over files."""
    proc = run([sys.executable, "-m", "pip", "config", "list"], check=False, capture=True)
    if proc.returncode != 0 and shutil.which("pip3"):
        proc = run(["pip3", "config", "list"], check=False, capture=True)
    settings: dict[str, tuple[int, str]] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^([^.=]*)\.([\w-]+)='(.*)'$", line.strip())
        if not m:
            continue
        scope, key, value = m.groups()
        rank = 2 if scope == ":env:" else 1 if scope in ("global", "install", "download", "wheel") else 0
        key = "timeout" if key == "default-timeout" else key
        if rank and rank >= settings.get(key, (0, ""))[0]:
            settings[key] = (rank, value)
    return {k: v for k, (_, v) in settings.items()}


class _ReadOnlyFiles(http.server.SimpleHTTPRequestHandler):
    """Serves files by their absolute path, only below the allowed roots."""

    roots: tuple[Path, ...] = ()

    def translate_path(self, path: str) -> str:
        local = Path(urllib.parse.unquote(urllib.parse.urlsplit(path).path)).resolve()
        if not any(local == r or r in local.parents for r in self.roots):
            return "/nonexistent"
        return str(local)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def pip_secrets(tmp: Path) -> Iterator[tuple[dict[str, Path], list[str]]]:
    """Secret files for the build and the host strings that must never reach the image."""
    settings = host_pip_config()
    conf: dict[str, str] = {}
    files = {name: tmp / name for name in SECRET_IDS}
    for f in files.values():
        f.write_text("")
    needles: list[str] = []
    folders: list[Path] = []

    def local_folder(url: str) -> Path | None:
        path = Path(urllib.parse.urlsplit(url).path) if url.startswith("file://") else Path(url)
        return path if "://" not in url or url.startswith("file://") else None

    for key, value in settings.items():
        if key == "cert":
            files["pip_ca"].write_bytes(Path(value).read_bytes())
            conf[key] = "/run/secrets/pip_ca"
            # Its path is Debian's standard one, which packages name too: the check looks for
            # the host's bundle by content (its digest) rather than by path.
            needles.append("sha256:" + hashlib.sha256(files["pip_ca"].read_bytes()).hexdigest())
        elif key == "constraint":
            paths = value.split()
            files["pip_constraints"].write_text("\n".join(Path(p).read_text() for p in paths))
            conf[key] = "/run/secrets/pip_constraints"
            needles += paths
        elif key in ("index-url", "extra-index-url", "find-links"):
            entries = []
            for url in value.split():
                folder = local_folder(url)
                if folder is None:
                    entries.append(url)
                else:
                    folders.append(folder.resolve())
                    entries.append(("{server}" + urllib.parse.quote(str(folder.resolve()))) + "/")
                    needles.append(str(folder))
            conf[key] = " ".join(entries)
        elif key in ("client-cert", "requirement", "log", "cache-dir", "src", "target", "prefix", "root"):
            log(f"pip setting {key} is not passed into the build (a path on this machine)")
        else:
            conf[key] = value
    server = None
    if folders:
        # Parents too: a simple index links its files as ../../files/<wheel>.
        _ReadOnlyFiles.roots = tuple({p for f in folders for p in (f, f.parent)})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReadOnlyFiles)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        conf = {k: v.replace("{server}", base) for k, v in conf.items()}
        conf["trusted-host"] = " ".join(filter(None, [conf.get("trusted-host", ""), "127.0.0.1"]))
        needles.append(base)
        log(f"pip settings for the build: {', '.join(sorted(conf))}; local folders "
            f"{', '.join(map(str, folders))} served read-only on {base} during the build")
    files["pip_conf"].write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(conf.items())))
    try:
        yield files, needles
    finally:
        if server:
            server.shutdown()
            server.server_close()


# --------------------------------------------------------------------------- build


def reachable(url: str, cafile: str | None) -> bool:
    if not url:
        return True
    ctx = ssl.create_default_context(cafile=cafile) if cafile and Path(cafile).is_file() else ssl.create_default_context()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15, context=ctx):
            return True
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


def build_args(variant: str) -> dict[str, str]:
    """Build arguments for this machine: overrides from the environment, fallbacks where the
    Dockerfile's defaults cannot be reached (each one said out loud)."""
    dockerfile = DOCKERFILES[variant]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    args = {"VERSION": version + SUFFIXES[variant]}
    for name in ("PYTHON_IMAGE",) + (() if variant == "serve" else ("TORCH_INDEX_URL", "TORCH_VERSION",
                                                                    "TORCHVISION_VERSION", "EXTRAS")):
        if name in os.environ:
            args[name] = os.environ[name]
    cafile = host_pip_config().get("cert")
    index = "" if variant == "serve" else args.get("TORCH_INDEX_URL", dockerfile_default(dockerfile, "TORCH_INDEX_URL"))
    if index and not reachable(index.rstrip("/") + "/torch/", cafile):
        log(f"WARNING: {index} cannot be reached: torch comes from the default index instead "
            f"(on x86_64 Linux that is the CUDA build, several GB larger). Set TORCH_INDEX_URL to a reachable index.")
        args["TORCH_INDEX_URL"] = ""
    args["PYTHON_IMAGE"] = resolve_base(args.get("PYTHON_IMAGE", dockerfile_default(dockerfile, "PYTHON_IMAGE")))
    return args


def image_name(variant: str) -> str:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return os.environ.get(IMAGE_VARIABLES[variant]) or f"ghcr.io/bincounter/bincounter:{version}{SUFFIXES[variant]}"


def source_tag(variant: str, args: dict[str, str]) -> str:
    return f"{image_name(variant)}-src.{context_digest(REPO, DOCKERFILES[variant], args)}"


def build(variant: str, args: dict[str, str] | None = None) -> str:
    """Build the image; returns the source-tagged reference."""
    args = build_args(variant) if args is None else args
    image, tagged = image_name(variant), source_tag(variant, args)
    arg_flags = [a for k, v in sorted(args.items()) for a in ("--build-arg", f"{k}={v}")]
    with tempfile.TemporaryDirectory(prefix="bincounter-pip-") as tmp, pip_secrets(Path(tmp)) as (secrets, needles):
        secret_flags = [a for k, p in secrets.items() for a in ("--secret", f"id={k},src={p}")]
        if engine() == "docker":
            cmd = ["docker", "build", "--progress", "plain", "--network", "host", *arg_flags, *secret_flags,
                   "-f", str(DOCKERFILES[variant]), "-t", image, "-t", tagged, str(REPO)]
            env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        else:
            # --layers caches every step: a source change rebuilds only the package layers.
            # Docker's image format keeps HEALTHCHECK (OCI's has no field for it).
            cmd = ["buildah", "bud", "--isolation", "chroot", "--layers", "--format", "docker", "--network", "host", *arg_flags,
                   *secret_flags, "-f", str(DOCKERFILES[variant]), "-t", image, "-t", tagged, str(REPO)]
            env = None
        log(f"building {image} with {engine()} (tag {tagged})")
        started = time.perf_counter()
        stream_with_times(cmd, env)
        took = time.perf_counter() - started
    log(f"built {image} in {took:.0f} s; size {image_size(image)}")
    check_no_build_settings(tagged, needles)
    drop_stale_tags(image, tagged)
    return tagged


def drop_stale_tags(image: str, keep: str) -> None:
    """Untag this image's builds from older sources (the layer cache stays)."""
    cmd = (["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"] if engine() == "docker"
           else ["buildah", "images", "--format", "{{.Name}}:{{.Tag}}"])
    for ref in run(cmd, capture=True).stdout.split():
        if ref.startswith(image + "-src.") and ref != keep:
            run([engine(), "rmi", ref], check=False, capture=True)


def stream_with_times(cmd: list[str], env: dict | None) -> None:
    """Run the build, prefixing each step with the seconds since the start (where time goes)."""
    started = time.perf_counter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1) as proc:
        for line in proc.stdout:
            mark = re.search(r"STEP \d+/\d+|COMMIT|^#\d+ ", line)
            print(f"[{time.perf_counter() - started:6.0f}s] {line}" if mark else line, end="", flush=True)
    if proc.returncode:
        sys.exit(f"image build failed (exit {proc.returncode}): {shlex.join(cmd)}")


def check_no_build_settings(ref: str, needles: list[str]) -> None:
    """Fail when the image's env, labels, history or files carry the build's pip settings:
    a pip.conf, the secrets' mount points, the mirror URLs and folders, or the CA bundle."""
    digests = {n.removeprefix("sha256:") for n in needles if n.startswith("sha256:")}
    needles = [n for n in needles if n and not n.startswith("sha256:")] + ["/run/secrets/pip_", "pip_conf"]
    cert = host_pip_config().get("cert")
    text = json.dumps(image_config(ref))
    leaks = [n for n in needles + ([cert] if cert else []) if n in text]
    if engine() == "buildah":
        ctr = run(["buildah", "from", "--pull=never", "--quiet", ref], capture=True).stdout.strip()
        try:
            mnt = Path(run(["buildah", "mount", ctr], capture=True).stdout.strip())
            leaks += [str(p.relative_to(mnt)) for p in mnt.glob("etc/**/pip.conf")]
            leaks += [str(p.relative_to(mnt)) for p in (mnt / "opt").glob("**/pip.conf")]
            leaks += [str(mnt / d) for d in ("run/secrets", "opt/wheels", "opt/pypi") if (mnt / d).exists()]
            with tempfile.NamedTemporaryFile("w", suffix=".txt") as pats:
                pats.write("\n".join(needles))
                pats.flush()
                # Text files only (-I); where pip and Python keep configuration and records.
                places = [str(mnt / d) for d in ("etc", "opt", "home", "root", "usr/local") if (mnt / d).exists()]
                grep = run(["grep", "-rIlF", "-f", pats.name, *places], check=False, capture=True)
                leaks += [line for line in grep.stdout.splitlines() if line]
            for pem in [p for d in ("etc", "opt", "usr") for p in (mnt / d).glob("**/*.crt")] + list((mnt / "opt").glob("**/*.pem")):
                if pem.is_file() and hashlib.sha256(pem.read_bytes()).hexdigest() in digests:
                    leaks.append(f"{pem.relative_to(mnt)} is this machine's CA bundle")
        finally:
            run(["buildah", "rm", ctr], check=False, capture=True)
    if leaks:
        sys.exit(f"build-time pip settings leaked into {ref}: {leaks}")
    log(f"checked {ref}: no pip.conf, CA path, mirror URL or local index path from this machine in its "
        f"env, labels, history{' or files' if engine() == 'buildah' else ''}")


# --------------------------------------------------------------------------- test


@contextlib.contextmanager
def mounted_sources() -> Iterator[Path]:
    """A world-readable copy of the in-image test, to mount read-only at /src. The container's
    user (uid 10001) cannot read a clone in a private folder (``mktemp -d`` makes mode 700)."""
    with tempfile.TemporaryDirectory(prefix="bincounter-image-test-") as tmp:
        root = Path(tmp)
        (root / "dockerfiles").mkdir()
        shutil.copyfile(REPO / "dockerfiles" / "image_test.py", root / "dockerfiles" / "image_test.py")
        for path in (root, root / "dockerfiles"):
            path.chmod(0o755)
        (root / "dockerfiles" / "image_test.py").chmod(0o644)
        closed = closed_to_others(root)
        if closed is not None:
            raise SystemExit(f"image-test: {closed} is not searchable by other users (mode "
                             f"{closed.stat().st_mode & 0o777:o}), so the image's user (uid 10001) cannot "
                             f"read the test mounted from {root}; point TMPDIR at a folder others can enter")
        yield root


def closed_to_others(path: Path) -> Path | None:
    """The first folder on the way to ``path`` (itself included) that others cannot enter."""
    for folder in [*reversed(path.parents), path]:
        if not folder.stat().st_mode & 0o001:
            return folder
    return None


def current(variant: str) -> str:
    """The image built from the current sources (building it when missing)."""
    args = build_args(variant)
    tagged = source_tag(variant, args)
    if image_exists(tagged):
        log(f"{tagged} is up to date with the sources")
    else:
        log(f"{tagged} not built yet: building")
        build(variant, args)
    log(f"{image_name(variant)}: {image_size(tagged)}")
    return tagged


def run_in(image: str, inner: list[str], mounts: list[tuple[Path, str, bool]], user: str | None = USER) -> None:
    """Run ``inner`` in a container of ``image``; ``mounts``: (host folder, path inside, writable)."""
    env = ["BINCOUNTER_HOME=/tmp/bincounter-home"]
    if engine() == "docker":
        volumes = [a for host, inside, rw in mounts for a in ("-v", f"{host}:{inside}:{'rw' if rw else 'ro'}")]
        run(["docker", "run", "--rm", *(["--user", user] if user else []), "--read-only", "--tmpfs", "/tmp:exec",
             *volumes, *[a for e in env for a in ("-e", e)], image, *inner])
        return
    volumes = [a for host, inside, rw in mounts for a in ("-v", f"{host}:{inside}:{'rw' if rw else 'ro'}")]
    ctr = run(["buildah", "from", "--pull=never", "--quiet", image], capture=True).stdout.strip()
    try:
        run(["buildah", "run", "--isolation", "chroot", *(["--user", user] if user else []), *volumes,
             *[a for e in env for a in ("--env", e)], ctr, "--", *inner])
    finally:
        run(["buildah", "rm", ctr], check=False, capture=True)


def test_serve() -> None:
    """The serving image, on a model the CPU image makes (the serving image cannot: no torch)."""
    serve, cpu = current("serve"), current("cpu")
    with mounted_sources() as src, tempfile.TemporaryDirectory(prefix="bincounter-serving-models-",
                                                               ignore_cleanup_errors=True) as tmp:
        models = Path(tmp)
        models.chmod(0o777)  # written by the image's user (uid 10001)
        inner = ["python", "/src/dockerfiles/image_test.py", "--models", "/models", "--variant"]
        run_in(cpu, [*inner, "serving-model"], [(src, "/src", False), (models, "/models", True)])
        run_in(serve, [*inner, "serve"], [(src, "/src", False), (models, "/models", False)])


def test(variant: str, demo: bool) -> None:
    """Build when the image for the current sources is missing, then run image_test.py inside it."""
    if variant == "serve":
        test_serve()
        return
    tagged = current(variant)
    inner = ["python", "/src/dockerfiles/image_test.py", "--variant", variant] + ([] if demo else ["--no-demo"])
    with mounted_sources() as src:
        run_in(tagged, inner, [(src, "/src", False)])
    if variant == "cpu":
        test_sagemaker_variant(tagged)
    # image_test.py's own closing line ("image-test: N passed, 0 failed") stays the last one.


def test_sagemaker_variant(base: str) -> None:
    """Build Dockerfile.sagemaker on the image just tested (it only sets the user to root, so
    this takes seconds) and run a SageMaker-layout training in it as its own user."""
    image = f"{base}-sagemaker"
    dockerfile = str(REPO / "dockerfiles" / "Dockerfile.sagemaker")
    inner = ["python", "/src/dockerfiles/image_test.py", "--variant", "sagemaker"]
    env = ["BINCOUNTER_HOME=/tmp/bincounter-home"]
    log(f"building {image} (the SageMaker variant: root as the user) on {base}")
    if engine() == "docker":
        run(["docker", "build", "--pull=false", "--build-arg", f"BASE_IMAGE={base}", "-f", dockerfile, "-t", image,
             str(REPO / "dockerfiles")])
        with mounted_sources() as src:
            run(["docker", "run", "--rm", "--tmpfs", "/tmp:exec", "-v", f"{src}:/src:ro",
                 *[a for e in env for a in ("-e", e)], image, *inner])
        return
    run(["buildah", "bud", "--isolation", "chroot", "--pull=never", "--format", "docker", "--build-arg",
         f"BASE_IMAGE={base}", "-f", dockerfile, "-t", image, str(REPO / "dockerfiles")])
    ctr = run(["buildah", "from", "--pull=never", "--quiet", image], capture=True).stdout.strip()
    try:  # no --user: the image's own (root), as SageMaker runs it
        with mounted_sources() as src:
            run(["buildah", "run", "--isolation", "chroot", "-v", f"{src}:/src:ro",
                 *[a for e in env for a in ("--env", e)], ctr, "--", *inner])
    finally:
        run(["buildah", "rm", ctr], check=False, capture=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "test"):
        p = sub.add_parser(name)
        p.add_argument("variant", choices=sorted(DOCKERFILES))
        if name == "test":
            p.add_argument("--no-demo", action="store_true", help="skip `bincounter demo` inside the image")
    sub.add_parser("context")
    args = parser.parse_args(argv)
    if args.command == "context":
        print("\n".join(context_files()))
    elif args.command == "build":
        build(args.variant)
    else:
        test(args.variant, demo=not args.no_demo)


if __name__ == "__main__":
    main()

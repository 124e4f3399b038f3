"""``python -m benchmarks.arm64 IMAGES... --json``: the core install on linux/aarch64, emulated.

An arm64 Debian root (``mmdebstrap``) runs under Debian's ``qemu-user-static`` through
binfmt_misc; inside it, a virtual environment takes the core dependencies' aarch64 wheels from
PyPI (pinned to the versions installed here, so both ISAs run the same code), and the checkout's
``runtime/`` is copied in as the package ``edgecap``. The root is cached outside the repository
(default ``~/.cache/edgecap/arm64-root``), so a second run only copies the runtime and images.

Modes (all need root: chroot, mount):
    IMAGES... --json [--model DIR]   one JSON line per image: source, generated_text, token_ids
    --compare-x86                    also caption natively and report token-level differences
    --budget                         peak RSS of caption, watch and serve on both ISAs, and the
                                     size of the core install (MB of site-packages)
    --check-wheels                   every core dependency has aarch64 wheels on PyPI for
                                     Python 3.10-3.12 (pip download --only-binary=:all:)

Emulated timings mean nothing and are never printed. Peak RSS under emulation is the qemu
process's own (guest memory plus the emulator and its translated code), an upper bound.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgecap"
DEFAULT_ROOT = CACHE / "arm64-root"
CORE = ("numpy", "onnxruntime", "pillow", "tokenizers")
SERVE = ("starlette", "uvicorn", "python-multipart", "prometheus_client")
GUEST_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
VENV = "/opt/edgecap-venv"  # inside the root
SRC = "/opt/edgecap-src"  # runtime/ is copied to SRC/edgecap
WORK = "/opt/edgecap-run"  # images and models of the current run
READY = ".edgecap-root-complete"


class SetupError(RuntimeError):
    """The emulated root cannot be built or run here; the message says why and what to do."""


def log(msg: str) -> None:
    print(f"[arm64] {msg}", file=sys.stderr, flush=True)


def require_tools(need_mmdebstrap: bool) -> None:
    if os.geteuid() != 0:
        raise SetupError("run as root: the emulated root needs chroot and mount")
    if not shutil.which("qemu-aarch64-static"):
        raise SetupError("qemu-aarch64-static not found: apt-get install qemu-user-static")
    if need_mmdebstrap and not shutil.which("mmdebstrap"):
        raise SetupError("mmdebstrap not found: apt-get install mmdebstrap")


def ensure_binfmt() -> None:
    """Register qemu-aarch64 with binfmt_misc (mounting it first if needed), flag F: the kernel
    opens the emulator once, so the root needs no copy of it."""
    entry = BINFMT_DIR / "qemu-aarch64"
    if entry.is_file() and entry.read_text().startswith("enabled"):
        return
    if not (BINFMT_DIR / "register").exists():
        run = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode:
            raise SetupError(
                f"binfmt_misc is not mounted and mounting it failed: "
                f"{run.stderr.strip()} (a container without CAP_SYS_ADMIN?)"
            )
    if not BINFMT_CONF.is_file():
        raise SetupError(f"{BINFMT_CONF} missing: apt-get install qemu-user-static")
    try:
        (BINFMT_DIR / "register").write_text(BINFMT_CONF.read_text().strip())
    except OSError as exc:
        raise SetupError(f"cannot register qemu-aarch64 with binfmt_misc: {exc}") from None
    if not entry.is_file():
        raise SetupError("qemu-aarch64 registration did not appear in binfmt_misc")


def ensure_root(root: Path, suite: str, mirror: str) -> None:
    """Build the arm64 Debian root once (into a temporary sibling, renamed when complete)."""
    if (root / READY).is_file():
        return
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log(f"building the arm64 {suite} root in {root} (emulated dpkg: several minutes)")
    cmd = [
        "mmdebstrap",
        "--arch=arm64",
        "--variant=apt",
        f"--include={GUEST_PACKAGES}",
        suite,
        str(tmp),
        mirror,
    ]
    if subprocess.run(["nice", "-n", "10", *cmd], stdout=sys.stderr, check=False).returncode:
        raise SetupError(f"mmdebstrap failed: {' '.join(cmd)}")
    (tmp / READY).write_text(f"{suite} {mirror}\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


@contextlib.contextmanager
def mounted_proc(root: Path):
    """/proc inside the root for the run (onnxruntime reads CPU and memory facts from it)."""
    proc = root / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(proc)], check=False)


def chroot_cmd(root: Path, argv: list[str]) -> list[str]:
    env = ["env", "-i", "PATH=/usr/bin:/bin", "HOME=/root", "LANG=C.UTF-8", f"PYTHONPATH={SRC}"]
    return ["chroot", str(root), *env, *argv]


def pinned(names: tuple[str, ...]) -> list[str]:
    """The versions installed here (same code on both ISAs), or unpinned names if absent."""
    reqs = []
    for name in names:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def ensure_venv(root: Path, reqs: list[str]) -> None:
    """Create the guest venv and pip-install ``reqs`` (aarch64 wheels only: no compiler)."""
    marker = root / VENV.lstrip("/") / "edgecap-requirements.txt"
    wanted = set(reqs)
    have = set(marker.read_text().split()) if marker.is_file() else set()
    if wanted <= have:
        return
    if not (root / VENV.lstrip("/") / "bin" / "python").exists():
        subprocess.run(chroot_cmd(root, ["python3", "-m", "venv", VENV]), check=True)
    missing = sorted(wanted - have)
    log(f"pip install (aarch64 wheels from PyPI): {' '.join(missing)}")
    # resolv.conf for the guest's pip (mmdebstrap leaves the host's or none).
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    # The guest trusts what the host trusts (a TLS-intercepting proxy's CA included).
    cert = []
    if HOST_CA.is_file():
        shutil.copy(HOST_CA, root / "etc" / "edgecap-host-ca.crt")
        cert = ["--cert", "/etc/edgecap-host-ca.crt"]
    cmd = [
        f"{VENV}/bin/pip",
        "install",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-cache-dir",
        *cert,
        *missing,
    ]
    if subprocess.run(
        ["nice", "-n", "10", *chroot_cmd(root, cmd)], stdout=sys.stderr, check=False
    ).returncode:
        raise SetupError(f"pip install inside the arm64 root failed: {' '.join(missing)}")
    marker.write_text("\n".join(sorted(have | wanted)) + "\n")


def stage(root: Path, images: list[Path], model: Path | None) -> tuple[dict[str, str], str | None]:
    """Copy the runtime, the images and the model into the root.

    Returns ({guest image path: source as given}, guest model dir or None).
    """
    src = root / SRC.lstrip("/") / "edgecap"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO / "runtime", src, ignore=shutil.ignore_patterns("__pycache__"))
    work = root / WORK.lstrip("/")
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    mapping = {}
    for i, image in enumerate(images):
        name = f"{i:04d}{image.suffix.lower()}"
        shutil.copy(image, work / "in" / name)
        mapping[f"{WORK}/in/{name}"] = str(image)
    guest_model = None
    if model is not None:
        shutil.copytree(model, work / "model")
        guest_model = f"{WORK}/model"
    return mapping, guest_model


def caption_args(paths: list[str], model: str | None, threads: int | None) -> list[str]:
    args = ["-m", "edgecap.cli", "caption", *paths, "--json"]
    if model:
        args += ["--model", model]
    if threads:
        args += ["--threads", str(threads)]
    return args


def parse_records(stdout: str, mapping: dict[str, str]) -> list[dict]:
    records = []
    for line in stdout.splitlines():
        if line.strip().startswith("{"):
            rec = json.loads(line)
            records.append(
                {
                    "source": mapping.get(rec["source"], rec["source"]),
                    "generated_text": rec.get("generated_text"),
                    "token_ids": rec.get("token_ids"),
                }
            )
    return records


def caption_arm64(
    root: Path, images: list[Path], model: Path | None, threads: int | None
) -> list[dict]:
    mapping, guest_model = stage(root, images, model)
    cmd = chroot_cmd(
        root, [f"{VENV}/bin/python", *caption_args(list(mapping), guest_model, threads)]
    )
    run = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True, check=False)
    if run.returncode:
        raise SetupError(f"edgecap caption failed under emulation:\n{run.stderr[-2000:]}")
    return parse_records(run.stdout, mapping)


def caption_x86(images: list[Path], model: Path | None, threads: int | None) -> list[dict]:
    paths = [str(p) for p in images]
    cmd = [sys.executable, *caption_args(paths, str(model) if model else None, threads)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return parse_records(run.stdout, {p: p for p in paths})


def compare(arm: list[dict], x86: list[dict]) -> int:
    """Log each image whose tokens differ (first differing position); return the count."""
    differ = 0
    for a, b in zip(arm, x86, strict=True):
        if a["token_ids"] != b["token_ids"]:
            differ += 1
            pos = next(
                (i for i, (s, t) in enumerate(zip(a["token_ids"], b["token_ids"])) if s != t),
                min(len(a["token_ids"]), len(b["token_ids"])),
            )
            log(
                f"DIFF {a['source']} at token {pos}: arm64 {a['generated_text']!r} | "
                f"x86 {b['generated_text']!r}"
            )
    log(f"token-for-token equal on {len(arm) - differ}/{len(arm)} images")
    return differ


# ----------------------------------------------------------------------------- budget (RSS)


def peak_rss_mb(cmd: list[str], during=None, env: dict | None = None) -> float:
    """Run ``cmd``; call ``during(proc)`` (which ends it) if given; return the peak RSS in MB of
    the process itself (wait4's ru_maxrss: under binfmt this is the qemu process)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )
    if during is not None:
        during(proc)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if during is None and proc.returncode:
        raise SetupError(f"{cmd[-6:]} exited with {proc.returncode}")
    return usage.ru_maxrss / 1024


def read_lines(proc: subprocess.Popen, count: int, timeout_s: float) -> None:
    """Wait for ``count`` JSON lines on stdout, then SIGTERM (watch on a folder never ends)."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while seen < count and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line.startswith("{")
    proc.send_signal(signal.SIGTERM)
    if seen < count:
        raise SetupError(f"watch printed {seen}/{count} captions before the timeout")


def post_images(port: int, images: list[Path], timeout_s: float):
    def during(proc: subprocess.Popen) -> None:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while True:  # wait for /readyz: the model loads after the socket opens
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.send_signal(signal.SIGTERM)
                raise SetupError("serve did not become ready")
            time.sleep(1)
        try:
            for image in images:
                req = urllib.request.Request(
                    f"{url}/v1/captions", data=image.read_bytes(), method="POST"
                )
                try:
                    with urllib.request.urlopen(req, timeout=timeout_s) as r:
                        json.load(r)
                except OSError as exc:  # HTTPError included
                    raise SetupError(f"serve: POST {image.name} failed: {exc}") from None
        finally:
            proc.send_signal(signal.SIGTERM)

    return during


def budget(
    root: Path | None, images: list[Path], threads: int | None, only: list[str]
) -> list[dict]:
    """Peak RSS of caption, watch (drop folder) and serve with the default model, per ISA."""
    rows = []
    isas = [("x86_64", None)] + ([("aarch64 (qemu)", root)] if root else [])
    for isa, guest_root in isas:
        folder = Path(tempfile.mkdtemp(prefix="edgecap-watch-"))
        if guest_root is None:
            mapping = {str(p): str(p) for p in images}
            python, env = [sys.executable], None  # the checkout, installed with pip -e
            watch_dir, prefix = folder, []
        else:
            mapping, _ = stage(guest_root, images, None)
            python, env, prefix = [f"{VENV}/bin/python"], None, ["nice", "-n", "10"]
            watch_dir = guest_root / WORK.lstrip("/") / "watch"
            watch_dir.mkdir()
        for image in images:
            shutil.copy(image, watch_dir / image.name)
        guest_watch = f"{WORK}/watch" if guest_root else str(watch_dir)
        thread_args = ["--threads", str(threads)] if threads else []

        def wrap(argv, guest_root=guest_root, python=python, prefix=prefix):
            cmd = [*python, "-m", "edgecap.cli", *argv]
            return prefix + (chroot_cmd(guest_root, cmd) if guest_root else cmd)

        timeout = 1800 if guest_root else 300
        port = 8766 if guest_root else 8765
        commands = {
            "caption": (wrap(["caption", *mapping, "--json", *thread_args]), None),
            "watch": (
                wrap(["watch", guest_watch, *thread_args]),
                lambda p, t=timeout: read_lines(p, len(images), t),
            ),
            "serve": (
                wrap(["serve", "--port", str(port), "--timeout-s", str(timeout), *thread_args]),
                post_images(port, images, timeout),
            ),
        }
        for name, (cmd, during) in commands.items():
            if name not in only:
                continue
            mb = peak_rss_mb(cmd, during, env)
            log(f"{isa} {name}: peak RSS {mb:.0f} MB")
            rows.append({"isa": isa, "command": name, "peak_rss_mb": round(mb, 1)})
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def core_install_mb(root: Path) -> float:
    """MB on disk of the guest venv's site-packages with the core install only (pip and
    setuptools left out), measured once before the [serve] extra joins it."""
    saved = root / VENV.lstrip("/") / "edgecap-core-mb.txt"
    if saved.is_file():
        return float(saved.read_text())
    site = next((root / VENV.lstrip("/") / "lib").glob("python3*/site-packages"))
    total = 0
    for path in site.rglob("*"):
        top = path.relative_to(site).parts[0].lower()
        if path.is_file() and not top.startswith(("pip", "setuptools", "_distutils")):
            total += path.stat().st_size
    saved.write_text(f"{total / 1e6:.1f}\n")
    return total / 1e6


# ----------------------------------------------------------------------------- wheels


def check_wheels(versions: list[str]) -> list[dict]:
    """pip download --only-binary per core dependency and Python version, aarch64 glibc only."""
    platforms = ["manylinux2014_aarch64"] + [f"manylinux_2_{m}_aarch64" for m in range(17, 37)]
    rows = []
    with tempfile.TemporaryDirectory() as dest:
        for version in versions:
            for name in CORE:
                cmd = [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--isolated",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--python-version",
                    version,
                    "-d",
                    dest,
                    name,
                ]
                for plat in platforms:
                    cmd += ["--platform", plat]
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
                wheel = next(
                    (
                        line.split("/")[-1]
                        for line in run.stdout.splitlines()
                        if line.strip().startswith(("Saved", "File was already"))
                    ),
                    None,
                )
                rows.append({"python": version, "package": name, "wheel": wheel})
                log(f"python {version} {name}: {wheel or 'NO aarch64 WHEEL'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.arm64",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="*", type=Path, help="images to caption")
    parser.add_argument("--json", action="store_true", help="one JSON line per image (default)")
    parser.add_argument("--model", type=Path, help="export dir (default: the embedded model)")
    parser.add_argument("--threads", type=int, help="CPU threads for the model")
    parser.add_argument(
        "--compare-x86",
        action="store_true",
        help="caption natively too; log differences; exit 1 if any",
    )
    parser.add_argument(
        "--budget",
        action="store_true",
        help="peak RSS of caption/watch/serve on both ISAs, site-packages MB",
    )
    parser.add_argument(
        "--check-wheels",
        action="store_true",
        help="aarch64 wheels of the core deps for Python 3.10-3.12",
    )
    parser.add_argument(
        "--commands", default="caption,watch,serve", help="--budget: which commands to measure"
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="cached arm64 root")
    parser.add_argument("--suite", default="bookworm")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian")
    args = parser.parse_args(argv)
    if not (args.images or args.check_wheels):
        parser.error("give IMAGES, or --check-wheels")
    if args.check_wheels:
        rows = check_wheels(["3.10", "3.11", "3.12"])
        for row in rows:
            print(json.dumps(row))
        if not args.images:
            return 0 if all(r["wheel"] for r in rows) else 1
    images = list(args.images)
    try:
        require_tools(need_mmdebstrap=not (args.root / READY).is_file())
        ensure_binfmt()
        ensure_root(args.root, args.suite, args.mirror)
        with mounted_proc(args.root):
            ensure_venv(args.root, pinned(CORE))
            if args.budget:
                size = core_install_mb(args.root)
                ensure_venv(args.root, pinned(CORE) + pinned(SERVE))
                rows = budget(args.root, images, args.threads, args.commands.split(","))
                print(json.dumps({"core_site_packages_mb": round(size, 1)}))
                for row in rows:
                    print(json.dumps(row))
                return 0
            records = caption_arm64(args.root, images, args.model, args.threads)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for record in records:
        print(json.dumps(record))
    if args.compare_x86:
        return 1 if compare(records, caption_x86(images, args.model, args.threads)) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

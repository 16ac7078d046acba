#!/usr/bin/env python3
"""Build the real-VM test guest: a Debian kernel and a busybox initramfs.

What it makes, in ``.cache/guest/`` at the repository's root (or ``--out``):

- ``vmlinuz``: the generic Debian kernel (``linux-image-<version>-amd64``, the
  version that ``linux-image-amd64`` depends on, or ``VTL_GUEST_KERNEL``),
  fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``; the cloud
  kernel has no 9p, so it is not used;
- ``initrd.img``: a newc cpio archive (made with busybox's own ``cpio``, gzip
  compressed) holding busybox-static, ``tools/guest/init`` as ``/init`` and the
  virtio, virtio-net, virtio-console, 9p and overlay modules with everything
  they depend on (read from each module's ``depends=`` entry, as the package
  ships no ``modules.dep``), listed in load order in ``/etc/modules.load``;
- ``stamp.json``: the kernel version and a hash of the inputs. A second run
  with the same kernel version and inputs does nothing, so ``make test`` can
  call it every time.

Needs ``apt-get``, ``dpkg-deb``, ``busybox`` (busybox-static) and ``gzip``;
the tests that use the guest also need ``qemu-system-x86_64``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_OUT = REPO / ".cache" / "guest"

# What the guest needs, in load order; dependencies are added in front of each.
WANTED = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
          "virtio_pci", "failover", "net_failover", "virtio_net", "virtio_console",
          "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay"]


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command; exit with its own words if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        sys.exit(f"guest build: `{' '.join(cmd)}` failed ({proc.returncode}): "
                 f"{proc.stderr.strip()[-800:]}")
    return proc


def kernel_version() -> str:
    """The generic kernel's ABI version, e.g. ``6.1.0-57-amd64``."""
    pinned = os.environ.get("VTL_GUEST_KERNEL")
    if pinned:
        return pinned
    for attempt in range(2):
        proc = subprocess.run(["apt-cache", "depends", "linux-image-amd64"],
                              capture_output=True, text=True)
        m = re.search(r"Depends: linux-image-(\S+-amd64)\b", proc.stdout)
        if m:
            return m.group(1)
        if attempt == 0:  # a fresh machine may have no package lists yet
            run(["apt-get", "update", "-q"])
    sys.exit("guest build: cannot tell the kernel version from "
             "`apt-cache depends linux-image-amd64`; set VTL_GUEST_KERNEL")


def inputs_hash() -> str:
    h = hashlib.sha256()
    for f in (HERE / "build.py", HERE / "init", Path("/bin/busybox")):
        h.update(f.read_bytes() if f.exists() else b"")
    return h.hexdigest()[:16]


def fetch_kernel(kver: str, work: Path) -> Path:
    """Download and unpack the kernel package into ``work/root``."""
    pkg = f"linux-image-{kver}"
    proc = subprocess.run(["apt-get", "download", pkg], cwd=work, capture_output=True,
                          text=True)
    if proc.returncode != 0:  # stale package lists
        run(["apt-get", "update", "-q"])
        run(["apt-get", "download", pkg], cwd=work)
    debs = list(work.glob(f"{pkg}_*.deb"))
    if not debs:
        sys.exit(f"guest build: apt-get download {pkg} left no .deb")
    root = work / "root"
    run(["dpkg-deb", "-x", str(debs[0]), str(root)])
    return root


def module_paths(moddir: Path) -> dict[str, Path]:
    """Module name (with ``-`` as ``_``) -> file, for every module in the tree."""
    out = {}
    for ko in moddir.rglob("*.ko"):
        out[ko.name[:-3].replace("-", "_")] = ko
    return out


def depends(ko: Path) -> list[str]:
    """A module's ``depends=`` entry from its ``.modinfo`` section."""
    m = re.search(rb"\0depends=([^\0]*)\0", ko.read_bytes())
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def load_order(moddir: Path, wanted: list[str]) -> list[Path]:
    """The files to insmod, each after what it depends on; built-ins skipped."""
    paths = module_paths(moddir)
    builtin_file = moddir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {Path(line).name[:-3].replace("-", "_")
                   for line in builtin_file.read_text().split()}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name in builtin:
            return
        if name not in paths:
            sys.exit(f"guest build: module {name} is neither built in nor in {moddir}")
        for dep in depends(paths[name]):
            visit(dep)
        order.append(paths[name])

    for name in wanted:
        visit(name)
    return order


def make_initramfs(moddir: Path, out: Path) -> list[str]:
    """Write ``out`` (gzip'd newc cpio); return the module names in load order."""
    busybox = shutil.which("busybox")
    if not busybox:
        sys.exit("guest build: busybox not found; install busybox-static")
    kind = run(["file", "-b", busybox]).stdout if shutil.which("file") else ""
    if "dynamically" in kind:
        sys.exit("guest build: busybox is dynamically linked; install busybox-static")
    with tempfile.TemporaryDirectory(prefix="vtl-initramfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "etc", "lib/modules", "proc", "sys", "tmp", "newroot"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        shutil.copy2(HERE / "init", root / "init")
        (root / "init").chmod(0o755)
        names = []
        for ko in load_order(moddir, WANTED):
            shutil.copy2(ko, root / "lib" / "modules" / ko.name)
            names.append(ko.name)
        (root / "etc" / "modules.load").write_text("\n".join(names) + "\n")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = subprocess.run([busybox, "cpio", "-o", "-H", "newc"], cwd=root,
                              input=("\n".join(files) + "\n").encode(), capture_output=True)
        if cpio.returncode != 0:
            sys.exit(f"guest build: cpio failed: {cpio.stderr.decode()[-500:]}")
        tmp_out = out.with_suffix(".tmp")
        with open(tmp_out, "wb") as f:
            subprocess.run(["gzip", "-1", "-c"], input=cpio.stdout, stdout=f, check=True)
        tmp_out.replace(out)
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("VTL_GUEST_DIR",
                                                                    DEFAULT_OUT)))
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args()
    out: Path = args.out
    kver = kernel_version()
    stamp = {"kernel": kver, "inputs": inputs_hash()}
    stamp_file = out / "stamp.json"
    if (not args.force and stamp_file.exists() and (out / "vmlinuz").exists()
            and (out / "initrd.img").exists()):
        try:
            old = json.loads(stamp_file.read_text())
        except ValueError:
            old = {}
        if {k: old.get(k) for k in stamp} == stamp:
            print(f"guest: up to date in {out} (kernel {kver})")
            return 0
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vtl-guest-", dir=out) as tmp:
        root = fetch_kernel(kver, Path(tmp))
        moddir = root / "lib" / "modules" / kver
        shutil.copy2(root / "boot" / f"vmlinuz-{kver}", out / "vmlinuz.tmp")
        (out / "vmlinuz.tmp").replace(out / "vmlinuz")
        names = make_initramfs(moddir, out / "initrd.img")
    stamp["modules"] = names  # type: ignore[assignment]
    stamp_file.write_text(json.dumps(stamp, indent=1) + "\n")
    print(f"guest: built kernel {kver} and initramfs ({len(names)} modules) in {out} "
          f"in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

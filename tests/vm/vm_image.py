"""Builds (and caches) the guest for the VM tests from Debian packages.

* kernel: the ``linux-image-*-amd64`` that ``linux-image-amd64`` points to, unpacked with
  ``dpkg-deb -x`` (no installation on the host);
* initramfs: busybox (from ``busybox-static``) and the modules the run needs, loaded in dependency
  order (read from each module's ``.modinfo``: the package has no modules.dep, depmod makes it
  at install time); it mounts the root disk and switches to it;
* root filesystem: ``debootstrap --variant=minbase`` plus python3, inotify-tools and the Python
  watchers, written into an ext4 image with ``mkfs.ext4 -d`` (no loop mount needed). The VM opens
  it with ``snapshot=on``, so a run never changes the cached image.

The cache directory is keyed by every input (suite, mirror, packages, kernel version, this
file's recipe): a change to any of them builds a new image next to the old ones.

    python tests/vm/vm_image.py            # build (or find) the image and print its directory
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("notifyfs.vm.image")

CACHE = Path(os.environ.get("NOTIFYFS_VM_CACHE", "/var/cache/notifyfs-vm"))
#: guest packages on top of minbase: the interpreter, the watchers the run uses, and pytest
#: (the scenarios live in a test module that imports it)
PACKAGES = ["python3", "inotify-tools", "python3-watchdog", "python3-pytest", "mount"]
#: what the guest needs: the root disk, the agent's port, FUSE, virtiofs, 9p and vsock
MODULES = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "virtio_console", "fuse", "virtiofs", "9p",
           "9pnet_virtio", "vmw_vsock_virtio_transport"]
ROOTFS_MB = 1024
#: bump when the recipe below changes in a way the other inputs do not show
RECIPE = 3

INITRAMFS_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
    insmod "/modules/$m" || echo "initramfs: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 /dev/vda /newroot || { echo "initramfs: cannot mount /dev/vda"; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/notifyfs-vm-init
"""

#: the root filesystem's init: mounts what every run needs, then runs the test driver that the
#: host shares with the guest (tag "src", the project tree), so the cached image does not depend
#: on the driver's code
GUEST_INIT = """#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
mkdir -p /src && mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose src /src
echo "notifyfs-vm: guest up $(cut -d' ' -f1 /proc/uptime)s after boot"
cd /
python3 /src/tests/vm/vm_guest.py
echo "notifyfs-vm: driver exited with $?"
echo o > /proc/sysrq-trigger
sleep 10
"""


@dataclass
class Image:
    dir: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_version: str


# --- inputs ---------------------------------------------------------------------------------------

def os_codename() -> str:
    text = Path("/etc/os-release").read_text()
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    return m.group(1) if m else "bookworm"


def apt_mirror(suite: str) -> str:
    """The Debian mirror this machine's apt uses for ``suite`` (so CI uses its own mirror)."""
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        if name.endswith(".sources"):  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if ("deb" in fields.get("Types", "").split() and suite in fields.get("Suites", "").split()
                        and "main" in fields.get("Components", "").split()):
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
                if m and m.group(2) == suite and "main" in m.group(3).split():
                    return m.group(1)
    return "http://deb.debian.org/debian"


def kernel_package() -> tuple[str, str]:
    """The kernel package ``linux-image-amd64`` depends on now, and its version."""
    def depends() -> str:
        return subprocess.run(["apt-cache", "depends", "linux-image-amd64"], check=False,
                              capture_output=True, text=True).stdout

    out = depends()
    if "Depends: linux-image-" not in out:  # a fresh machine may have no package lists yet
        _run(["apt-get", "update", "-qq"])
        out = depends()
    m = re.search(r"Depends: (linux-image-\S+-amd64)", out)
    if not m:
        raise RuntimeError(f"cannot find the kernel package: {out!r}")
    pkg = m.group(1)
    pol = subprocess.run(["apt-cache", "policy", pkg], check=True, capture_output=True,
                         text=True).stdout
    v = re.search(r"Candidate: (\S+)", pol)
    return pkg, v.group(1) if v else "unknown"


def image_key(suite: str, mirror: str, kpkg: str, kver: str) -> str:
    inputs = dict(recipe=RECIPE, suite=suite, mirror=mirror, packages=PACKAGES, modules=MODULES,
                  kernel=[kpkg, kver], initramfs_init=INITRAMFS_INIT, guest_init=GUEST_INIT,
                  rootfs_mb=ROOTFS_MB)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# --- modules --------------------------------------------------------------------------------------

def modinfo_depends(ko: Path) -> list[str]:
    """The ``depends=`` field of a module's ``.modinfo`` ELF section."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{ko}: not a little-endian ELF64 module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _n, stroff, _s = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            for item in data[off:off + size].split(b"\0"):
                if item.startswith(b"depends="):
                    return [d for d in item[8:].decode().split(",") if d]
            return []
    return []


def module_order(moddir: Path, wanted: list[str]) -> list[Path]:
    """The ``.ko`` files for ``wanted`` and their dependencies, dependencies first."""
    files: dict[str, Path] = {}
    for ko in moddir.rglob("*.ko"):
        files[ko.stem.replace("-", "_")] = ko
    builtin = {Path(line).stem.replace("-", "_")
               for line in (moddir / "modules.builtin").read_text().split()}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            raise RuntimeError(f"module {name} is neither built in nor in {moddir}")
        for dep in modinfo_depends(files[name]):
            visit(dep)
        order.append(files[name])

    for w in wanted:
        visit(w)
    return order


# --- cpio (newc), the initramfs format -------------------------------------------------------------

def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed newc archive of (path, mode, data); symlinks carry their target as data."""
    out = io.BytesIO()

    def put(name: str, mode: int, data: bytes, ino: int) -> None:
        nm = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nm), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nm)
        out.write(b"\0" * (-(110 + len(nm)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for i, (name, mode, data) in enumerate(entries, start=1):
        put(name, mode, data, i)
    put("TRAILER!!!", 0, b"", 0)
    return out.getvalue()


def build_initramfs(kroot: Path, kver: str, busybox: Path, dest: Path) -> None:
    moddir = kroot / "lib/modules" / kver
    mods = module_order(moddir, MODULES)
    entries: list[tuple[str, int, bytes]] = [
        ("bin", stat.S_IFDIR | 0o755, b""), ("modules", stat.S_IFDIR | 0o755, b""),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        ("init", stat.S_IFREG | 0o755, INITRAMFS_INIT.encode()),
        ("modules.order", stat.S_IFREG | 0o644, "".join(m.name + "\n" for m in mods).encode()),
    ]
    entries += [(f"modules/{m.name}", stat.S_IFREG | 0o644, m.read_bytes()) for m in mods]
    dest.write_bytes(gzip.compress(cpio_newc(entries), compresslevel=6))
    log.info("initramfs: %d modules (%s)", len(mods), " ".join(m.stem for m in mods))


# --- build ----------------------------------------------------------------------------------------

def _run(cmd: list[str], **kw: object) -> None:
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def build(dest: Path, suite: str, mirror: str, kpkg: str) -> None:
    with tempfile.TemporaryDirectory(prefix="notifyfs-vm-build-", dir=dest.parent) as tmps:
        tmp = Path(tmps)
        # as root: apt's _apt user cannot write into a private temporary directory
        _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", kpkg, "busybox-static"], cwd=tmp,
             stdout=subprocess.DEVNULL)
        kdeb = next(tmp.glob(f"{kpkg}_*.deb"))
        bdeb = next(tmp.glob("busybox-static_*.deb"))
        _run(["dpkg-deb", "-x", str(kdeb), str(tmp / "k")])
        _run(["dpkg-deb", "-x", str(bdeb), str(tmp / "b")])
        vmlinuz = next((tmp / "k/boot").glob("vmlinuz-*"))
        kver = vmlinuz.name.removeprefix("vmlinuz-")
        build_initramfs(tmp / "k", kver, tmp / "b/bin/busybox", tmp / "initrd.img")
        root = tmp / "root"
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", suite,
              str(root), mirror], stdout=subprocess.DEVNULL)
        init = root / "sbin/notifyfs-vm-init"
        init.write_text(GUEST_INIT)
        init.chmod(0o755)
        (root / "etc/hostname").write_text("notifyfs-vm\n")
        for d in ("var/cache/apt/archives", "var/lib/apt/lists"):  # not needed in the guest
            for p in (root / d).glob("*"):
                if p.is_file():
                    p.unlink()
        _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(tmp / "rootfs.img"),
              f"{ROOTFS_MB}M"], stdout=subprocess.DEVNULL)
        shutil.copy(vmlinuz, tmp / "vmlinuz")
        (tmp / "kernel-version").write_text(kver + "\n")
        out = dest.with_name(dest.name + ".new")
        shutil.rmtree(out, ignore_errors=True)  # left by a build that was killed here
        out.mkdir()
        for name in ("vmlinuz", "initrd.img", "rootfs.img", "kernel-version"):
            os.rename(tmp / name, out / name)
        os.rename(out, dest)  # whole or nothing: an interrupted build leaves no half image


def ensure_image(cache: Path = CACHE) -> Image:
    """The cached image for today's inputs, built first if needed (a few minutes)."""
    suite = os_codename()
    mirror = apt_mirror(suite)
    kpkg, kver = kernel_package()
    key = image_key(suite, mirror, kpkg, kver)
    dest = cache / f"{suite}-{key}"
    if not dest.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        log.info("building the VM image in %s (suite %s, mirror %s, kernel %s %s)",
                 dest, suite, mirror, kpkg, kver)
        build(dest, suite, mirror, kpkg)
        log.info("built in %.0f s", time.monotonic() - t0)
    return Image(dest, dest / "vmlinuz", dest / "initrd.img", dest / "rootfs.img",
                 (dest / "kernel-version").read_text().strip())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(ensure_image().dir)
    sys.exit(0)

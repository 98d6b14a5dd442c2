"""abi.py against the C header: every size, offset, field width, signedness and constant.

A C program is generated from the Python data in :mod:`notifyfs.abi`, compiled with gcc against
``/usr/include/linux/fuse.h`` and run; its output is compared with the Layouts. Whatever the
installed header is too old to describe is found by reading the header text, checked by total
size where that is possible, and listed; the list must equal an explicit expected set, so that
nothing is skipped without anyone noticing.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from functools import cache
from pathlib import Path

import pytest

from notifyfs import abi

HEADER = Path("/usr/include/linux/fuse.h")

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed"),
    pytest.mark.skipif(not HEADER.exists(), reason=f"{HEADER} is missing (linux-libc-dev)"),
]


# --- reading the header text ------------------------------------------------------------------

def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


@cache
def header_text() -> str:
    return _strip_comments(HEADER.read_text())


@cache
def header_minor() -> int:
    m = re.search(r"#define\s+FUSE_KERNEL_MINOR_VERSION\s+(\d+)", header_text())
    assert m, "no FUSE_KERNEL_MINOR_VERSION in the header"
    return int(m.group(1))


@cache
def header_structs() -> dict[str, set[str]]:
    """struct name -> names of its direct members."""
    out = {}
    for m in re.finditer(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", header_text(), flags=re.S):
        out[m.group(1)] = set(re.findall(r"(\w+)\s*(?:\[[^\]]*\])?\s*;", m.group(2)))
    return out


def _enum_members(name: str) -> list[str]:
    m = re.search(r"\benum\s+" + name + r"\s*\{(.*?)\}\s*;", header_text(), flags=re.S)
    assert m, f"enum {name} not found in the header"
    return re.findall(r"^\s*(\w+)\s*(?:=|,)", m.group(1), flags=re.M)


@cache
def header_macros() -> set[str]:
    names = set(re.findall(r"^\s*#\s*define\s+(\w+)", header_text(), flags=re.M))
    names |= set(re.findall(r"^\s*(\w+)\s*=", header_text(), flags=re.M))  # enum members
    return names


def init_flag_macros() -> list[str]:
    """The #defines of the 'INIT request/reply flags' block (up to the CUSE flags)."""
    text = header_text()
    start = text.index("#define FUSE_ASYNC_READ")
    end = text.index("CUSE_UNRESTRICTED_IOCTL", start)
    return re.findall(r"#define\s+(FUSE_\w+)", text[start:end])


# --- the C program ----------------------------------------------------------------------------

def c_member(layout: abi.Layout, field: str) -> str:
    """The C member expression for one of our fields (before checking it exists)."""
    mapped = abi.C_FIELD_NAMES.get((layout.c_name, field))
    if mapped is not None:
        root = mapped.split(".")[0]
        members = header_structs().get(layout.c_name, set())
        plain = field.lstrip("_")
        # a mapping to an old name (fuse_open_out.padding) is obsolete once the header has ours
        if root not in members and plain in members:
            return plain
        return mapped
    return field.lstrip("_") if field.startswith("_") else field


def field_status(layout: abi.Layout) -> tuple[list[str], list[str]]:
    """(fields that can be checked, fields that cannot) for one Layout and this header.

    A field is uncheckable if the header lacks its member, and so is every field after it: the
    header's layout of the tail differs (7.38 calls fuse_init_out's tail ``unused[7]``)."""
    members = header_structs()[layout.c_name]
    ok: list[str] = []
    missing: list[str] = []
    for f in layout.fields:
        if missing or c_member(layout, f).split(".")[0] not in members:
            missing.append(f)
        else:
            ok.append(f)
    return ok, missing


def constant_table() -> dict[str, tuple[str, int]]:
    """C macro / enum name -> (our name, our value) for every constant abi.py mirrors."""
    table: dict[str, tuple[str, int]] = {}
    for name, value in vars(abi.Opcode).items():
        if name.isupper() and not name.startswith("NOTIFYFS_"):
            cname = name if name.startswith("CUSE_") else "FUSE_" + name
            table[cname] = (f"Opcode.{name}", value)
    for name, value in vars(abi.NotifyCode).items():
        if name.isupper() and not name.startswith("NOTIFYFS_"):
            table["FUSE_NOTIFY_" + name] = (f"NotifyCode.{name}", value)
    for name, value in vars(abi).items():
        if not (name.isupper() and isinstance(value, int)) or name in OURS_ONLY:
            continue
        # FATTR_*, FOPEN_*, FUSE_DEV_IOC_* keep their names; the rest (INIT flags, per-request
        # flag bits, ROOT_ID, COMPAT_* sizes...) drop the header's FUSE_ prefix
        cname = name if name.startswith(("FATTR_", "FOPEN_", "FUSE_")) else "FUSE_" + name
        table[cname] = (name, value)
    return table


#: module-level ints of abi.py that are notifyfs's own, not the header's
OURS_ONLY = {"MIN_MINOR", "MAX_MINOR", "STATFS_OUT_SIZE", "ENTRY_OUT_SIZE", "ATTR_OUT_SIZE"}

DIRENT_NAMELENS = [0, 1, 2, 7, 8, 9, 15, 16, 17, 100, 254, 255]


@cache
def c_results(tmp_dir: str) -> dict[str, int]:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <stdint.h>",
        "#include <linux/ioctl.h>",
        f'#include "{HEADER}"',
        "#define MSIZE(s, m) sizeof(((struct s *)0)->m)",
        "#define MSIGNED(s, m) ((__typeof__(((struct s *)0)->m))-1 < (__typeof__(((struct s *)0)->m))0)",
        'static void p(const char *k, long long v) { printf("%s %lld\\n", k, v); }',
        "int main(void) {",
    ]
    for lay in abi.HEADER_LAYOUTS:
        s = lay.c_name
        if s not in header_structs():
            continue
        lines.append(f'p("sizeof {s}", sizeof(struct {s}));')
        ok, _ = field_status(lay)
        for f, fmt in zip(lay.fields, lay.formats, strict=True):
            if f not in ok:
                continue
            m = c_member(lay, f)
            lines.append(f'p("offsetof {s} {f}", offsetof(struct {s}, {m}));')
            lines.append(f'p("msize {s} {f}", MSIZE({s}, {m}));')
            if not fmt.endswith("s"):
                lines.append(f'p("signed {s} {f}", MSIGNED({s}, {m}));')
    lines += [
        'p("offsetof fuse_entry_out attr", offsetof(struct fuse_entry_out, attr));',
        'p("sizeof fuse_entry_out", sizeof(struct fuse_entry_out));',
        'p("offsetof fuse_attr_out attr", offsetof(struct fuse_attr_out, attr));',
        'p("sizeof fuse_attr_out", sizeof(struct fuse_attr_out));',
        'p("sizeof fuse_statfs_out", sizeof(struct fuse_statfs_out));',
        'p("sizeof fuse_lk_out", sizeof(struct fuse_lk_out));',
        'p("FUSE_NAME_OFFSET", FUSE_NAME_OFFSET);',
        'p("FUSE_NAME_OFFSET_DIRENTPLUS", FUSE_NAME_OFFSET_DIRENTPLUS);',
        'p("offsetof fuse_direntplus dirent", offsetof(struct fuse_direntplus, dirent));',
        'p("sizeof fuse_direntplus", sizeof(struct fuse_direntplus));',
    ]
    for n in DIRENT_NAMELENS:
        lines.append(f"{{ struct fuse_dirent d = {{ .namelen = {n} }};"
                     f' p("FUSE_DIRENT_SIZE {n}", FUSE_DIRENT_SIZE(&d)); }}')
        lines.append(f"{{ struct fuse_direntplus d = {{ .dirent.namelen = {n} }};"
                     f' p("FUSE_DIRENTPLUS_SIZE {n}", FUSE_DIRENTPLUS_SIZE(&d)); }}')
    present = header_macros()
    wanted = set(constant_table()) | set(init_flag_macros())
    wanted |= {m for m in present if m.startswith(("FATTR_", "FOPEN_"))}
    wanted |= {"FUSE_DEV_IOC_CLONE", "FUSE_KERNEL_MINOR_VERSION"}
    for cname in sorted(wanted & present):
        lines.append(f'p("const {cname}", (long long)({cname}));')
    lines += ["return 0;", "}"]
    src = Path(tmp_dir) / "fuse_abi.c"
    exe = Path(tmp_dir) / "fuse_abi"
    src.write_text("\n".join(lines) + "\n")
    cc = subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
                        capture_output=True, text=True, timeout=60)
    assert cc.returncode == 0, f"gcc failed:\n{cc.stderr}\n--- program ---\n{src.read_text()}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True)
    out: dict[str, int] = {}
    for line in run.stdout.splitlines():
        key, _, value = line.rpartition(" ")
        out[key] = int(value)
    return out


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    return c_results(str(tmp_path_factory.mktemp("cabi")))


# --- what this header cannot check, per header version ------------------------------------------

#: (struct, field) pairs / whole structs / constants the 7.38 header does not describe
EXPECTED_UNCHECKED = {
    38: {
        "structs": {"fuse_sx_time", "fuse_statx_in"},
        "fields": {
            ("fuse_init_out", "max_stack_depth"),  # 7.40; unused[0] in 7.38
            ("fuse_init_out", "request_timeout"),  # 7.43
            ("fuse_init_out", "_unused"),  # starts later than 7.38's unused[7]
        },
        "constants": {
            "FUSE_STATX", "FUSE_NOTIFY_RESEND", "FUSE_NOTIFY_INC_EPOCH", "FUSE_NOTIFY_PRUNE",
            "FUSE_CREATE_SUPP_GROUP", "FUSE_DIRECT_IO_ALLOW_MMAP", "FUSE_PASSTHROUGH",
            "FUSE_NO_EXPORT_SUPPORT", "FUSE_HAS_RESEND", "FUSE_ALLOW_IDMAP", "FUSE_OVER_IO_URING",
            "FUSE_REQUEST_TIMEOUT", "FOPEN_PASSTHROUGH",
        },
    },
}

#: Layouts that are only the part of a C struct before an embedded member: (member, full size)
PREFIX_LAYOUTS = {"fuse_attr_out": ("attr", abi.ATTR_OUT_SIZE)}

#: structs whose total size is still known when the header cannot describe them member by member
SIZE_ONLY = {"fuse_init_out": 64}


def expected_unchecked() -> dict[str, set]:  # type: ignore[type-arg]
    minor = header_minor()
    if minor not in EXPECTED_UNCHECKED:
        pytest.fail(f"no expected-unchecked set for a 7.{minor} header: add one to EXPECTED_UNCHECKED "
                    f"(this header cannot check: {unchecked_now()})")
    return EXPECTED_UNCHECKED[minor]


def unchecked_now() -> dict[str, set]:  # type: ignore[type-arg]
    structs = {lay.c_name for lay in abi.HEADER_LAYOUTS if lay.c_name not in header_structs()}
    fields = set()
    for lay in abi.HEADER_LAYOUTS:
        if lay.c_name in header_structs():
            fields |= {(lay.c_name, f) for f in field_status(lay)[1]}
    constants = set(constant_table()) - header_macros()
    return {"structs": structs, "fields": fields, "constants": constants}


# --- tests --------------------------------------------------------------------------------------

def test_header_layouts_are_distinct() -> None:
    names = [lay.c_name for lay in abi.HEADER_LAYOUTS]
    assert len(names) == len(set(names))
    for lay in abi.HEADER_LAYOUTS:
        assert lay.struct.format.startswith("="), lay.c_name  # native order, no alignment padding
        assert lay.size % 8 == 0 or lay.c_name == "fuse_attr", f"{lay.c_name} not 64-bit padded"


def test_unchecked_is_exactly_the_expected_set() -> None:
    now = unchecked_now()
    exp = expected_unchecked()
    assert now["structs"] == exp["structs"]
    assert now["fields"] == exp["fields"]
    assert now["constants"] == exp["constants"]


def test_struct_sizes(c: dict[str, int]) -> None:
    bad = []
    for lay in abi.HEADER_LAYOUTS:
        key = f"sizeof {lay.c_name}"
        if key not in c:
            continue
        if lay.c_name in PREFIX_LAYOUTS:
            member, full = PREFIX_LAYOUTS[lay.c_name]
            if c[f"offsetof {lay.c_name} {member}"] != lay.size:
                bad.append((lay.c_name, f"prefix before {member}", lay.size))
            if c[key] != full:
                bad.append((lay.c_name, full, c[key]))
        elif c[key] != lay.size:
            bad.append((lay.c_name, lay.size, c[key]))
    assert not bad, f"(struct, ours, C): {bad}"
    checked = {lay.c_name for lay in abi.HEADER_LAYOUTS if f"sizeof {lay.c_name}" in c}
    assert checked == {lay.c_name for lay in abi.HEADER_LAYOUTS} - expected_unchecked()["structs"]


def test_field_offsets_widths_and_signedness(c: dict[str, int]) -> None:
    bad = []
    n = 0
    for lay in abi.HEADER_LAYOUTS:
        if lay.c_name not in header_structs():
            continue
        ok, _ = field_status(lay)
        for f, fmt in zip(lay.fields, lay.formats, strict=True):
            if f not in ok:
                continue
            n += 1
            s = lay.c_name
            if c[f"offsetof {s} {f}"] != lay.offsets[f]:
                bad.append(("offset", s, f, lay.offsets[f], c[f"offsetof {s} {f}"]))
            width = struct.calcsize("=" + fmt)
            if c[f"msize {s} {f}"] != width:
                bad.append(("width", s, f, width, c[f"msize {s} {f}"]))
            renamed = c_member(lay, f).split(".")[-1] != f
            typed = not fmt.endswith("s") and not f.startswith("_") and not renamed
            if typed and bool(c[f"signed {s} {f}"]) != fmt.islower():
                bad.append(("signedness", s, f, fmt, c[f"signed {s} {f}"]))
    assert not bad, bad
    exp = expected_unchecked()
    total = sum(len(lay.fields) for lay in abi.HEADER_LAYOUTS if lay.c_name not in exp["structs"])
    assert n == total - len(exp["fields"]) > 200


def test_size_only_structs(c: dict[str, int]) -> None:
    """Structs whose tail this header cannot describe are still checked by total size."""
    partial = {s for s, _ in unchecked_now()["fields"]}
    assert partial <= set(SIZE_ONLY), f"no total size known for {partial - set(SIZE_ONLY)}"
    for s in partial:
        lay = next(lay for lay in abi.HEADER_LAYOUTS if lay.c_name == s)
        assert lay.size == SIZE_ONLY[s] == c[f"sizeof {s}"]


def test_newer_structs_by_python_size() -> None:
    """7.39's statx structs are not in this header; at least their sizes are what 7.39 defines."""
    assert abi.SX_TIME.size == 16
    assert abi.STATX_IN.size == 24
    assert abi.SX_TIME.offsets["tv_nsec"] == 8
    assert abi.STATX_IN.offsets["fh"] == 8


#: members of the 7.39+ structs this header may lack, as linux/fuse.h spells them
NEWER_STRUCT_MEMBERS = {
    "fuse_sx_time": ["tv_sec", "tv_nsec", "__reserved"],
    "fuse_statx_in": ["getattr_flags", "reserved", "fh", "sx_flags", "sx_mask"],
}


def test_newer_structs_map_to_their_c_members() -> None:
    """Once the header has them, every field must find its C member (else it goes unchecked)."""
    for lay in abi.HEADER_LAYOUTS:
        if lay.c_name in NEWER_STRUCT_MEMBERS:
            mapped = [abi.C_FIELD_NAMES.get((lay.c_name, f), f.lstrip("_")) for f in lay.fields]
            assert mapped == NEWER_STRUCT_MEMBERS[lay.c_name], lay.c_name


def test_entry_and_attr_out_prefixes(c: dict[str, int]) -> None:
    assert c["offsetof fuse_entry_out attr"] == abi.ENTRY_OUT.size
    assert c["sizeof fuse_entry_out"] == abi.ENTRY_OUT_SIZE
    assert c["offsetof fuse_attr_out attr"] == abi.ATTR_OUT.size
    assert c["sizeof fuse_attr_out"] == abi.ATTR_OUT_SIZE
    assert c["sizeof fuse_statfs_out"] == abi.STATFS_OUT_SIZE
    assert c["sizeof fuse_lk_out"] == abi.LK_OUT.size


def test_entry_out_fields_against_c() -> None:
    """ENTRY_OUT is not in HEADER_LAYOUTS (it is a prefix); its field offsets still follow C."""
    # fuse_entry_out: 4 u64 then 2 u32 before attr
    assert abi.ENTRY_OUT.offsets == {
        "nodeid": 0, "generation": 8, "entry_valid": 16, "attr_valid": 24,
        "entry_valid_nsec": 32, "attr_valid_nsec": 36,
    }


def test_dirent_name_offsets_and_record_sizes(c: dict[str, int]) -> None:
    assert c["FUSE_NAME_OFFSET"] == abi.DIRENT.size
    assert c["offsetof fuse_direntplus dirent"] == abi.ENTRY_OUT_SIZE
    assert c["FUSE_NAME_OFFSET_DIRENTPLUS"] == abi.ENTRY_OUT_SIZE + abi.DIRENT.size
    assert c["sizeof fuse_direntplus"] == abi.ENTRY_OUT_SIZE + abi.DIRENT.size
    for n in DIRENT_NAMELENS:
        assert abi.dirent_size(n) == c[f"FUSE_DIRENT_SIZE {n}"], n
        assert abi.direntplus_size(n) == c[f"FUSE_DIRENTPLUS_SIZE {n}"], n


def test_constants_match(c: dict[str, int]) -> None:
    bad = []
    checked = 0
    for cname, (ours, value) in constant_table().items():
        key = f"const {cname}"
        if key in c:
            checked += 1
            cval = c[key]
            if cval < 0 and value >= 0:
                cval += 1 << 32  # (1 << 31) is an int in C: FUSE_INIT_RESERVED
            if cval != value:
                bad.append((cname, ours, value, cval))
    assert not bad, f"(C name, ours, our value, C value): {bad}"
    assert checked == len(constant_table()) - len(expected_unchecked()["constants"])
    assert checked > 100
    assert c["const FUSE_DEV_IOC_CLONE"] == abi.FUSE_DEV_IOC_CLONE
    assert header_minor() <= abi.MAX_MINOR


def test_every_header_opcode_is_known() -> None:
    names = [n for n in _enum_members("fuse_opcode") if not n.endswith("_BSWAP_RESERVED")]
    missing = [n for n in names if n not in constant_table()]
    assert not missing
    assert len(names) >= 50


def test_every_header_notify_code_is_known() -> None:
    names = [n for n in _enum_members("fuse_notify_code") if n != "FUSE_NOTIFY_CODE_MAX"]
    assert names and not [n for n in names if n not in constant_table()]


def test_every_header_flag_is_known(c: dict[str, int]) -> None:
    table = constant_table()
    init = init_flag_macros()
    assert "FUSE_INIT_EXT" in init and "FUSE_SECURITY_CTX" in init
    fattr_fopen = sorted(m for m in header_macros() if m.startswith(("FATTR_", "FOPEN_")))
    assert len(fattr_fopen) >= 18
    missing = [m for m in init + fattr_fopen if m not in table]
    assert not missing, f"abi.py lacks {missing}"
    # and each INIT flag is a distinct single bit, also in abi
    bits = [table[m][1] for m in init]
    assert all(b and b & (b - 1) == 0 for b in bits)
    assert len(set(bits)) == len(bits)


def test_compat_sizes_match_layout_prefixes() -> None:
    assert abi.SETXATTR_IN_COMPAT.size == abi.COMPAT_SETXATTR_IN_SIZE
    assert abi.INIT_IN_COMPAT.size == 16
    assert abi.INIT_IN.offsets["flags2"] == abi.INIT_IN_COMPAT.size
    assert abi.WRITE_IN.offsets["lock_owner"] == abi.COMPAT_WRITE_IN_SIZE
    assert abi.MKNOD_IN.offsets["umask"] == abi.COMPAT_MKNOD_IN_SIZE
    assert abi.INIT_OUT.offsets["time_gran"] == abi.COMPAT_22_INIT_OUT_SIZE
    assert abi.INIT_OUT.offsets["max_background"] == abi.COMPAT_INIT_OUT_SIZE + 8


def test_header_structs_without_a_layout() -> None:
    """Every struct of the header has a Layout, or is listed here on purpose."""
    covered = {lay.c_name for lay in abi.HEADER_LAYOUTS} | {"fuse_entry_out"}
    not_ours = {
        "cuse_init_in", "cuse_init_out", "fuse_ioctl_iovec", "fuse_setupmapping_in",
        "fuse_removemapping_in", "fuse_removemapping_one", "fuse_statfs_out", "fuse_lk_out",
        "fuse_direntplus",
    }
    assert set(header_structs()) - covered == not_ours

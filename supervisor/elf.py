"""A small ELF reader: what the dynamic loader needs to know about a file.

Reads ELF64 little-endian files only (the identity of any other ELF is still
reported, so a caller can skip a 32-bit library and reject a 32-bit
program clearly). Nothing is executed; only the ELF header, the program
headers, the dynamic section and its string table are read.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
ET_DYN = 3
EM_X86_64 = 62

PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
PN_XNUM = 0xFFFF

DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_STRSZ = 10
DT_SONAME = 14
DT_RPATH = 15
DT_RUNPATH = 29
DT_FLAGS_1 = 0x6FFFFFFB
DF_1_NODEFLIB = 0x800

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_DYN = struct.Struct("<qQ")
_MAX_TABLE = 1 << 24  # refuse absurd header tables (corrupt or hostile files)

_CLASS_NAMES = {ELFCLASS32: "ELFCLASS32 (32-bit)", ELFCLASS64: "ELFCLASS64"}
_DATA_NAMES = {1: "little-endian", 2: "big-endian"}


class ElfError(ValueError):
    """The file is not an ELF file this reader supports (or is corrupt)."""


@dataclass(frozen=True)
class ElfIdentity:
    """The fields that decide whether a library can be loaded by a program."""

    elf_class: int
    data: int
    machine: int

    def describe(self) -> str:
        cls = _CLASS_NAMES.get(self.elf_class, f"class {self.elf_class}")
        data = _DATA_NAMES.get(self.data, f"data {self.data}")
        return f"{cls}, {data}, machine {self.machine}"


@dataclass(frozen=True)
class ElfInfo:
    """What the dynamic loader reads from an ELF64 LE file."""

    identity: ElfIdentity
    type: int
    interp: str | None
    needed: tuple[str, ...]
    soname: str | None
    rpath: str | None  # raw DT_RPATH string (colon-separated, unexpanded)
    runpath: str | None  # raw DT_RUNPATH string
    nodeflib: bool  # DF_1_NODEFLIB: no cache, no default directories

    @property
    def dynamic(self) -> bool:
        return self.interp is not None or bool(self.needed)


def is_elf(header: bytes) -> bool:
    """Whether ``header`` (the first bytes of a file) starts an ELF file."""
    return header[:4] == b"\x7fELF"


def read_identity(header: bytes) -> ElfIdentity:
    """Class, byte order and machine from the first 20 bytes of an ELF file."""
    if not is_elf(header) or len(header) < 20:
        raise ElfError("not an ELF file")
    elf_class, data = header[4], header[5]
    byteorder = "little" if data == ELFDATA2LSB else "big"
    machine = int.from_bytes(header[18:20], byteorder)
    return ElfIdentity(elf_class, data, machine)


def _pread(fd: int, size: int, offset: int) -> bytes:
    if size > _MAX_TABLE:
        raise ElfError(f"table of {size} bytes at offset {offset} is too large")
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ElfError(f"truncated: {size} bytes at offset {offset} not in the file")
    return data


def _cstring(table: bytes, offset: int) -> str:
    if offset >= len(table):
        raise ElfError(f"string offset {offset} beyond the string table")
    end = table.find(b"\0", offset)
    return table[offset : end if end >= 0 else len(table)].decode("utf-8", "surrogateescape")


def read_elf(path: str) -> ElfInfo:
    """Parse ``path`` as an ELF64 little-endian file.

    Raises :class:`ElfError` for a file that is not ELF, an ELF of another
    class or byte order (the message names it), or a corrupt one, and
    :class:`OSError` when the file cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_elf_fd(fd)
    finally:
        os.close(fd)


def _read_elf_fd(fd: int) -> ElfInfo:
    header = os.pread(fd, _EHDR.size, 0)
    identity = read_identity(header)
    if identity.elf_class != ELFCLASS64 or identity.data != ELFDATA2LSB:
        raise ElfError(
            f"unsupported ELF ({identity.describe()}); only ELF64 little-endian is supported"
        )
    if len(header) < _EHDR.size:
        raise ElfError("truncated ELF header")
    (_, e_type, _, _, _, e_phoff, e_shoff, _, _, e_phentsize, e_phnum, _, _, _) = _EHDR.unpack(
        header
    )
    if e_phnum == PN_XNUM:  # the real count is in section 0's sh_info
        e_phnum = _SHDR.unpack(_pread(fd, _SHDR.size, e_shoff))[7]
    if e_phnum and e_phentsize < _PHDR.size:
        raise ElfError(f"program header entry size {e_phentsize} is too small")
    table = _pread(fd, e_phnum * e_phentsize, e_phoff)
    phdrs = [
        _PHDR.unpack_from(table, i * e_phentsize) for i in range(e_phnum)
    ]  # (type, flags, offset, vaddr, paddr, filesz, memsz, align)

    interp: str | None = None
    dynamic: tuple[int, int] | None = None
    loads: list[tuple[int, int, int]] = []
    for p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ in phdrs:
        if p_type == PT_INTERP:
            interp = (
                _pread(fd, p_filesz, p_offset).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            )
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == PT_LOAD:
            loads.append((p_vaddr, p_filesz, p_offset))

    needed_offsets: list[int] = []
    needed: tuple[str, ...] = ()
    soname = rpath = runpath = None
    nodeflib = False
    if dynamic is not None:
        entries: dict[int, int] = {}
        raw = _pread(fd, dynamic[1] - dynamic[1] % _DYN.size, dynamic[0])
        for tag, value in _DYN.iter_unpack(raw):
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed_offsets.append(value)
            elif tag in (DT_STRTAB, DT_STRSZ, DT_SONAME, DT_RPATH, DT_RUNPATH, DT_FLAGS_1):
                entries.setdefault(tag, value)
        nodeflib = bool(entries.get(DT_FLAGS_1, 0) & DF_1_NODEFLIB)
        if DT_STRTAB in entries:
            strtab = _pread(
                fd, entries.get(DT_STRSZ, 0), _vaddr_to_offset(entries[DT_STRTAB], loads)
            )
            needed = tuple(_cstring(strtab, off) for off in needed_offsets)
            soname = _cstring(strtab, entries[DT_SONAME]) if DT_SONAME in entries else None
            rpath = _cstring(strtab, entries[DT_RPATH]) if DT_RPATH in entries else None
            runpath = _cstring(strtab, entries[DT_RUNPATH]) if DT_RUNPATH in entries else None
        elif needed_offsets:
            raise ElfError("DT_NEEDED without DT_STRTAB")
    return ElfInfo(identity, e_type, interp, needed, soname, rpath, runpath, nodeflib)


def _vaddr_to_offset(vaddr: int, loads: list[tuple[int, int, int]]) -> int:
    for p_vaddr, p_filesz, p_offset in loads:
        if p_vaddr <= vaddr < p_vaddr + p_filesz:
            return vaddr - p_vaddr + p_offset
    raise ElfError(f"address {vaddr:#x} is in no loadable segment")
